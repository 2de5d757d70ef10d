"""ResNet-FPN backbone for FCOS that builds only the pyramid levels the head uses.

Building P6/P7 when ``MODEL.FCOS.IN_FEATURES`` stops at P5 leaves parameters that never receive a
gradient, which is what made the seed fail under DistributedDataParallel ("Expected to have finished
reduction in the prior iteration"). Here the top block follows IN_FEATURES, and its input follows
``MODEL.FCOS.TOP_BLOCK_IN_FEATURE`` (C5 for the seed/cvpods checkpoints, P5 for official FCOS).
"""

from __future__ import annotations

from typing import Dict, Optional

import fvcore.nn.weight_init as weight_init
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from torch import Tensor, nn


class LastLevelP6(nn.Module):
    """P6 only (3x3 stride-2 conv), for heads that use P6 but not P7; key ``top_block.p6`` as in P6P7."""

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5") -> None:
        super().__init__()
        self.num_levels = 1
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)

    def forward(self, x: Tensor) -> list:
        return [self.p6(x)]


def _top_block(cfg: CfgNode, bottom_up_shapes: Dict[str, ShapeSpec]) -> Optional[nn.Module]:
    """The P6/P7 block IN_FEATURES needs, fed by C5 or P5 as TOP_BLOCK_IN_FEATURE says; None if unused.

    TOP_BLOCK_IN_FEATURE is only read when a top block is built, so a backbone cut before res5 needs no switch.
    """
    in_features = cfg.MODEL.FCOS.IN_FEATURES
    if "p6" not in in_features and "p7" not in in_features:
        return None
    in_feature = cfg.MODEL.FCOS.TOP_BLOCK_IN_FEATURE
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if in_feature == "p5":
        in_channels = out_channels
    elif in_feature == "res5":
        if "res5" not in bottom_up_shapes:
            raise ValueError(
                "MODEL.FCOS.TOP_BLOCK_IN_FEATURE: 'res5' feeds P6/P7 but MODEL.RESNETS.OUT_FEATURES "
                f"{sorted(bottom_up_shapes)} has no res5; add it, or use 'p5'"
            )
        in_channels = bottom_up_shapes["res5"].channels
    else:
        raise ValueError(
            f"MODEL.FCOS.TOP_BLOCK_IN_FEATURE: {in_feature!r}; choose 'res5' (seed/cvpods) or 'p5' (official FCOS)"
        )
    if "p7" in in_features:
        return LastLevelP6P7(in_channels, out_channels, in_feature=in_feature)
    return LastLevelP6(in_channels, out_channels, in_feature=in_feature)


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNet + FPN whose P6/P7 exist only if ``MODEL.FCOS.IN_FEATURES`` asks for them."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=_top_block(cfg, bottom_up.output_shape()),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
