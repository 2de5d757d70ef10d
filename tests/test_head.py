"""The FCOS head: output shapes, initialisation and the parameter names of the checkpoint contract."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from torch import nn

from fcos.head import FCOSHead

STRIDES = [8, 16, 32, 64, 128]


def head(**kwargs) -> FCOSHead:
    args = dict(
        num_classes=5,
        num_convs=4,
        prior_prob=0.01,
        fpn_strides=STRIDES,
        norm="GN",
        centerness_on_reg=False,
        norm_reg_targets=False,
    )
    args.update(kwargs)
    return FCOSHead([ShapeSpec(channels=64, stride=s) for s in STRIDES], **args)


def features(sizes=((16, 20), (8, 10), (4, 5), (2, 3), (1, 2))):
    torch.manual_seed(0)
    return [torch.randn(2, 64, h, w) for h, w in sizes]


def test_parameter_names_match_checkpoint_contract():
    names = set(head().state_dict())
    for tower in ("cls_subnet", "bbox_subnet"):
        for conv in (0, 3, 6, 9):
            assert {f"{tower}.{conv}.weight", f"{tower}.{conv}.bias"} <= names
            assert {f"{tower}.{conv + 1}.weight", f"{tower}.{conv + 1}.bias"} <= names  # GroupNorm
    for out in ("cls_score", "bbox_pred", "centerness"):
        assert {f"{out}.weight", f"{out}.bias"} <= names
    assert {f"scales.{i}.scale" for i in range(5)} <= names
    assert len(names) == 2 * 4 * 4 + 6 + 5


def test_output_shapes_per_level():
    logits, boxes, ctr = head()(features())
    for level, (h, w) in enumerate(((16, 20), (8, 10), (4, 5), (2, 3), (1, 2))):
        assert logits[level].shape == (2, 5, h, w)
        assert boxes[level].shape == (2, 4, h, w)
        assert ctr[level].shape == (2, 1, h, w)


def test_initialisation():
    h = head()
    assert h.cls_score.bias.tolist() == pytest.approx([-math.log(99)] * 5)
    convs = [m for m in h.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 11
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert weights.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(weights.mean().item()) < 1e-3
    assert all((m.bias == 0).all() for m in convs if m is not h.cls_score)
    gns = [m for m in h.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 8 and all((g.weight == 1).all() and (g.bias == 0).all() for g in gns)
    assert [s.scale.tolist() for s in h.scales] == [[1.0]] * 5
    assert h.scales[0].scale.shape == (1,)


def _constant_regression(h: FCOSHead, bias: float) -> None:
    nn.init.zeros_(h.bbox_pred.weight)
    nn.init.constant_(h.bbox_pred.bias, bias)


def test_regression_exp_and_normalised_targets():
    h = head()
    _constant_regression(h, math.log(3.0))
    _, boxes, _ = h(features())
    assert all(torch.allclose(b, torch.full_like(b, 3.0)) for b in boxes)
    h = head(norm_reg_targets=True)
    _constant_regression(h, 2.0)
    h.scales[1].scale.data.fill_(0.5)
    _, boxes, _ = h(features())
    assert boxes[0].unique().tolist() == pytest.approx([2.0 * 8])
    assert boxes[1].unique().tolist() == pytest.approx([2.0 * 0.5 * 16])
    _constant_regression(h, -2.0)
    assert all((b == 0).all() for b in h(features())[1])


@pytest.mark.parametrize("on_reg", [False, True])
def test_centerness_branch_follows_config(on_reg):
    h = head(centerness_on_reg=on_reg)
    # Silence the tower that should NOT feed centerness; its output must not change.
    other = h.cls_subnet if on_reg else h.bbox_subnet
    before = h(features())[2]
    for m in other.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 0.3)
    after = h(features())[2]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "norm,kind", [("BN", nn.BatchNorm2d), ("SyncBN", NaiveSyncBatchNorm), ("", nn.Identity)]
)
def test_other_norms(norm, kind):
    h = head(norm=norm)
    assert isinstance(h.cls_subnet[1], kind) and isinstance(h.bbox_subnet[10], kind)
    h.train()
    logits, _, _ = h(features())
    assert logits[0].shape == (2, 5, 16, 20)


def test_unknown_norm_names_the_key():
    with pytest.raises(ValueError, match="MODEL.FCOS.HEAD_NORM"):
        head(norm="LN")
