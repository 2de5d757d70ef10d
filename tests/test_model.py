"""The FCOS meta-architecture end to end on CPU: configs, train/eval forward, one SGD step, bad configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from model_utils import REPO, batch, small_cfg

import fcos  # noqa: F401  (registers FCOS)
from fcos import FCOSConfigError, add_fcos_config

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("Base-"))


def load_config(path: Path):
    """A config file as train_net would load it, with every key the project adds."""
    cfg = get_cfg()
    add_fcos_config(cfg)
    try:
        from fcos.engine.config import add_training_config
    except ImportError:
        add_training_config = None
    if add_training_config is not None:
        add_training_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_trains_and_infers_on_small_images(path):
    torch.manual_seed(0)
    model = build_model(load_config(path))
    model.train()
    losses = model(batch(96, 128))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_centerness"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": batch(96, 128)[0]["image"], "height": 48, "width": 64}])
    result = outputs[0]["instances"]
    assert result.image_size == (48, 64)
    assert len(result) <= load_config(path).TEST.DETECTIONS_PER_IMAGE


def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(
        small_cfg(
            CENTERNESS_ON_REG=True,
            NORM_REG_TARGETS=True,
            IOU_LOSS_TYPE="giou",
            CENTER_SAMPLING_RADIUS=1.5,
        )
    )
    model.train()
    inputs = batch(96, 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    before = model(inputs)
    optimizer.zero_grad()
    sum(before.values()).backward()
    optimizer.step()
    after = model(inputs)
    assert sum(after.values()).item() < sum(before.values()).item()


def test_official_flavour_differs_from_seed_only_in_switches():
    seed = build_model(small_cfg())
    official = build_model(
        small_cfg(
            TOP_BLOCK_IN_FEATURE="p5",
            GRID_OFFSET=0.5,
            INFERENCE_TOPK_FIRST=False,
            POSTPROCESS="official",
        )
    )
    seed_shapes = {k: v.shape for k, v in seed.state_dict().items()}
    official_shapes = {k: v.shape for k, v in official.state_dict().items()}
    assert seed_shapes.keys() == official_shapes.keys()
    differing = sorted(k for k in seed_shapes if seed_shapes[k] != official_shapes[k])
    assert differing == ["backbone.top_block.p6.weight"]
    assert seed_shapes["backbone.top_block.p6.weight"] == (32, 512, 3, 3)
    assert official_shapes["backbone.top_block.p6.weight"] == (32, 32, 3, 3)


@pytest.mark.parametrize(
    "features,has_p6,has_p7",
    [
        (["p3", "p4", "p5"], False, False),
        (["p3", "p4", "p5", "p6"], True, False),
        (["p3", "p4", "p5", "p6", "p7"], True, True),
    ],
)
def test_backbone_builds_only_the_levels_in_use(features, has_p6, has_p7):
    strides = [8, 16, 32, 64, 128][: len(features)]
    sizes = [[-1, 64], [64, 128], [128, 256], [256, 512], [512, float("inf")]][: len(features)]
    model = build_model(
        small_cfg(IN_FEATURES=features, FPN_STRIDES=strides, OBJECT_SIZES_OF_INTEREST=sizes)
    )
    keys = model.state_dict().keys()
    assert any(k.startswith("backbone.top_block.p6.") for k in keys) == has_p6
    assert any(k.startswith("backbone.top_block.p7.") for k in keys) == has_p7
    model.train()
    losses = model(batch(96, 128))
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_seed_backbone_name_still_builds():
    cfg = small_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    model = build_model(cfg)
    assert model.state_dict()["backbone.top_block.p6.weight"].shape == (32, 512, 3, 3)


BAD = [
    ({"FPN_STRIDES": [8, 16, 32, 64, 64]}, "MODEL.FCOS.FPN_STRIDES"),
    ({"IN_FEATURES": ["p2", "p3"]}, "MODEL.FCOS.IN_FEATURES"),
    ({"IN_FEATURES": []}, "MODEL.FCOS.IN_FEATURES"),
    (
        {"OBJECT_SIZES_OF_INTEREST": [[-1, 64], [64, float("inf")]]},
        "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
    ),
    (
        {"OBJECT_SIZES_OF_INTEREST": [[-1, 64], [64, 64], [64, 128], [128, 256], [256, 512]]},
        "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
    ),
    ({"HEAD_NORM": "LayerNorm"}, "MODEL.FCOS.HEAD_NORM"),
    ({"IOU_LOSS_TYPE": "diou"}, "MODEL.FCOS.IOU_LOSS_TYPE"),
    ({"TOP_BLOCK_IN_FEATURE": "res4"}, "MODEL.FCOS.TOP_BLOCK_IN_FEATURE"),
    ({"NUM_CLASSES": 0}, "MODEL.FCOS.NUM_CLASSES"),
    ({"PRIOR_PROB": 0.0}, "MODEL.FCOS.PRIOR_PROB"),
    ({"GRID_OFFSET": 1.0}, "MODEL.FCOS.GRID_OFFSET"),
    ({"BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0)}, "MODEL.FCOS.BBOX_REG_WEIGHTS"),
    ({"POSTPROCESS": "cvpods"}, "MODEL.FCOS.POSTPROCESS"),
    ({"FAST_CPU_INFERENCE": 1}, "MODEL.FCOS.FAST_CPU_INFERENCE"),
    ({"TOPK_CANDIDATES_TEST": 0}, "MODEL.FCOS.TOPK_CANDIDATES_TEST"),
    ({"BOX_QUALITY": "centerness"}, "MODEL.FCOS.BOX_QUALITY"),
    ({"USE_DCN_IN_TOWER": True, "NUM_CONVS": 0}, "MODEL.FCOS.USE_DCN_IN_TOWER"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k + str(i) for i, (_, k) in enumerate(BAD)])
def test_bad_config_raises_clear_error(overrides, key):
    with pytest.raises((FCOSConfigError, ValueError), match=key.replace(".", r"\.")):
        build_model(small_cfg(**copy.deepcopy(overrides)))
