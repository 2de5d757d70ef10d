"""FCOS losses (docs/MODEL.md, "Losses"): focal classification, IoU-family box regression,
centerness BCE.

``BOX_QUALITY "iou"`` (AdelaiDet's option) replaces the centerness target of the quality branch
by the IoU of each positive point's predicted box with its GT box, and drops the centerness
weighting of the box loss (see :func:`fcos_losses`).

Focal and GIoU come from fvcore; the IoU/linear-IoU variants on (l, t, r, b) distances are a few lines
that fvcore does not have. Normalizers may be averaged over processes (NORM_SYNC) so that every
process divides by the same batch-wide count, which makes N-process training match one process.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor

from .errors import NonFiniteLossError

EPS = torch.finfo(torch.float32).eps
BOX_QUALITIES = ("ctrness", "iou")


def ltrb_to_boxes(deltas: Tensor) -> Tensor:
    """(l, t, r, b) around a point -> (x0, y0, x1, y1) with the point at the origin."""
    return torch.cat((-deltas[:, :2], deltas[:, 2:]), dim=1)


def ltrb_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU in [0, 1] of the boxes given as (l, t, r, b) distances around the same point, per row."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = inter_w.clamp(min=0) * inter_h.clamp(min=0)
    return inter / (pred_area + target_area - inter).clamp(min=EPS)


def iou_loss(pred: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """Per-point loss between predicted and target (l, t, r, b) around the same point (unreduced).

    iou: -log(IoU); linear_iou: 1 - IoU; giou: 1 - GIoU (fvcore), each guarded by float32 eps.
    """
    if loss_type == "giou":
        return giou_loss(ltrb_to_boxes(pred), ltrb_to_boxes(target), reduction="none", eps=EPS)
    iou = ltrb_iou(pred, target)
    if loss_type == "iou":
        return -iou.clamp(min=EPS).log()
    if loss_type == "linear_iou":
        return 1.0 - iou
    raise ValueError(
        f"MODEL.FCOS.IOU_LOSS_TYPE: unknown loss {loss_type!r}; choose iou, linear_iou or giou"
    )


def check_finite_predictions(predictions: Dict[str, Tensor]) -> None:
    """Raise NonFiniteLossError in every process when a prediction is NaN/Inf in any process.

    Runs before the losses: fvcore's GIoU asserts ``x1 <= x2`` on the predicted boxes, which a NaN
    fails with an unrelated-looking ``AssertionError``. One ``isfinite().all()`` per tensor; with
    several processes one all-reduce of those flags (gloo/NCCL) makes every rank stop at the same
    iteration instead of leaving the others waiting in the next gradient all-reduce.
    """
    flags = torch.stack([~t.detach().isfinite().all() for t in predictions.values()]).float()
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size > 1:
        dist.all_reduce(flags)
    if not bool(flags.any()):
        return
    bad = [
        name if world_size == 1 else f"{name} (in {int(count)} of {world_size} processes)"
        for name, count in zip(predictions, flags.tolist())
        if count
    ]
    outputs = "output" if len(bad) == 1 else "outputs"
    raise NonFiniteLossError(f"the head's {', '.join(bad)} {outputs} became NaN or Inf")


def _synced_normalizer(value: Tensor, norm_sync: bool) -> float:
    """Batch-wide mean of a per-process count when syncing (all-reduce / world size), clamped at 1."""
    if norm_sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return max(float(value), 1.0)


def fcos_losses(
    *,
    pred_logits: Tensor,
    pred_deltas: Tensor,
    pred_centerness: Tensor,
    gt_classes: Tensor,
    gt_deltas: Tensor,
    gt_centerness: Tensor,
    num_classes: int,
    focal_alpha: float,
    focal_gamma: float,
    iou_loss_type: str,
    norm_sync: bool,
    box_quality: str = "ctrness",
    box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Dict[str, Tensor]:
    """The three FCOS losses over all points of the batch.

    Args:
        pred_logits: (M, K) class logits; pred_deltas: (M, 4); pred_centerness: (M,) logits of the
            quality branch (centerness or IoU).
        gt_classes: (M,) in [0, K], K = background; gt_deltas: (M, 4); gt_centerness: (M,).
        box_quality: "ctrness": the box loss is weighted by the centerness targets and normalised
            by their sum, the quality branch learns centerness (BCE / N_pos). "iou" (AdelaiDet): the
            box loss is unweighted and normalised by N_pos, the quality branch learns the IoU of the
            decoded predicted box with its GT box (BCE / N_pos; the target is detached, so this loss
            trains only the branch).
        box_reg_weights: the weights ``pred_deltas``/``gt_deltas`` are scaled by; the IoU target is
            taken on the decoded boxes (divided by them), which differs only for unequal weights.
    Raises:
        NonFiniteLossError: a prediction is NaN/Inf (see ``check_finite_predictions``).
    Returns:
        ``loss_cls``, ``loss_box_reg`` and ``loss_centerness`` ("ctrness") or ``loss_quality``
        ("iou"); with no foreground the last two are 0 but still depend on the predictions, so every
        parameter gets a (zero) gradient, as DDP requires.
    """
    # fp32 from upcast predictions (identity in fp32 training): under autocast the head's outputs
    # may be fp16/bf16, whose ~3 significant digits would round the focal and log terms away.
    pred_logits, pred_deltas, pred_centerness = (
        t.float() for t in (pred_logits, pred_deltas, pred_centerness)
    )
    check_finite_predictions(
        {
            "class logits (cls_score)": pred_logits,
            "box regression (bbox_pred)": pred_deltas,
            "centerness": pred_centerness,
        }
    )
    foreground = gt_classes != num_classes
    num_foreground = _synced_normalizer(foreground.sum().to(torch.float32), norm_sync)

    cls_targets = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(pred_logits.dtype)
    loss_cls = (
        sigmoid_focal_loss_jit(
            pred_logits, cls_targets, alpha=focal_alpha, gamma=focal_gamma, reduction="sum"
        )
        / num_foreground
    )
    pred_fg, gt_fg = pred_deltas[foreground], gt_deltas[foreground]
    box_losses = iou_loss(pred_fg, gt_fg, iou_loss_type)
    if box_quality == "iou":
        weights = pred_fg.new_tensor(box_reg_weights)
        iou_targets = ltrb_iou(pred_fg.detach() / weights, gt_fg / weights)
        loss_quality = (
            F.binary_cross_entropy_with_logits(
                pred_centerness[foreground], iou_targets, reduction="sum"
            )
            / num_foreground
        )
        loss_box_reg = box_losses.sum() / num_foreground
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg, "loss_quality": loss_quality}
    if box_quality != "ctrness":
        raise ValueError(
            f"MODEL.FCOS.BOX_QUALITY: unknown quality {box_quality!r}; "
            f"choose one of {list(BOX_QUALITIES)}"
        )
    ctr_targets = gt_centerness[foreground]
    ctr_sum = _synced_normalizer(ctr_targets.sum(), norm_sync)
    loss_box_reg = (box_losses * ctr_targets).sum() / ctr_sum
    loss_centerness = (
        F.binary_cross_entropy_with_logits(
            pred_centerness[foreground], ctr_targets, reduction="sum"
        )
        / num_foreground
    )
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg, "loss_centerness": loss_centerness}
