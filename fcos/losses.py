"""FCOS losses (FCOS_SPEC.md, "Losses"): focal classification, IoU-family box regression, centerness BCE.

Focal and GIoU come from fvcore; the IoU/linear-IoU variants on (l, t, r, b) distances are a few lines
that fvcore does not have. Normalizers may be averaged over processes (NORM_SYNC) so that every
process divides by the same batch-wide count, which makes N-process training match one process.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


def ltrb_to_boxes(deltas: Tensor) -> Tensor:
    """(l, t, r, b) around a point -> (x0, y0, x1, y1) with the point at the origin."""
    return torch.cat((-deltas[:, :2], deltas[:, 2:]), dim=1)


def iou_loss(pred: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """Per-point loss between predicted and target (l, t, r, b) around the same point (unreduced).

    iou: -log(IoU); linear_iou: 1 - IoU; giou: 1 - GIoU (fvcore), each guarded by float32 eps.
    """
    if loss_type == "giou":
        return giou_loss(ltrb_to_boxes(pred), ltrb_to_boxes(target), reduction="none", eps=EPS)
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = inter_w.clamp(min=0) * inter_h.clamp(min=0)
    iou = inter / (pred_area + target_area - inter).clamp(min=EPS)
    if loss_type == "iou":
        return -iou.clamp(min=EPS).log()
    if loss_type == "linear_iou":
        return 1.0 - iou
    raise ValueError(f"MODEL.FCOS.IOU_LOSS_TYPE: unknown loss {loss_type!r}; choose iou, linear_iou or giou")


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
) -> Dict[str, Tensor]:
    """The three FCOS losses over all points of the batch.

    Args:
        pred_logits: (M, K) class logits; pred_deltas: (M, 4); pred_centerness: (M,) logits.
        gt_classes: (M,) in [0, K], K = background; gt_deltas: (M, 4); gt_centerness: (M,).
    Returns:
        ``loss_cls``, ``loss_box_reg``, ``loss_centerness``; with no foreground the last two are 0 but
        still depend on the predictions, so every parameter gets a (zero) gradient, as DDP requires.
    """
    # fp32 from upcast predictions (identity in fp32 training): under autocast the head's outputs
    # may be fp16/bf16, whose ~3 significant digits would round the focal and log terms away.
    pred_logits, pred_deltas, pred_centerness = (
        t.float() for t in (pred_logits, pred_deltas, pred_centerness)
    )
    foreground = gt_classes != num_classes
    num_foreground = _synced_normalizer(foreground.sum().to(torch.float32), norm_sync)
    ctr_targets = gt_centerness[foreground]
    ctr_sum = _synced_normalizer(ctr_targets.sum(), norm_sync)

    cls_targets = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(pred_logits.dtype)
    loss_cls = sigmoid_focal_loss_jit(
        pred_logits, cls_targets, alpha=focal_alpha, gamma=focal_gamma, reduction="sum"
    ) / num_foreground
    box_losses = iou_loss(pred_deltas[foreground], gt_deltas[foreground], iou_loss_type)
    loss_box_reg = (box_losses * ctr_targets).sum() / ctr_sum
    loss_centerness = F.binary_cross_entropy_with_logits(
        pred_centerness[foreground], ctr_targets, reduction="sum"
    ) / num_foreground
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg, "loss_centerness": loss_centerness}
