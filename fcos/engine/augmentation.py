"""``INPUT.COLOR_JITTER``: photometric training augmentation, which detectron2's config lacks.

A small dataset photographed in few places teaches the detector its lighting and colours; new
scenes differ in both. With ``INPUT.COLOR_JITTER.ENABLED``, every training image gets a random
brightness, contrast and saturation factor in ``[1 - INTENSITY, 1 + INTENSITY]`` (detectron2's
``RandomBrightness``/``RandomContrast``/``RandomSaturation``, after the geometric augmentations).
"""

from __future__ import annotations

from typing import List

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T


def add_color_jitter_config(cfg: CfgNode) -> None:
    cfg.INPUT.COLOR_JITTER = CfgNode()
    cfg.INPUT.COLOR_JITTER.ENABLED = False
    cfg.INPUT.COLOR_JITTER.INTENSITY = 0.4


def color_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """The photometric augmentations the config asks for (none unless enabled)."""
    if not cfg.INPUT.COLOR_JITTER.ENABLED:
        return []
    low, high = 1.0 - cfg.INPUT.COLOR_JITTER.INTENSITY, 1.0 + cfg.INPUT.COLOR_JITTER.INTENSITY
    return [
        T.RandomBrightness(low, high),
        T.RandomContrast(low, high),
        T.RandomSaturation(low, high),
    ]


def build_train_mapper(cfg: CfgNode) -> DatasetMapper:
    """detectron2's training DatasetMapper (resize, flip, crop as configured) plus colour jitter."""
    args = DatasetMapper.from_config(cfg, is_train=True)
    args["augmentations"] = list(args["augmentations"]) + color_augmentations(cfg)
    return DatasetMapper(**args)
