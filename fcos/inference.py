"""FCOS decoding for both flavours (docs/MODEL.md, "Decoding").

Candidates per level: the seed/cvpods order sorts all H*W*K class probabilities, keeps the first
min(TOPK_CANDIDATES_TEST, H*W) and drops prob <= threshold; the official order keeps prob >
threshold, then the top TOPK_CANDIDATES_TEST by prob * centerness. Post-processing: the seed runs
detectron2's class-aware NMS and keeps the first DETECTIONS_PER_IMAGE; the official code clips to
the input, removes small boxes, runs maskrcnn-benchmark's class-aware NMS with "+1" pixel areas and
keeps every detection scoring at least the DETECTIONS_PER_IMAGE-th best.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from torch import Tensor


def decode_boxes(deltas: Tensor, points: Tensor, weights: Sequence[float]) -> Tensor:
    """(l, t, r, b) / weights around (x, y) -> (x - l, y - t, x + r, y + b)."""
    deltas = deltas / deltas.new_tensor(weights)
    return torch.cat((points - deltas[:, :2], points + deltas[:, 2:]), dim=1)


def seed_topk(probs: Tensor, score_thresh: float, num_topk: int) -> Tuple[Tensor, Tensor]:
    """The seed's "sort everything, keep ``num_topk``, then threshold" on flat probabilities.

    Returns flat indices and probabilities, by decreasing probability. Thresholding first selects
    the same set without sorting every value: each value above the threshold is strictly greater
    than each value below it, so the first ``num_topk`` of the full sort are the values above the
    threshold when there are at most ``num_topk`` of them, and otherwise the ``num_topk`` largest of
    them. That set is unique unless equal values straddle the cut; then which of them the seed keeps
    depends on the tie order of ``torch.sort`` over all values (not a stable sort), so that case
    runs the seed's full sort. Among kept values that are exactly equal the order may differ from
    the seed's; it matters only for detections with exactly equal final scores.
    """
    above = torch.nonzero(probs > score_thresh, as_tuple=True)[0]
    values, order = probs[above].sort(descending=True)
    if len(values) > num_topk:
        if num_topk > 0 and values[num_topk - 1] == values[num_topk]:
            values, indices = probs.sort(descending=True)
            values, indices = values[:num_topk], indices[:num_topk]
            keep = values > score_thresh
            return indices[keep], values[keep]
        values, order = values[:num_topk], order[:num_topk]
    return above[order], values


def select_candidates(
    logits: Tensor, centerness: Tensor, *, score_thresh: float, topk: int, topk_first: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """Candidates of one level of one image.

    Args:
        logits: (H*W, K) class logits; centerness: (H*W,) logits.
        topk_first: True = seed order (top min(topk, H*W) class probs, then the threshold),
            False = official (threshold, then the top ``topk`` by prob * centerness).
    Returns:
        point indices, class indices, final scores sqrt(prob * sigmoid(centerness)).
    """
    probs = logits.sigmoid()
    if topk_first:
        num_classes = logits.shape[1]
        flat_idx, prob = seed_topk(probs.flatten(), score_thresh, min(topk, logits.shape[0]))
        point_idx, class_idx = flat_idx // num_classes, flat_idx % num_classes
        return point_idx, class_idx, torch.sqrt(prob * centerness.sigmoid()[point_idx])
    point_idx, class_idx = torch.nonzero(probs > score_thresh, as_tuple=True)
    prob = probs[point_idx, class_idx]
    ctr = centerness.sigmoid()[point_idx]
    ranking = prob * ctr
    if len(ranking) > topk:
        keep = ranking.topk(topk, sorted=False).indices
        point_idx, class_idx, prob, ctr = point_idx[keep], class_idx[keep], prob[keep], ctr[keep]
    return point_idx, class_idx, torch.sqrt(prob * ctr)


def clip_legacy(boxes: Tensor, image_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """maskrcnn-benchmark's ``clip_to_image`` then ``remove_small_boxes(min_size=0)``.

    Coordinates are clamped to x in [0, W - 1], y in [0, H - 1] (its pixel-index convention), and a
    box is kept when its "+1" width and height, x1 - x0 + 1 and y1 - y0 + 1, are >= 0.

    Returns:
        the clipped boxes and a bool mask of the boxes to keep.
    """
    height, width = image_size
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    x0, x1 = x0.clamp(0, width - 1), x1.clamp(0, width - 1)
    y0, y1 = y0.clamp(0, height - 1), y1.clamp(0, height - 1)
    clipped = torch.stack((x0, y0, x1, y1), dim=1)
    keep = (clipped[:, 2] - clipped[:, 0] + 1 >= 0) & (clipped[:, 3] - clipped[:, 1] + 1 >= 0)
    return clipped, keep


def legacy_iou(boxes: Tensor) -> Tensor:
    """(N, N) IoU with maskrcnn-benchmark's "+1" areas, (x1 - x0 + 1) * (y1 - y0 + 1).

    The operations and their order are the official NMS kernel's, so the float32 values are too.
    """
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    width = (torch.min(x1[:, None], x1[None]) - torch.max(x0[:, None], x0[None]) + 1).clamp(min=0)
    height = (torch.min(y1[:, None], y1[None]) - torch.max(y0[:, None], y0[None]) + 1).clamp(min=0)
    inter = width * height
    return inter / (areas[:, None] + areas[None] - inter)


def _greedy_keep(suppresses: Tensor) -> Tensor:
    """Greedy NMS on a score-ordered (N, N) "i would suppress j" matrix (only j > i is read).

    The mask is built on the boxes' device; this O(N) walk runs on the CPU, as the official CUDA
    kernel's does.
    """
    suppresses = suppresses.triu(diagonal=1).cpu()
    removed = torch.zeros(len(suppresses), dtype=torch.bool)
    for i in range(len(suppresses)):
        if not removed[i]:
            removed |= suppresses[i]
    return ~removed


def legacy_batched_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float
) -> Tensor:
    """Class-aware NMS with "+1" areas (maskrcnn-benchmark's ``boxlist_ml_nms``).

    Boxes of different classes never suppress each other; within a class a box is removed when its
    "+1" IoU with a kept higher-scoring box is > ``iou_threshold``. Classes are processed one at a
    time on their original coordinates: a per-class coordinate offset (detectron2's
    ``batched_nms``) would round the coordinates and change the IoU values.

    Returns:
        kept indices by decreasing score.
    """
    order = scores.argsort(descending=True, stable=True)
    kept: List[Tensor] = []
    for cls in classes.unique():
        members = order[classes[order] == cls]
        suppresses = legacy_iou(boxes[members]) > iou_threshold
        kept.append(members[_greedy_keep(suppresses).to(members.device)])
    if not kept:
        return order
    keep = torch.cat(kept)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def top_detections_with_ties(scores: Tensor, max_detections: int) -> Tensor:
    """Bool mask of the scores >= the ``max_detections``-th largest (maskrcnn-benchmark's cut).

    The official code finds that score with ``kthvalue`` and keeps every score reaching it, so equal
    scores at the cut are all kept; ``max_detections`` <= 0 keeps everything.
    """
    if not 0 < max_detections < len(scores):
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(len(scores) - max_detections + 1).values
    return scores >= threshold


def image_candidates(
    logits: List[Tensor],
    deltas: List[Tensor],
    centerness: List[Tensor],
    points: List[Tensor],
    *,
    score_thresh: float,
    topk: int,
    topk_first: bool,
    box_weights: Sequence[float],
    postprocess: str = "seed",
    image_size: Tuple[int, int] = (0, 0),
) -> Tuple[Tensor, Tensor, Tensor]:
    """Pre-NMS candidates of one image over all levels: boxes (N, 4), scores (N,), classes (N,).

    Args:
        logits/deltas/centerness/points: one tensor per level, (H*W, K) / (H*W, 4) / (H*W,) / (H*W, 2).
        postprocess: "official" clips the boxes to ``image_size`` (H, W) of the network input and
            drops the ones ``clip_legacy`` removes; "seed" leaves them as decoded.
    """
    boxes_all, scores_all, classes_all = [], [], []
    for logits_l, deltas_l, ctr_l, points_l in zip(logits, deltas, centerness, points):
        point_idx, class_idx, scores = select_candidates(
            logits_l, ctr_l, score_thresh=score_thresh, topk=topk, topk_first=topk_first
        )
        boxes_all.append(decode_boxes(deltas_l[point_idx], points_l[point_idx], box_weights))
        scores_all.append(scores)
        classes_all.append(class_idx)
    boxes, scores, classes = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(classes_all)
    if postprocess == "official":
        boxes, keep = clip_legacy(boxes, image_size)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    return boxes, scores, classes


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    image_size: Tuple[int, int],
    *,
    nms_thresh: float,
    max_detections: int,
    postprocess: str = "seed",
) -> Instances:
    """Class-aware NMS over candidates, then the best ``max_detections``, by decreasing score.

    "seed": detectron2's ``batched_nms`` and the first ``max_detections``. "official": the "+1" IoU
    NMS and the official cut, which keeps equal scores at the cut (so possibly more detections).
    """
    if postprocess == "official":
        keep = legacy_batched_nms(boxes, scores, classes, nms_thresh)
        keep = keep[top_detections_with_ties(scores[keep], max_detections)]
    else:
        keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
    return Instances(
        image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep], pred_classes=classes[keep]
    )
