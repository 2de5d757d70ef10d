"""Small FCOS configs and inputs shared by the model tests (tiny ResNet-18-FPN so CPU tests stay fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances

from fcos import add_fcos_config

REPO = Path(__file__).resolve().parents[1]


def small_cfg(**fcos_overrides) -> CfgNode:
    """Base-FCOS with a ResNet-18 + 32-channel FPN and 3 classes; ``fcos_overrides`` go to MODEL.FCOS."""
    cfg = get_cfg()
    add_fcos_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-FCOS.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    cfg.MODEL.FCOS.NUM_CONVS = 1
    for key, value in fcos_overrides.items():
        setattr(cfg.MODEL.FCOS, key, value)
    return cfg


def instances(image_size: Sequence[int], boxes: List[List[float]], classes: List[int]) -> Instances:
    inst = Instances(tuple(image_size))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def batch(height: int = 96, width: int = 128, seed: int = 0) -> List[Dict]:
    """Two images: one with two boxes (small and large), one with no box at all."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, width, generator=generator) * 255 for _ in range(2)]
    return [
        {
            "image": images[0],
            "instances": instances((height, width), [[8, 8, 40, 30], [20, 10, 120, 90]], [0, 2]),
        },
        {"image": images[1], "instances": instances((height, width), [], [])},
    ]
