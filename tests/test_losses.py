"""FCOS losses on tiny hand-computed tensors (docs/MODEL.md, "Losses")."""
from __future__ import annotations

import math

import pytest
import torch

from detectron2.modeling import build_model
from fcos.losses import fcos_losses, iou_loss
from model_utils import batch, instances, small_cfg

LOG2 = math.log(2.0)
EPS = torch.finfo(torch.float32).eps


def ltrb(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_iou_losses_partial_overlap():
    # pred is a 2x2 box, target a 4x4 box, both centred on the point: IoU = 4 / 16.
    pred, target = ltrb([1, 1, 1, 1]), ltrb([2, 2, 2, 2])
    assert iou_loss(pred, target, "iou").item() == pytest.approx(-math.log(0.25), rel=1e-6)
    assert iou_loss(pred, target, "linear_iou").item() == pytest.approx(0.75, rel=1e-6)
    # Enclosing box == union, so GIoU == IoU here.
    assert iou_loss(pred, target, "giou").item() == pytest.approx(0.75, rel=1e-6)


def test_iou_losses_disjoint_boxes_use_enclosing_area_and_eps():
    # pred [-1,-2,1,0] (area 4), target [-2,0,0,1] (area 2): no overlap, union 6, enclosing 3x3 = 9.
    pred, target = ltrb([1, 2, 1, 0]), ltrb([2, 0, 0, 1])
    assert iou_loss(pred, target, "giou").item() == pytest.approx(1 + 3 / 9, rel=1e-6)
    assert iou_loss(pred, target, "linear_iou").item() == pytest.approx(1.0)
    assert iou_loss(pred, target, "iou").item() == pytest.approx(-math.log(EPS), rel=1e-6)


def test_iou_loss_perfect_match_is_zero():
    boxes = ltrb([3, 1, 2, 5], [1, 1, 1, 1])
    for kind in ("iou", "linear_iou", "giou"):
        assert iou_loss(boxes, boxes.clone(), kind).abs().max().item() < 1e-6


def test_unknown_iou_loss_type_names_the_key():
    with pytest.raises(ValueError, match="MODEL.FCOS.IOU_LOSS_TYPE"):
        iou_loss(ltrb([1, 1, 1, 1]), ltrb([1, 1, 1, 1]), "diou")


def _losses(**overrides):
    args = dict(num_classes=2, focal_alpha=0.25, focal_gamma=2.0, iou_loss_type="linear_iou", norm_sync=True)
    args.update(overrides)
    return fcos_losses(**args)


def test_three_losses_hand_computed():
    # Three points: two foreground (class 0 and 1), one background. All logits 0 -> p = 0.5.
    logits = torch.zeros(3, 2, requires_grad=True)
    pred_deltas = ltrb([1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1])
    gt_deltas = ltrb([2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0])
    losses = _losses(
        pred_logits=logits, pred_deltas=pred_deltas, pred_centerness=torch.zeros(3),
        gt_classes=torch.tensor([0, 1, 2]), gt_deltas=gt_deltas, gt_centerness=torch.tensor([0.5, 1.0, 0.0]),
    )
    # Focal at p=0.5, gamma 2: positive alpha*0.25*log2, negative (1-alpha)*0.25*log2.
    positive, negative = 0.25 * 0.25 * LOG2, 0.75 * 0.25 * LOG2
    # 2 positives + 4 negative (point, class) pairs, normalised by N_pos = 2.
    assert losses["loss_cls"].item() == pytest.approx((2 * positive + 4 * negative) / 2, rel=1e-5)
    # linear IoU: 0.75 (weight 0.5) and 0 (weight 1), normalised by the centerness sum 1.5.
    assert losses["loss_box_reg"].item() == pytest.approx(0.75 * 0.5 / 1.5, rel=1e-5)
    # BCE(0, 0.5) = BCE(0, 1) = log 2, summed over 2 positives / 2.
    assert losses["loss_centerness"].item() == pytest.approx(LOG2, rel=1e-5)


def test_normalizers_are_clamped_at_one():
    losses = _losses(
        pred_logits=torch.zeros(1, 2), pred_deltas=ltrb([1, 1, 1, 1]), pred_centerness=torch.zeros(1),
        gt_classes=torch.tensor([1]), gt_deltas=ltrb([2, 2, 2, 2]), gt_centerness=torch.tensor([0.25]),
    )
    # S_ctr = 0.25 is clamped to 1.
    assert losses["loss_box_reg"].item() == pytest.approx(0.75 * 0.25, rel=1e-5)


def test_no_foreground_losses_finite_and_every_parameter_gets_a_gradient():
    model = build_model(small_cfg())
    model.train()
    inputs = batch()
    for item in inputs:
        item["instances"] = instances(item["image"].shape[1:], [], [])
    losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"].item() > 0
    assert losses["loss_box_reg"].item() == 0 and losses["loss_centerness"].item() == 0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
