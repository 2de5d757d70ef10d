"""The FCOS head: two conv towers shared across pyramid levels, plus class, box and centerness outputs.

Module names are part of the checkpoint contract (docs/MODEL.md, "Network"): ``cls_subnet`` and
``bbox_subnet`` are single ``nn.Sequential``s of [conv, norm, ReLU] so that convs sit at indices
0, 3, 6, 9 as in the seed, cvpods and (after renaming) official FCOS checkpoints.
With ``USE_DCN_IN_TOWER`` the last conv of each tower is a ``ModulatedDeformConv2d`` whose
``weight``/``bias`` keep the plain conv's keys.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn

from .deform_conv import ModulatedDeformConv2d


class Scale(nn.Module):
    """A learnable scalar per level; stored as a 1-element tensor (key ``scales.{l}.scale``)."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value], dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


# HEAD_NORM -> detectron2's ``get_norm`` name. "SyncBN" is detectron2's NaiveSyncBatchNorm: it syncs
# statistics across processes with any torch.distributed backend (gloo on CPU included) and is plain
# BN in a single process; get_norm's own "SyncBN" is torch's SyncBatchNorm, which needs CUDA.
_GET_NORM_NAMES = {"GN": "GN", "BN": "BN", "SyncBN": "naiveSyncBN", "": ""}


def _norm_layer(norm: str, channels: int) -> nn.Module:
    """GN/BN/SyncBN/none for the towers; "none" is an Identity so the convs keep their indices."""
    if norm not in _GET_NORM_NAMES:
        raise ValueError(
            f"MODEL.FCOS.HEAD_NORM: unknown norm {norm!r}; choose one of {list(_GET_NORM_NAMES)}"
        )
    return get_norm(_GET_NORM_NAMES[norm], channels) or nn.Identity()


def _tower(num_convs: int, channels: int, norm: str, deformable_last: bool) -> nn.Sequential:
    """[conv, norm, ReLU] x num_convs; the last conv deformable if asked (USE_DCN_IN_TOWER)."""
    layers: List[nn.Module] = []
    for i in range(num_convs):
        if deformable_last and i == num_convs - 1:
            conv: nn.Module = ModulatedDeformConv2d(channels, channels, 3)
        else:
            conv = nn.Conv2d(channels, channels, 3, 1, 1)
        layers += [conv, _norm_layer(norm, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Per level: class logits (N, K, H, W), box distances (N, 4, H, W) in input pixels, centerness logits."""

    def __init__(
        self,
        input_shape: Sequence[ShapeSpec],
        *,
        num_classes: int,
        num_convs: int,
        prior_prob: float,
        fpn_strides: Sequence[int],
        norm: str,
        centerness_on_reg: bool,
        norm_reg_targets: bool,
        use_dcn_in_tower: bool = False,
    ) -> None:
        super().__init__()
        channels = input_shape[0].channels
        self.fpn_strides = list(fpn_strides)
        self.centerness_on_reg = centerness_on_reg
        self.norm_reg_targets = norm_reg_targets

        self.cls_subnet = _tower(num_convs, channels, norm, use_dcn_in_tower)
        self.bbox_subnet = _tower(num_convs, channels, norm, use_dcn_in_tower)
        self.cls_score = nn.Conv2d(channels, num_classes, 3, 1, 1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(channels, 1, 3, 1, 1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.fpn_strides])

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, ModulatedDeformConv2d)):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.constant_(module.bias, 0.0)
            elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)
        # Start every class near probability PRIOR_PROB so the focal loss is stable at iteration 0.
        nn.init.constant_(self.cls_score.bias, -math.log((1.0 - prior_prob) / prior_prob))
        # The loop above also drew the offset convs: deformable convs start as the plain conv.
        for module in self.modules():
            if isinstance(module, ModulatedDeformConv2d):
                module.reset_offset()

    def forward(
        self, features: Sequence[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        logits, box_reg, centerness = [], [], []
        for level, feature in enumerate(features):
            cls_feat = self.cls_subnet(feature)
            box_feat = self.bbox_subnet(feature)
            logits.append(self.cls_score(cls_feat))
            centerness.append(self.centerness(box_feat if self.centerness_on_reg else cls_feat))
            reg = self.scales[level](self.bbox_pred(box_feat))
            if self.norm_reg_targets:
                box_reg.append(F.relu(reg) * self.fpn_strides[level])
            else:
                # fp32: exp overflows float16 above ln(65504) ~ 11.1, which an untrained or
                # diverging head can reach; fp32 only past 88, a distance of 1.6e38 pixels.
                box_reg.append(torch.exp(reg.float()))
        return logits, box_reg, centerness
