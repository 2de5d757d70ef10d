"""Folding frozen BatchNorms into convolutions (CPU channels-last inference) keeps the numbers; the
switch MODEL.FCOS.FAST_CPU_INFERENCE False gives detectron2's exact arithmetic (full size: the slow
tests/test_fast_inference_full_size.py)."""

from __future__ import annotations

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from inference_helpers import random_fcos, tiny_cfg
from model_utils import small_cfg

from fcos.fast_inference import FoldedFrozenBNConv2d


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
        assert torch.allclose(
            fast[name], reference[name], rtol=1e-4, atol=1e-4 * reference[name].abs().max()
        ), name


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


def _frozen_bn_model(fast: bool):
    opts = ("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FCOS.FAST_CPU_INFERENCE", str(fast))
    model = random_fcos(tiny_cfg(*opts))
    generator = torch.Generator().manual_seed(1)
    for m in model.backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(0.5 + torch.rand(n, generator=generator))
            m.bias.copy_(0.2 * torch.randn(n, generator=generator))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


def test_fast_path_off_computes_exactly_as_detectron2():
    """FAST_CPU_INFERENCE False: no folded convolution, NCHW maps, and detections bit-identical to
    detectron2's own pipeline (DenseDetector pre-processing, modules as built,
    detector_postprocess). The fast path on the same weights differs by rounding, so the comparison
    can tell them apart."""
    off = _frozen_bn_model(fast=False)
    assert not any(isinstance(m, FoldedFrozenBNConv2d) for m in off.modules())
    inputs = [{"image": torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(2)) * 255}]
    with torch.no_grad():
        images = DenseDetector.preprocess_image(off, inputs)
        features = off.backbone(images.tensor)
        features = [features[name] for name in off.head_in_features]
        raw = off.forward_inference(images, features, off.head(features))[0]
        exact = detector_postprocess(raw, 128, 160)
        got = off(inputs)[0]["instances"]
        fast = _frozen_bn_model(fast=True)(inputs)[0]["instances"]
    assert len(exact) > 0
    assert torch.equal(got.pred_boxes.tensor, exact.pred_boxes.tensor)
    assert torch.equal(got.scores, exact.scores)
    assert torch.equal(got.pred_classes, exact.pred_classes)
    assert not torch.equal(fast.scores, exact.scores)
    assert torch.allclose(fast.scores, exact.scores, atol=1e-5)
