"""FCOS grid points and ground-truth assignment (docs/MODEL.md, "Training targets").

The reference assigns with dense (points x GT) tensors, whose memory grows with the number of GT boxes
(~4 GiB extra at 5,000 boxes on an 800x1333 image). Here GT boxes are visited in chunks that bound the
number of (point, box) pairs alive at once; the running "smallest area wins, lowest index on ties"
reduction gives exactly the reference's result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from detectron2.structures import Instances
from torch import Tensor


def grid_points(
    grid_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    offset: float,
    device: torch.device,
) -> List[Tensor]:
    """Input-pixel (x, y) of every feature-map cell, row-major, one (H*W, 2) tensor per level.

    Cell (i, j) at stride s sits at (j*s + offset*s, i*s + offset*s): offset 0 is the seed/cvpods grid,
    0.5 the official FCOS one (s//2 for even strides).
    """
    points = []
    for (height, width), stride in zip(grid_sizes, strides):
        start = offset * stride
        xs = torch.arange(width, dtype=torch.float32, device=device) * stride + start
        ys = torch.arange(height, dtype=torch.float32, device=device) * stride + start
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((x.reshape(-1), y.reshape(-1)), dim=1))
    return points


@dataclass
class FCOSTargets:
    """Per point of all levels concatenated: class in [0, K] (K = background), (l, t, r, b), centerness."""

    classes: Tensor
    deltas: Tensor
    centerness: Tensor


def ltrb_deltas(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances (x - x0, y - y0, x1 - x, y1 - y) from each point to the sides of its box."""
    return torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), dim=-1)


def centerness_target(deltas: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); 1 at the box centre, 0 on its border."""
    left_right = deltas[:, [0, 2]]
    top_bottom = deltas[:, [1, 3]]
    ratio_lr = (left_right.min(dim=1).values / left_right.max(dim=1).values).clamp(min=0)
    ratio_tb = (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values).clamp(min=0)
    return torch.sqrt(ratio_lr * ratio_tb)


class FCOSTargetAssigner:
    """Assigns each grid point to the smallest GT box that contains it (centre region) at its level."""

    def __init__(
        self,
        *,
        num_classes: int,
        strides: Sequence[int],
        sizes_of_interest: Sequence[Sequence[float]],
        center_sampling_radius: float,
        chunk_elements: int = 1 << 21,
    ) -> None:
        """
        Args:
            sizes_of_interest: one [lo, hi] per level; a point may regress a box on its level only if
                lo <= max(l, t, r, b) <= hi.
            center_sampling_radius: r > 0 restricts positives to centre +- r * stride (clipped to the box).
            chunk_elements: cap on points x GT pairs computed at once (memory bound; result unaffected).
        """
        self.num_classes = num_classes
        self.strides = list(strides)
        self.sizes_of_interest = [(float(lo), float(hi)) for lo, hi in sizes_of_interest]
        self.center_sampling_radius = center_sampling_radius
        self.chunk_elements = chunk_elements

    def _per_point(self, points_per_level: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Stride and [lo, hi] range of every point, levels concatenated."""
        counts = [len(p) for p in points_per_level]
        device = points_per_level[0].device

        def expand(values: Sequence[float]) -> Tensor:
            return torch.repeat_interleave(
                torch.tensor(values, dtype=torch.float32, device=device),
                torch.tensor(counts, device=device),
            )

        return (
            expand([float(s) for s in self.strides]),
            expand([lo for lo, _ in self.sizes_of_interest]),
            expand([hi for _, hi in self.sizes_of_interest]),
        )

    @torch.no_grad()
    def __call__(
        self, points_per_level: Sequence[Tensor], gt_instances: Sequence[Instances]
    ) -> FCOSTargets:
        """Targets for a batch; points are the same for every image (one padded grid)."""
        points = torch.cat(list(points_per_level), dim=0)
        strides, lo, hi = self._per_point(points_per_level)
        per_image = [
            self.assign_single(points, strides, lo, hi, inst.gt_boxes.tensor, inst.gt_classes)
            for inst in gt_instances
        ]
        return FCOSTargets(
            classes=torch.stack([t.classes for t in per_image]),
            deltas=torch.stack([t.deltas for t in per_image]),
            centerness=torch.stack([t.centerness for t in per_image]),
        )

    def _match(
        self, points: Tensor, strides: Tensor, lo: Tensor, hi: Tensor, boxes: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """(area of the matched box or inf, its index) per point, reducing over GT chunks."""
        num_points = len(points)
        best_area = torch.full((num_points,), math.inf, device=points.device)
        best_index = torch.zeros(num_points, dtype=torch.long, device=points.device)
        chunk = max(1, self.chunk_elements // max(1, num_points))
        x, y = points[:, 0:1], points[:, 1:2]
        for start in range(0, len(boxes), chunk):
            b = boxes[start : start + chunk]
            x0, y0, x1, y1 = b.unbind(dim=1)
            left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
            max_delta = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
            if self.center_sampling_radius > 0:
                radius = strides[:, None] * self.center_sampling_radius
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                inside = (
                    torch.minimum(
                        torch.minimum(
                            x - torch.maximum(cx - radius, x0), y - torch.maximum(cy - radius, y0)
                        ),
                        torch.minimum(
                            torch.minimum(cx + radius, x1) - x, torch.minimum(cy + radius, y1) - y
                        ),
                    )
                    > 0
                )
            else:
                inside = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0
            eligible = inside & (max_delta >= lo[:, None]) & (max_delta <= hi[:, None])
            area = ((x1 - x0) * (y1 - y0)).expand(num_points, -1)
            area = torch.where(eligible, area, torch.full_like(area, math.inf))
            chunk_area, chunk_index = area.min(dim=1)
            better = chunk_area < best_area
            best_area = torch.where(better, chunk_area, best_area)
            best_index = torch.where(better, chunk_index + start, best_index)
        return best_area, best_index

    def assign_single(
        self,
        points: Tensor,
        strides: Tensor,
        lo: Tensor,
        hi: Tensor,
        boxes: Tensor,
        classes: Tensor,
    ) -> FCOSTargets:
        """Targets of one image; an image without GT boxes is all background."""
        num_points = len(points)
        if len(boxes) == 0:
            return FCOSTargets(
                classes=torch.full(
                    (num_points,), self.num_classes, dtype=torch.long, device=points.device
                ),
                deltas=points.new_zeros((num_points, 4)),
                centerness=points.new_zeros((num_points,)),
            )
        area, index = self._match(points, strides, lo, hi, boxes)
        foreground = torch.isfinite(area)
        deltas = ltrb_deltas(points, boxes[index])
        target_classes = torch.where(
            foreground, classes[index], torch.full_like(index, self.num_classes)
        )
        centerness = torch.where(foreground, centerness_target(deltas), torch.zeros_like(area))
        deltas = torch.where(foreground[:, None], deltas, torch.zeros_like(deltas))
        return FCOSTargets(classes=target_classes, deltas=deltas, centerness=centerness)
