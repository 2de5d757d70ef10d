"""Synthetic COCO ground truth and detections for timing and cross-checking COCO evaluation.

COCO evaluation time and its corner cases depend on the data's shape, not on pixels: how many
boxes per image and category, the small/medium/large mix, crowd regions, how many detections each
image has and how their scores interleave true and false positives. This module generates that
shape, seeded, at any scale: COCO val2017 has 5,000 images, 36,781 boxes over 80 categories
(41 % small, 34 % medium, 24 % large, about 1 % crowd, 48 images without objects), and detectors
report 100 detections per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

# (share of boxes, sqrt(area) range in px) for COCO's small / medium / large.
SIZE_MIX: Tuple[Tuple[float, Tuple[float, float]], ...] = (
    (0.41, (4.0, 32.0)),
    (0.34, (32.0, 96.0)),
    (0.25, (96.0, 480.0)),
)
IMAGE_SIZES = ((480, 640), (427, 640), (640, 480), (640, 640))  # (height, width), common in COCO


@dataclass(frozen=True)
class SyntheticCase:
    """Shape of a generated case; defaults are COCO val2017's."""

    num_images: int = 5000
    num_categories: int = 80
    mean_boxes: float = 7.36
    empty_image_fraction: float = 0.01
    crowd_fraction: float = 0.01
    detections_per_image: int = 100
    seed: int = 0


def _boxes(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """``count`` XYWH boxes inside the image with COCO's size mix and aspect ratios 1:3 to 3:1."""
    shares = np.array([share for share, _ in SIZE_MIX])
    bins = rng.choice(len(SIZE_MIX), size=count, p=shares / shares.sum())
    low = np.array([SIZE_MIX[b][1][0] for b in bins])
    high = np.array([min(SIZE_MIX[b][1][1], min(height, width)) for b in bins])
    side = np.exp(rng.uniform(np.log(low), np.log(high)))
    ratio = np.exp(rng.uniform(math.log(1 / 3), math.log(3), size=count))
    w = np.minimum(side * np.sqrt(ratio), width)
    h = np.minimum(side / np.sqrt(ratio), height)
    x = rng.uniform(0, width - w)
    y = rng.uniform(0, height - h)
    return np.stack([x, y, w, h], axis=1)


def _jittered(rng: np.random.Generator, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Detections of ``boxes``: centre and size noise of ~10 % of the size (IoUs mostly 0.5-1)."""
    x, y, w, h = boxes.T
    cx = x + w / 2 + rng.normal(0, 0.08, len(boxes)) * w
    cy = y + h / 2 + rng.normal(0, 0.08, len(boxes)) * h
    w = w * np.exp(rng.normal(0, 0.1, len(boxes)))
    h = h * np.exp(rng.normal(0, 0.1, len(boxes)))
    x0, y0 = np.clip(cx - w / 2, 0, width), np.clip(cy - h / 2, 0, height)
    x1, y1 = np.clip(cx + w / 2, 0, width), np.clip(cy + h / 2, 0, height)
    return np.stack([x0, y0, np.maximum(x1 - x0, 1.0), np.maximum(y1 - y0, 1.0)], axis=1)


def generate(case: SyntheticCase) -> Tuple[Dict, List[Dict]]:
    """(COCO-format ground truth dict, detection results list as ``COCO.loadRes`` takes them).

    Per image: a heavy-tailed number of boxes (negative binomial around ``mean_boxes``), random
    categories, some crowd regions; then exactly ``detections_per_image`` detections: most objects
    found once (10 % under a wrong category, some twice), a fifth of the hits with low scores among
    those of the random false positives, so that with many detections per category some hits rank
    below the 100th. The first image never has objects.
    """
    rng = np.random.default_rng(case.seed)
    images, annotations, detections = [], [], []
    shape = 1.5
    for image_id in range(1, case.num_images + 1):
        height, width = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        images.append(
            {"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": height, "width": width}
        )
        empty = image_id == 1 or rng.random() < case.empty_image_fraction
        count = 0 if empty else int(rng.negative_binomial(shape, shape / (shape + case.mean_boxes)))
        gt = _boxes(rng, count, height, width)
        gt_cats = rng.integers(1, case.num_categories + 1, size=count)
        crowd = rng.random(count) < case.crowd_fraction
        for box, cat, is_crowd in zip(gt, gt_cats, crowd):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(is_crowd),
                }
            )
        found = rng.random(count) < 0.85
        twice = found & (rng.random(count) < 0.15)
        hit_source = np.concatenate([gt[found], gt[twice]])
        hit_cats = np.concatenate([gt_cats[found], gt_cats[twice]])
        wrong = rng.random(len(hit_cats)) < 0.1
        hit_cats[wrong] = rng.integers(1, case.num_categories + 1, size=int(wrong.sum()))
        hits = _jittered(rng, hit_source, height, width)[: case.detections_per_image]
        hard = rng.random(len(hits)) < 0.2
        hit_scores = np.where(hard, rng.uniform(0, 0.3, len(hits)), rng.beta(4, 2, len(hits)))
        misses = case.detections_per_image - len(hits)
        boxes = np.concatenate([hits, _boxes(rng, misses, height, width)])
        miss_cats = rng.integers(1, case.num_categories + 1, size=misses)
        cats = np.concatenate([hit_cats[: len(hits)], miss_cats])
        scores = np.concatenate([hit_scores, rng.beta(1.5, 4, size=misses)])
        for box, cat, score in zip(boxes, cats, scores):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    categories = [{"id": c, "name": f"class_{c}"} for c in range(1, case.num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections
