"""Folding frozen BatchNorms into convolutions (CPU channels-last inference) keeps the numbers."""
from __future__ import annotations

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model

from fcos.fast_inference import FoldedFrozenBNConv2d
from model_utils import small_cfg


def test_folded_backbone_matches_detectron2_arithmetic():
    cfg = small_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    folded = [m for m in model.backbone.modules() if isinstance(m, FoldedFrozenBNConv2d)]
    assert len(folded) == 20  # ResNet-18: stem + 16 block convs + 3 shortcuts
    for m in model.backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 2.0)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 4.0)
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        reference = model.backbone(x)
        fast = model.backbone(x.contiguous(memory_format=torch.channels_last))
    for name in reference:
        assert torch.allclose(fast[name], reference[name], rtol=1e-4, atol=1e-4 * reference[name].abs().max()), name


def test_single_folded_conv_uses_eps_and_bias():
    """Small variances make eps matter; a conv bias must be scaled too."""
    torch.manual_seed(0)
    norm = FrozenBatchNorm2d(4)
    norm.weight.uniform_(0.5, 2.0)
    norm.bias.normal_()
    norm.running_mean.normal_()
    norm.running_var.uniform_(1e-5, 1e-4)
    conv = Conv2d(3, 4, 3, padding=1, bias=True, norm=norm, activation=torch.relu)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        reference = conv(x)
        conv.__class__ = FoldedFrozenBNConv2d
        fast = conv(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-4)
