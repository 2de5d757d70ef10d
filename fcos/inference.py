"""FCOS decoding (FCOS_SPEC.md, "Decoding") for both flavours.

Seed/cvpods: top-k of all H*W*K class probabilities, then drop prob <= threshold. Official FCOS: keep
prob > threshold, then top-k by prob * centerness. Both are computed threshold-first here: for the seed
order, "top-k then threshold" and "threshold then top-k by prob" select the same set (every candidate
above the threshold that is in the overall top-k is in the thresholded top-k and vice versa), and
thresholding first avoids sorting all H*W*K probabilities.
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


def select_candidates(
    logits: Tensor, centerness: Tensor, *, score_thresh: float, topk: int, topk_first: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """Candidates of one level of one image.

    Args:
        logits: (H*W, K) class logits; centerness: (H*W,) logits.
        topk_first: True = seed order (rank by class prob), False = official (rank by prob * centerness).
    Returns:
        point indices, class indices, final scores sqrt(prob * sigmoid(centerness)).
    """
    probs = logits.sigmoid()
    point_idx, class_idx = torch.nonzero(probs > score_thresh, as_tuple=True)
    prob = probs[point_idx, class_idx]
    ctr = centerness.sigmoid()[point_idx]
    ranking = prob if topk_first else prob * ctr
    if len(ranking) > topk:
        keep = ranking.topk(topk, sorted=False).indices
        point_idx, class_idx, prob, ctr = point_idx[keep], class_idx[keep], prob[keep], ctr[keep]
    return point_idx, class_idx, torch.sqrt(prob * ctr)


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Pre-NMS candidates of one image over all levels: boxes (N, 4), scores (N,), classes (N,).

    Args:
        logits/deltas/centerness/points: one tensor per level, (H*W, K) / (H*W, 4) / (H*W,) / (H*W, 2).
    """
    boxes_all, scores_all, classes_all = [], [], []
    for logits_l, deltas_l, ctr_l, points_l in zip(logits, deltas, centerness, points):
        point_idx, class_idx, scores = select_candidates(
            logits_l, ctr_l, score_thresh=score_thresh, topk=topk, topk_first=topk_first
        )
        boxes_all.append(decode_boxes(deltas_l[point_idx], points_l[point_idx], box_weights))
        scores_all.append(scores)
        classes_all.append(class_idx)
    return torch.cat(boxes_all), torch.cat(scores_all), torch.cat(classes_all)


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    image_size: Tuple[int, int],
    *,
    nms_thresh: float,
    max_detections: int,
) -> Instances:
    """Class-aware NMS over candidates, then the top ``max_detections`` by score."""
    keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
    return Instances(image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep], pred_classes=classes[keep])
