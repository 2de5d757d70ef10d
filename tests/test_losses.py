"""FCOS losses on tiny hand-computed tensors (docs/MODEL.md, "Losses")."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import build_model
from model_utils import batch, instances, small_cfg

from fcos.losses import fcos_losses, iou_loss

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
    args = dict(
        num_classes=2, focal_alpha=0.25, focal_gamma=2.0, iou_loss_type="linear_iou", norm_sync=True
    )
    args.update(overrides)
    return fcos_losses(**args)


def test_three_losses_hand_computed():
    # Three points: two foreground (class 0 and 1), one background. All logits 0 -> p = 0.5.
    logits = torch.zeros(3, 2, requires_grad=True)
    pred_deltas = ltrb([1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1])
    gt_deltas = ltrb([2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0])
    losses = _losses(
        pred_logits=logits,
        pred_deltas=pred_deltas,
        pred_centerness=torch.zeros(3),
        gt_classes=torch.tensor([0, 1, 2]),
        gt_deltas=gt_deltas,
        gt_centerness=torch.tensor([0.5, 1.0, 0.0]),
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
        pred_logits=torch.zeros(1, 2),
        pred_deltas=ltrb([1, 1, 1, 1]),
        pred_centerness=torch.zeros(1),
        gt_classes=torch.tensor([1]),
        gt_deltas=ltrb([2, 2, 2, 2]),
        gt_centerness=torch.tensor([0.25]),
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


def _softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def _iou_quality_losses(**overrides):
    # Same three points as test_three_losses_hand_computed; quality logits 1, -1 on the positives.
    args = dict(
        pred_logits=torch.zeros(3, 2),
        pred_deltas=ltrb([1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1]),
        pred_centerness=torch.tensor([1.0, -1.0, 3.0]),
        gt_classes=torch.tensor([0, 1, 2]),
        gt_deltas=ltrb([2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0]),
        gt_centerness=torch.tensor([0.5, 1.0, 0.0]),
        box_quality="iou",
    )
    args.update(overrides)
    return _losses(**args)


def test_iou_quality_hand_computed():
    losses = _iou_quality_losses()
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_quality"}
    # IoU targets 4/16 = 0.25 and 1; BCE-with-logits(z, t) = softplus(z) - t * z, summed / N_pos 2.
    expected = ((_softplus(1.0) - 0.25 * 1.0) + (_softplus(-1.0) + 1.0)) / 2
    assert losses["loss_quality"].item() == pytest.approx(expected, rel=1e-6)
    # Box loss unweighted (not by centerness 0.5 / 1.0) and divided by N_pos: (0.75 + 0) / 2.
    assert losses["loss_box_reg"].item() == pytest.approx(0.375, rel=1e-6)
    # The classification loss does not depend on the quality setting.
    ctrness = _iou_quality_losses(box_quality="ctrness")
    assert losses["loss_cls"].item() == ctrness["loss_cls"].item()
    assert ctrness["loss_box_reg"].item() == pytest.approx(0.75 * 0.5 / 1.5, rel=1e-5)


def test_iou_quality_target_is_detached():
    pred_deltas = ltrb([1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1]).requires_grad_()
    quality = torch.tensor([1.0, -1.0, 3.0], requires_grad=True)
    losses = _iou_quality_losses(pred_deltas=pred_deltas, pred_centerness=quality)
    losses["loss_quality"].backward()
    # The quality loss trains the branch only, never the box regression.
    assert pred_deltas.grad is None or torch.count_nonzero(pred_deltas.grad) == 0
    # d/dz = (sigmoid(z) - t) / N_pos on the positives, 0 on the background point.
    sig = torch.sigmoid(torch.tensor([1.0, -1.0]))
    expected = torch.stack([(sig[0] - 0.25) / 2, (sig[1] - 1.0) / 2, torch.tensor(0.0)])
    assert torch.allclose(quality.grad, expected, atol=1e-7)


def test_iou_quality_target_uses_the_decoded_boxes():
    # Decoded pred (3, 1, 1, 1) vs GT (1, 1, 1, 1): areas 8 and 4, intersection 4 -> IoU 0.5.
    # With BBOX_REG_WEIGHTS (2, 1, 1, 1) the weighted deltas are (6, 1, 1, 1) and (2, 1, 1, 1),
    # whose IoU would be 6 / 14; the target must be 0.5 (logit 2: logit 0 gives log 2 for any t).
    weights = (2.0, 1.0, 1.0, 1.0)
    losses = _losses(
        pred_logits=torch.zeros(1, 2),
        pred_deltas=ltrb([6, 1, 1, 1]),
        pred_centerness=torch.tensor([2.0]),
        gt_classes=torch.tensor([0]),
        gt_deltas=ltrb([2, 1, 1, 1]),
        gt_centerness=torch.tensor([0.5]),
        box_quality="iou",
        box_reg_weights=weights,
    )
    assert losses["loss_quality"].item() == pytest.approx(_softplus(2.0) - 0.5 * 2.0, rel=1e-6)


def test_unknown_box_quality_names_the_key():
    with pytest.raises(ValueError, match="MODEL.FCOS.BOX_QUALITY"):
        _iou_quality_losses(box_quality="centerness")
