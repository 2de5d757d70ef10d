"""The options beyond the reference models (docs/MODEL.md) on tiny CPU inputs: BOX_QUALITY "iou",
USE_DCN_IN_TOWER and a P2 level. Each trains (every parameter gets a gradient, as DDP needs),
takes an SGD step that lowers the loss, and evaluates; the P2 backbone and its validation are
checked; a slow test runs train_net.py with all three on the tiny embedded dataset up to the AP
table."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Dict

import pytest
import torch
from detectron2.modeling import build_model
from model_utils import batch, small_cfg
from train_helpers import OPTIONS_OPTS, ap_rows, run_train_net, shapes_run

from fcos import FCOSConfigError
from fcos.deform_conv import ModulatedDeformConv2d

P3_P5 = dict(
    IN_FEATURES=["p3", "p4", "p5"],
    FPN_STRIDES=[8, 16, 32],
    OBJECT_SIZES_OF_INTEREST=[[-1, 64], [64, 128], [128, float("inf")]],
)
P2_P4 = dict(
    IN_FEATURES=["p2", "p3", "p4"],
    FPN_STRIDES=[4, 8, 16],
    OBJECT_SIZES_OF_INTEREST=[[-1, 16], [16, 32], [32, float("inf")]],
)
OPTIONS: Dict[str, dict] = {
    "iou_quality": dict(P3_P5, BOX_QUALITY="iou"),
    "dcn_tower": dict(P3_P5, USE_DCN_IN_TOWER=True),
    "p2": dict(P2_P4),
    "all": dict(P2_P4, BOX_QUALITY="iou", USE_DCN_IN_TOWER=True),
}


def options_cfg(**fcos_overrides):
    """small_cfg (ResNet-18, 32-channel FPN), the FPN fed from res2 when a P2 level is asked for."""
    cfg = small_cfg(SCORE_THRESH_TEST=0.0, **fcos_overrides)
    if "p2" in cfg.MODEL.FCOS.IN_FEATURES:
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4"]
    return cfg


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_every_parameter_and_evaluates(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(options_cfg(**OPTIONS[name]))
    model.train()
    inputs = batch(96, 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    before = model(inputs)
    quality_key = "loss_quality" if model.box_quality == "iou" else "loss_centerness"
    assert set(before) == {"loss_cls", "loss_box_reg", quality_key}
    optimizer.zero_grad()
    sum(before.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    optimizer.step()
    with torch.no_grad():
        after = model(inputs)
    assert sum(after.values()).item() < sum(before.values()).item()

    model.eval()
    with torch.no_grad():
        result = model([{"image": inputs[0]["image"], "height": 48, "width": 64}])[0]["instances"]
    assert result.image_size == (48, 64)
    assert 0 < len(result) <= 100
    assert bool((result.scores > 0).all() and (result.scores <= 1).all())


def test_iou_quality_keeps_the_checkpoint_keys() -> None:
    """The IoU branch is the centerness conv (key head.centerness.*): same keys and shapes."""
    ctrness = build_model(options_cfg(**P3_P5)).state_dict()
    iou = build_model(options_cfg(**OPTIONS["iou_quality"])).state_dict()
    assert {k: v.shape for k, v in ctrness.items()} == {k: v.shape for k, v in iou.items()}


def test_iou_quality_scores_with_the_quality_branch() -> None:
    """At test time sigmoid(quality) takes centerness's place: sqrt(prob * sigmoid(quality))."""
    torch.manual_seed(0)
    model = build_model(options_cfg(**OPTIONS["iou_quality"])).eval()
    head = model.head
    with torch.no_grad():
        # Constant maps: class probability 0.25 (logit -log 3), quality 0.75 (logit log 3).
        for conv, bias in ((head.cls_score, -math.log(3.0)), (head.centerness, math.log(3.0))):
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.constant_(conv.bias, bias)
        result = model([{"image": batch(96, 128)[0]["image"]}])[0]["instances"]
    assert len(result) > 0
    assert torch.allclose(result.scores, torch.full_like(result.scores, math.sqrt(0.25 * 0.75)))


def test_dcn_tower_replaces_only_the_last_conv_of_each_tower() -> None:
    model = build_model(options_cfg(**OPTIONS["dcn_tower"], NUM_CONVS=3))
    for tower in (model.head.cls_subnet, model.head.bbox_subnet):
        kinds = [type(tower[i]) for i in (0, 3, 6)]
        assert kinds == [torch.nn.Conv2d, torch.nn.Conv2d, ModulatedDeformConv2d]


def test_p2_backbone_builds_a_stride_4_level_from_res2() -> None:
    model = build_model(options_cfg(**P2_P4))
    shapes = model.backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16}
    keys = model.state_dict().keys()
    assert "backbone.fpn_lateral2.weight" in keys and "backbone.fpn_output2.weight" in keys
    assert model.state_dict()["backbone.fpn_lateral2.weight"].shape == (32, 64, 1, 1)  # res2: 64 ch
    assert len(model.head.scales) == 3
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    assert features["p2"].shape[-2:] == (16, 24)


P2_MISTAKES = [
    # The trap: only FPN_STRIDES changed, the backbone still starts at P3.
    (dict(P3_P5, FPN_STRIDES=[4, 8, 16]), False, "MODEL.FCOS.FPN_STRIDES"),
    # p2 asked for, but res2 not fed to the FPN.
    (dict(P2_P4), False, "P2 needs res2"),
    # Strides not updated after adding p2.
    (dict(P2_P4, FPN_STRIDES=[8, 16, 32]), True, "MODEL.FCOS.FPN_STRIDES"),
    # The extra row missing.
    (dict(P2_P4, OBJECT_SIZES_OF_INTEREST=[[-1, 32], [32, float("inf")]]), True, "has 2 rows"),
    # The extra row added at the wrong end.
    (
        dict(P2_P4, OBJECT_SIZES_OF_INTEREST=[[16, 32], [32, float("inf")], [-1, 16]]),
        True,
        "takes larger objects than row",
    ),
]


@pytest.mark.parametrize(
    "overrides,with_res2,message", P2_MISTAKES, ids=[m for _, _, m in P2_MISTAKES]
)
def test_p2_mistakes_are_clear_errors(overrides: dict, with_res2: bool, message: str) -> None:
    cfg = small_cfg(**copy.deepcopy(overrides))
    if with_res2:
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4"]
    with pytest.raises(FCOSConfigError, match=message):
        build_model(cfg)


@pytest.mark.slow
def test_all_options_train_and_evaluate_with_train_net(tmp_path: Path) -> None:
    """The tiny embedded job with IoU quality, a deformable tower and P2 (res2-res4) end to end."""
    out = tmp_path / "out"
    run = run_train_net(
        shapes_run(
            tmp_path,
            out,
            *OPTIONS_OPTS,
            "MODEL.FCOS.SCORE_THRESH_TEST",
            "0.001",
            "SOLVER.MAX_ITER",
            "4",
        )
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert list(ap_rows(run.stdout)) == ["bbox"]
    metrics = (out / "metrics.json").read_text()
    assert '"loss_quality"' in metrics and '"loss_centerness"' not in metrics
    weights = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert "head.cls_subnet.0.offset.weight" in weights
    assert "backbone.fpn_lateral2.weight" in weights
