"""FCOSCheckpointer / tools/convert.py: every supported layout lands on the right keys; bad files fail clearly."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from convert import main as convert_main
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from model_utils import REPO, small_cfg
from official_fcos import official_r50_fpn_state_dict
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from fcos import add_fcos_config
from fcos.checkpoint import CheckpointMismatchError, FCOSCheckpointer
from fcos.checkpoint_layouts import Layout, UnknownLayoutError, read_checkpoint
from fcos.safe_pickle import UnsafeCheckpointError

SEED_CONFIG = "configs/fcos_R_50_FPN.yaml"
OFFICIAL_CONFIG = "configs/fcos_R_50_FPN_official.yaml"


def _cfg(config: str) -> CfgNode:
    cfg = get_cfg()
    add_fcos_config(cfg)
    cfg.merge_from_file(str(REPO / config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _build(cfg: CfgNode) -> nn.Module:
    return build_model(cfg).eval()


def _randomized_state(model: nn.Module, seed: int) -> "OrderedDict[str, Tensor]":
    """The model's keys and shapes with fresh random values (positive where a variance is expected)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            fresh = torch.rand(value.shape, generator=g) + 0.5
            state[key] = fresh if key.endswith("running_var") else fresh - 1.0
        else:
            state[key] = value.clone()
    return state


def _assert_state_equal(model: nn.Module, expected: Dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _table_rows(summary: str) -> Dict[str, list]:
    """{module: [loaded, skipped, missing, unexpected]} from the logged load table."""
    rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("|")][2:]
    return {cells[0].strip(): [int(c) for c in cells[1:]] for cells in rows}


# ---------------------------------------------------------------- official FCOS (maskrcnn-benchmark) layout

OFFICIAL_TO_OURS = {
    "backbone.body.stem.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.body.stem.bn1.bias": "backbone.bottom_up.stem.conv1.norm.bias",
    "backbone.body.layer1.0.conv2.weight": "backbone.bottom_up.res2.0.conv2.weight",
    "backbone.body.layer3.5.bn3.weight": "backbone.bottom_up.res4.5.conv3.norm.weight",
    "backbone.body.layer4.0.downsample.0.weight": "backbone.bottom_up.res5.0.shortcut.weight",
    "backbone.body.layer2.0.downsample.1.running_mean": "backbone.bottom_up.res3.0.shortcut.norm.running_mean",
    "backbone.fpn.fpn_inner2.weight": "backbone.fpn_lateral3.weight",
    "backbone.fpn.fpn_layer4.bias": "backbone.fpn_output5.bias",
    "backbone.fpn.top_blocks.p6.weight": "backbone.top_block.p6.weight",
    "backbone.fpn.top_blocks.p7.bias": "backbone.top_block.p7.bias",
    "rpn.head.cls_tower.9.weight": "head.cls_subnet.9.weight",
    "rpn.head.bbox_tower.4.bias": "head.bbox_subnet.4.bias",
    "rpn.head.cls_logits.weight": "head.cls_score.weight",
    "rpn.head.bbox_pred.bias": "head.bbox_pred.bias",
    "rpn.head.centerness.weight": "head.centerness.weight",
    "rpn.head.scales.3.scale": "head.scales.3.scale",
}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout file as tianzhi0549/FCOS saves it, training state included."""
    path = tmp_path_factory.mktemp("official") / "FCOS_imprv_R_50_FPN_1x.pth"
    payload = {
        "model": official_r50_fpn_state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "scheduler": {"milestones": [60000, 80000], "last_epoch": 90000},
        "iteration": 90000,
    }
    torch.save(payload, path)
    return path


def test_official_layout_converts_and_loads_strictly(official_file: Path) -> None:
    official = {k[len("module.") :]: v for k, v in official_r50_fpn_state_dict().items()}
    converted = read_checkpoint(str(official_file))
    assert converted.layout is Layout.OFFICIAL
    assert converted.extras == {}
    assert converted.ignored_extras == ["iteration", "optimizer", "scheduler"]

    model = _build(_cfg(OFFICIAL_CONFIG))
    model.load_state_dict(converted.state_dict, strict=True)
    state = model.state_dict()
    for official_key, our_key in OFFICIAL_TO_OURS.items():
        assert torch.equal(state[our_key], official[official_key]), our_key
    # The official FrozenBN has no eps; detectron2's adds 1e-5, so the converted variance is 1e-5 lower.
    assert torch.allclose(
        state["backbone.bottom_up.res4.2.conv1.norm.running_var"] + 1e-5,
        official["backbone.body.layer3.2.bn1.running_var"],
        rtol=1e-6,
        atol=0,
    )

    # Every model tensor comes from exactly one official tensor (random values identify them).
    by_shape: Dict[tuple, list] = {}
    for key, value in official.items():
        by_shape.setdefault(tuple(value.shape), []).append(key)
    sources = set()
    for key, value in state.items():
        expected = value + 1e-5 if key.endswith("running_var") else value
        matches = [
            k
            for k in by_shape[tuple(value.shape)]
            if torch.allclose(official[k], expected, rtol=1e-6, atol=0)
        ]
        assert len(matches) == 1, (key, matches)
        sources.add(matches[0])
    assert sources == set(official)


def test_official_file_through_checkpointer_logs_complete_table(
    official_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _build(_cfg(OFFICIAL_CONFIG))
    with caplog.at_level(logging.INFO):
        extra = FCOSCheckpointer(model).load(str(official_file))
    assert extra == {}, "another code base's optimizer/scheduler must not be offered for resuming"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    summary = next(r.getMessage() for r in caplog.records if "load summary" in r.getMessage())
    rows = _table_rows(summary)
    assert rows["total"] == [324, 0, 0, 0]
    assert rows["backbone.bottom_up"] == [265, 0, 0, 0]
    assert rows["backbone.fpn_lateral"] == [6, 0, 0, 0]
    assert rows["head.scales"] == [5, 0, 0, 0]
    assert "official FCOS" in caplog.text


def _official_dfconv2d(x: Tensor, official: Dict[str, Tensor], prefix: str) -> Tensor:
    """The official modulated DFConv2d: a 27-channel offset conv, 18 offsets, mask = sigmoid(9)."""
    weight, bias = official[f"{prefix}.conv.weight"], official[f"{prefix}.conv.bias"]
    offset_mask = F.conv2d(
        x, official[f"{prefix}.offset.weight"], official[f"{prefix}.offset.bias"], padding=1
    )
    mask = offset_mask[:, 18:].sigmoid()
    return deform_conv2d(x, offset_mask[:, :18], weight, bias, padding=(1, 1), mask=mask)


def test_official_dcn_tower_maps_onto_the_deformable_tower(tmp_path: Path) -> None:
    """USE_DCN_IN_TOWER: DFConv2d's ``.conv.*`` and ``.offset.*`` keys load into our deformable
    conv, which then computes the official function."""
    official = {k[len("module.") :]: v for k, v in official_r50_fpn_state_dict().items()}
    g = torch.Generator().manual_seed(5)
    for tower in ("cls_tower", "bbox_tower"):
        prefix = f"rpn.head.{tower}.9"
        official[f"{prefix}.conv.weight"] = official.pop(f"{prefix}.weight")
        official[f"{prefix}.conv.bias"] = official.pop(f"{prefix}.bias")
        official[f"{prefix}.offset.weight"] = 0.02 * torch.randn(27, 256, 3, 3, generator=g)
        official[f"{prefix}.offset.bias"] = 0.5 * torch.randn(27, generator=g)
    path = tmp_path / "FCOS_imprv_dcnv2_tower.pth"
    torch.save({"model": official}, path)

    cfg = _cfg(OFFICIAL_CONFIG)
    cfg.MODEL.FCOS.USE_DCN_IN_TOWER = True
    model = _build(cfg)
    converted = read_checkpoint(str(path))
    model.load_state_dict(converted.state_dict, strict=True)
    state = model.state_dict()
    official_offset = official["rpn.head.bbox_tower.9.offset.weight"]
    assert torch.equal(state["head.bbox_subnet.9.offset.weight"], official_offset)
    assert torch.equal(state["head.cls_subnet.9.bias"], official["rpn.head.cls_tower.9.conv.bias"])
    # Our mask is 2 * sigmoid, the official one sigmoid: the deformable weight is halved.
    official_weight = official["rpn.head.cls_tower.9.conv.weight"]
    assert torch.equal(state["head.cls_subnet.9.weight"], official_weight * 0.5)
    x = torch.randn(1, 256, 6, 5, generator=g)
    with torch.no_grad():
        ours = model.head.cls_subnet[9](x)
    assert torch.allclose(ours, _official_dfconv2d(x, official, "rpn.head.cls_tower.9"), atol=1e-5)


def test_official_checkpoint_into_seed_flavour_names_the_switch(official_file: Path) -> None:
    model = _build(_cfg(SEED_CONFIG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        FCOSCheckpointer(model).load(str(official_file))
    message = str(info.value)
    assert message.startswith(str(official_file))
    assert (
        "backbone.top_block.p6.weight: checkpoint [256, 256, 3, 3] vs model [256, 2048, 3, 3]"
        in message
    )
    assert 'MODEL.FCOS.TOP_BLOCK_IN_FEATURE: "p5"' in message
    assert "1 tensor(s)" in message
    _assert_state_equal(model, before)  # nothing half-loaded


def test_seed_checkpoint_into_official_flavour_names_the_switch(tmp_path: Path) -> None:
    seed_model = _build(_cfg(SEED_CONFIG))
    path = tmp_path / "FCOS_imprv_R_50_FPN_1x.pth"
    torch.save({"model": _randomized_state(seed_model, seed=3)}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        FCOSCheckpointer(_build(_cfg(OFFICIAL_CONFIG))).load(str(path))
    message = str(info.value)
    assert (
        "backbone.top_block.p6.weight: checkpoint [256, 2048, 3, 3] vs model [256, 256, 3, 3]"
        in message
    )
    assert 'MODEL.FCOS.TOP_BLOCK_IN_FEATURE: "res5"' in message


# ---------------------------------------------------------------- detectron2 / cvpods / seed layout


@pytest.mark.parametrize("container", ["model_dict", "raw", "ddp_prefixed"])
def test_seed_layout_loads_unchanged(tmp_path: Path, container: str) -> None:
    source = _build(small_cfg())
    state = _randomized_state(source, seed=1)
    if container == "model_dict":
        payload = {"model": state, "iteration": 1234}
    elif container == "raw":
        payload = state
    else:
        payload = {"model": OrderedDict((f"module.{k}", v) for k, v in state.items())}
    path = tmp_path / "seed.pth"
    torch.save(payload, path)

    target = _build(small_cfg())
    extra = FCOSCheckpointer(target).load(str(path))
    _assert_state_equal(target, state)
    assert extra == ({"iteration": 1234} if container == "model_dict" else {})


def test_resume_from_own_checkpoint_restores_extras(tmp_path: Path) -> None:
    model = _build(small_cfg())
    state = _randomized_state(model, seed=2)
    model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.9)
    FCOSCheckpointer(model, str(tmp_path), save_to_disk=True, optimizer=optimizer).save(
        "model_0000099", iteration=99
    )

    fresh = _build(small_cfg())
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=1.0)
    extra = FCOSCheckpointer(fresh, str(tmp_path), optimizer=fresh_optimizer).resume_or_load(
        "", resume=True
    )
    assert extra == {"iteration": 99}
    assert fresh_optimizer.param_groups[0]["lr"] == 0.125
    _assert_state_equal(fresh, state)


# ---------------------------------------------------------------- class head and other shape mismatches


def test_other_class_count_skips_class_head_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coco_model = _build(small_cfg(NUM_CLASSES=80))
    coco_state = _randomized_state(coco_model, seed=4)
    path = tmp_path / "coco.pth"
    torch.save({"model": coco_state}, path)

    target = _build(small_cfg(NUM_CLASSES=3))
    initial_head = {
        k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.cls_score.")
    }
    with caplog.at_level(logging.INFO):
        FCOSCheckpointer(target).load(str(path))

    state = target.state_dict()
    for key, value in coco_state.items():
        if key.startswith("head.cls_score."):
            assert torch.equal(state[key], initial_head[key]), key
        else:
            assert torch.equal(state[key], value), key
    class_warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "class head" in r.getMessage()
    ]
    assert class_warnings == [
        "class head head.cls_score not loaded: the checkpoint has 80 classes, MODEL.FCOS.NUM_CLASSES is 3; it "
        "keeps its initialisation (expected when fine-tuning on a dataset with other classes)"
    ]
    summary = next(r.getMessage() for r in caplog.records if "load summary" in r.getMessage())
    assert "skipped head.cls_score.weight: checkpoint has 80 classes, model 3" in summary
    assert "| head.cls_score " in summary and "|        0 |         2 |" in summary


def test_other_mismatch_is_an_error_naming_key_shapes_and_switch(tmp_path: Path) -> None:
    wide_cfg = small_cfg()
    wide_cfg.MODEL.FPN.OUT_CHANNELS = 64
    path = tmp_path / "wide.pth"
    torch.save({"model": _randomized_state(_build(wide_cfg), seed=5)}, path)

    target = _build(small_cfg())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        FCOSCheckpointer(target).load(str(path))
    message = str(info.value)
    assert (
        "backbone.fpn_lateral3.weight: checkpoint [64, 128, 1, 1] vs model [32, 128, 1, 1]"
        in message
    )
    assert "check MODEL.FPN.OUT_CHANNELS" in message
    assert "more" in message  # long lists are cut, not dumped
    _assert_state_equal(target, before)


def test_a_failed_load_leaves_the_checkpointer_usable(tmp_path: Path) -> None:
    wide_cfg = small_cfg()
    wide_cfg.MODEL.FPN.OUT_CHANNELS = 64
    wide = tmp_path / "wide.pth"
    torch.save({"model": _randomized_state(_build(wide_cfg), seed=5)}, wide)
    target = _build(small_cfg())
    good_state = _randomized_state(target, seed=8)
    good = tmp_path / "good.pth"
    torch.save({"model": good_state}, good)

    checkpointer = FCOSCheckpointer(target)
    with pytest.raises(CheckpointMismatchError):
        checkpointer.load(str(wide))
    checkpointer.load(str(good))
    _assert_state_equal(target, good_state)


def test_deeper_resnet_mismatch_names_depth(tmp_path: Path) -> None:
    r50_cfg = small_cfg()
    r50_cfg.MODEL.RESNETS.DEPTH = 50
    r50_cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    path = tmp_path / "r50.pth"
    torch.save(_randomized_state(_build(r50_cfg), seed=6), path)
    with pytest.raises(
        CheckpointMismatchError, match=r"backbone\.bottom_up\..*MODEL\.RESNETS\.DEPTH"
    ):
        FCOSCheckpointer(_build(small_cfg())).load(str(path))


# ---------------------------------------------------------------- ImageNet backbones


def test_torchvision_resnet50_gives_the_same_features(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    g = torch.Generator().manual_seed(7)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g))
            module.weight.data.copy_(0.5 + torch.rand(module.num_features, generator=g))
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(reference.state_dict(), path)

    cfg = _cfg(SEED_CONFIG)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision strides in the 3x3 conv
    model = _build(cfg)
    with caplog.at_level(logging.INFO):
        FCOSCheckpointer(model).load(str(path))
    assert "torchvision ResNet" in caplog.text
    summary = next(r.getMessage() for r in caplog.records if "load summary" in r.getMessage())
    rows = _table_rows(summary)
    assert rows["backbone.bottom_up"] == [
        265,
        0,
        0,
        0,
    ]  # 320 torchvision tensors - fc (2) - num_batches_tracked (53)
    assert rows["head.cls_score"] == [0, 0, 2, 0]
    assert (
        "(left at their initialisation): backbone.fpn_lateral* (6), backbone.fpn_output* (6)"
        in summary
    )

    x = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        theirs = reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        )
        for stage, layer in (
            ("res3", reference.layer2),
            ("res4", reference.layer3),
            ("res5", reference.layer4),
        ):
            theirs = layer(theirs)
            assert torch.allclose(ours[stage], theirs, rtol=1e-4, atol=1e-4), stage


_CAFFE2_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}


def _caffe2_name(d2_key: str) -> str:
    """detectron2 ResNet key -> MSRA/Caffe2 blob name (the inverse of detectron2's renaming), by hand."""
    key = d2_key[len("backbone.bottom_up.") :]
    if key == "stem.conv1.weight":
        return "conv1_w"
    if key.startswith("stem.conv1.norm."):
        return "res_conv1_bn_" + _CAFFE2_BN[key.rsplit(".", 1)[1]]
    stage, block, conv, *rest = key.split(".")
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[
        conv
    ]
    if rest[0] == "norm":
        return f"{stage}_{block}_{branch}_bn_{_CAFFE2_BN[rest[1]]}"
    return f"{stage}_{block}_{branch}_w"


@pytest.mark.parametrize("container", ["blobs_dict", "detectron2_zoo_dict"])
def test_caffe2_imagenet_pkl_through_detectron2_renaming(tmp_path: Path, container: str) -> None:
    """MSRA R-50.pkl style: Caffe2 blob names (``_bn_s/_b/_rm/_riv``), classifier and momenta included."""
    cfg = small_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    model = _build(cfg)
    g = torch.Generator().manual_seed(8)
    blobs = {}
    expected = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.bottom_up."):
            array = (torch.rand(value.shape, generator=g) + 0.5).numpy()
            blobs[_caffe2_name(key)] = array
            expected[key] = torch.from_numpy(array)
    blobs["pred_w"] = np.zeros((1000, 512), dtype=np.float32)
    blobs["pred_b"] = np.zeros(1000, dtype=np.float32)
    blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])
    payload = (
        blobs
        if container == "blobs_dict"
        else {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
    )
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)

    converted = read_checkpoint(str(path))
    assert converted.layout is Layout.CAFFE2
    assert sorted(converted.dropped) == ["conv1_w_momentum", "linear.bias", "linear.weight"]
    assert converted.extras == {}
    FCOSCheckpointer(model).load(str(path))
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_bare_detectron2_resnet_pkl_gets_backbone_prefix(tmp_path: Path) -> None:
    """detectron2's convert-torchvision-to-d2.py output: ResNet names without ``backbone.bottom_up.``."""
    model = _build(small_cfg())
    state = _randomized_state(model, seed=10)
    prefix = "backbone.bottom_up."
    bare = {k[len(prefix) :]: v.numpy() for k, v in state.items() if k.startswith(prefix)}
    path = tmp_path / "r18-from-torchvision.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": bare, "__author__": "torchvision", "matching_heuristics": True}, f)

    assert read_checkpoint(str(path)).layout is Layout.DETECTRON2_RESNET
    FCOSCheckpointer(model).load(str(path))
    current = model.state_dict()
    for key, value in state.items():
        if key.startswith(prefix):
            assert torch.equal(current[key], value), key


# ---------------------------------------------------------------- untrusted files


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_a_callable_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(
            {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "x": _RunsShellCommand(marker)},
            f,
            protocol=2,
        )
    pth = tmp_path / "evil.pth"
    torch.save(
        {"model": {"head.centerness.bias": torch.zeros(1)}, "x": _RunsShellCommand(marker)}, pth
    )

    model = _build(small_cfg())
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"evil\.pkl: refused to unpickle posix\.system.*ALLOW_UNSAFE_PICKLE",
    ):
        FCOSCheckpointer(model).load(str(pkl))
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"evil\.pth: refused by torch\.load\(weights_only=True\).*posix\.system.*ALLOW_UNSAFE_PICKLE",
    ):
        FCOSCheckpointer(model).load(str(pth))
    assert not marker.exists()


def test_unsafe_pickle_needs_explicit_opt_in(tmp_path: Path) -> None:
    model = _build(small_cfg())
    state = _randomized_state(model, seed=9)
    path = tmp_path / "with_object.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "note": Fraction(1, 3)}, f)

    with pytest.raises(UnsafeCheckpointError, match=r"fractions\.Fraction"):
        FCOSCheckpointer(model).load(str(path))
    extra = FCOSCheckpointer(model, allow_unsafe_pickle=True).load(str(path))
    assert extra == {"note": Fraction(1, 3)}
    _assert_state_equal(model, state)


def _as_numpy1_file(path: Path) -> None:
    """Rewrite a pickle (or torch zip) as numpy 1 writes it: ``numpy.core`` instead of ``numpy._core``."""
    if path.suffix == ".pkl":
        path.write_bytes(
            path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        )
        return
    original = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-file", "numpy1-file"])
def test_numpy_arrays_are_admitted_without_opt_in(
    tmp_path: Path, suffix: str, numpy1: bool
) -> None:
    model = _build(small_cfg())
    state = _randomized_state(model, seed=12)
    payload = {"model": {k: v.numpy() for k, v in state.items()}, "iteration": np.int64(7)}
    path = tmp_path / f"arrays{suffix}"
    if suffix == ".pth":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    if numpy1:
        _as_numpy1_file(path)
        assert b"numpy._core" not in path.read_bytes()

    extra = FCOSCheckpointer(model).load(str(path))
    _assert_state_equal(model, state)
    assert extra == {"iteration": 7}


def test_config_key_defaults_to_safe() -> None:
    cfg = _cfg(SEED_CONFIG)
    assert cfg.CHECKPOINT.ALLOW_UNSAFE_PICKLE is False
    # The key's earlier home names the new one instead of a bare "non-existent config key".
    with pytest.raises(
        KeyError,
        match="MODEL.FCOS.ALLOW_UNSAFE_PICKLE was renamed to CHECKPOINT.ALLOW_UNSAFE_PICKLE",
    ):
        cfg.merge_from_list(["MODEL.FCOS.ALLOW_UNSAFE_PICKLE", "True"])


# ---------------------------------------------------------------- missing and unknown files


def test_missing_file_says_what_to_download(tmp_path: Path) -> None:
    missing = tmp_path / "pretrained_weights" / "FCOS_imprv_R_50_FPN_1x.pth"
    with pytest.raises(FileNotFoundError) as info:
        FCOSCheckpointer(_build(small_cfg())).load(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert str(REPO / "pretrained_weights" / "README.md") in message
    assert (
        "configs/fcos_R_50_FPN.yaml" in message and "configs/fcos_R_50_FPN_official.yaml" in message
    )
    assert "FCOS_imprv_R_50_FPN_1x_official.pth" in message


def test_unknown_layout_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(
        UnknownLayoutError, match=r"other\.pth: unrecognised checkpoint layout.*encoder\.weight"
    ):
        FCOSCheckpointer(_build(small_cfg())).load(str(path))


def test_non_tensor_weight_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"model": {"head.centerness.bias": [0.0]}}, path)
    with pytest.raises(ValueError, match=r"odd\.pth: weight 'head\.centerness\.bias' is a list"):
        read_checkpoint(str(path))


# ---------------------------------------------------------------- conversion CLI


def test_convert_cli_writes_detectron2_layout(
    official_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "converted.pth"
    assert convert_main([str(official_file), str(out)]) == 0
    assert "official FCOS" in capsys.readouterr().out

    written = torch.load(out, weights_only=True)
    assert set(written) == {"model", "__author__"}
    model = _build(_cfg(OFFICIAL_CONFIG))
    model.load_state_dict(written["model"], strict=True)
    # detectron2's own checkpointer (no conversion logic) reads the result by name.
    plain = _build(_cfg(OFFICIAL_CONFIG))
    DetectionCheckpointer(plain).load(str(out))
    _assert_state_equal(plain, model.state_dict())


def test_convert_cli_refuses_unsafe_pickle_and_reports(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(
            {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "x": _RunsShellCommand(marker)}, f
        )
    out = tmp_path / "out.pth"
    proc = subprocess.run(
        [sys.executable, "tools/convert.py", str(pkl), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("tools/convert.py: error: ")
    assert (
        "refused to unpickle posix.system" in proc.stderr and "--allow-unsafe-pickle" in proc.stderr
    )
    assert not out.exists() and not marker.exists()


def test_convert_cli_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert convert_main([str(tmp_path / "nope.pth"), str(tmp_path / "out.pth")]) == 2
    assert "nope.pth: no such file (see pretrained_weights/README.md)" in capsys.readouterr().err
