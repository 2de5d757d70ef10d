"""Target assignment on hand-computed cases (docs/MODEL.md, "Training targets")."""

from __future__ import annotations

import math

import pytest
import torch
from model_utils import instances

from fcos.targets import FCOSTargetAssigner, centerness_target, grid_points

INF = float("inf")


def assigner(sizes, strides, radius=0.0, chunk=1 << 21, num_classes=3):
    return FCOSTargetAssigner(
        num_classes=num_classes,
        strides=strides,
        sizes_of_interest=sizes,
        center_sampling_radius=radius,
        chunk_elements=chunk,
    )


def pts(*xy):
    return torch.tensor(xy, dtype=torch.float32).reshape(-1, 2)


def test_grid_points_offsets():
    zero = grid_points([(2, 3)], [8], 0.0, torch.device("cpu"))[0]
    half = grid_points([(2, 3)], [8], 0.5, torch.device("cpu"))[0]
    assert zero.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]]
    assert half.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_point_on_box_edge_is_background():
    points = grid_points([(3, 3)], [8], 0.0, torch.device("cpu"))
    t = assigner([[-1, INF]], [8])(points, [instances((24, 24), [[0, 0, 16, 16]], [1])])
    # Only (8, 8) lies strictly inside; (0, *), (16, *), (*, 0), (*, 16) are on the border.
    assert t.classes[0].tolist() == [3, 3, 3, 3, 1, 3, 3, 3, 3]
    assert t.deltas[0, 4].tolist() == [8, 8, 8, 8]
    assert t.centerness[0, 4].item() == pytest.approx(1.0)


def test_grid_offset_half_moves_positives():
    points = grid_points([(3, 3)], [8], 0.5, torch.device("cpu"))
    t = assigner([[-1, INF]], [8])(points, [instances((24, 24), [[0, 0, 16, 16]], [1])])
    # Points (4,4), (12,4), (4,12), (12,12) are inside the box now.
    assert t.classes[0].tolist() == [1, 1, 3, 1, 1, 3, 3, 3, 3]
    assert t.deltas[0, 0].tolist() == [4, 4, 12, 12]


def test_level_range_boundaries_are_inclusive():
    levels = [pts(64, 10), pts(64, 10)]
    sizes = [[-1, 64], [64, 128]]
    a = assigner(sizes, [8, 16])
    # max delta exactly 64: allowed on both levels (lo <= m <= hi).
    t = a(levels, [instances((20, 200), [[0, 0, 128, 20]], [2])])
    assert t.classes[0].tolist() == [2, 2]
    # max delta 65: too large for level 0, fine for level 1.
    t = a(levels, [instances((20, 200), [[0, 0, 129, 20]], [2])])
    assert t.classes[0].tolist() == [3, 2]
    # max delta exactly 128 is still level 1; 129 is nobody's.
    t = a(levels, [instances((20, 200), [[0, 0, 192, 20]], [2])])
    assert t.classes[0].tolist() == [3, 2]
    t = a(levels, [instances((20, 200), [[0, 0, 193, 20]], [2])])
    assert t.classes[0].tolist() == [3, 3]


def test_center_sampling_radius_and_clipping_to_box():
    a = assigner([[-1, INF]], [8], radius=1.5)  # radius 12 px around the centre
    # Box centre (50, 20): sampling region x in (38, 62), y in (8, 32).
    points = [pts((40, 16), (36, 16), (60, 30), (62, 16), (50, 7))]
    t = a(points, [instances((40, 100), [[0, 0, 100, 40]], [0])])
    assert t.classes[0].tolist() == [0, 3, 0, 3, 3]
    # Flat box: centre (50, 5), y range (-7, 17) is clipped to the box (0, 10).
    points = [pts((50, 9), (50, 12), (50, 0.5))]
    t = a(points, [instances((40, 100), [[0, 0, 100, 10]], [1])])
    assert t.classes[0].tolist() == [1, 3, 1]
    # Deltas stay those to the GT box, not to the sampling region.
    assert t.deltas[0, 0].tolist() == [50, 9, 50, 1]


@pytest.mark.parametrize("chunk", [1, 3, 1 << 21])
def test_overlaps_smallest_area_wins_and_ties_go_to_lowest_index(chunk):
    boxes = [[0, 0, 100, 100], [20, 20, 60, 60], [0, 0, 50, 50], [10, 10, 60, 60]]
    points = [pts((40, 40), (10, 10), (12, 45), (80, 80), (5, 5))]
    t = assigner([[-1, INF]], [8], chunk=chunk)(
        points, [instances((100, 100), boxes, [0, 1, 2, 0])]
    )
    # (40,40): boxes 0 (10000), 1 (1600), 2 (2500), 3 (2500) contain it -> 1.
    # (10,10): boxes 0 and 2 -> 2 (area 2500 < 10000); (10,10) is on box 3's border.
    # (12,45): boxes 0, 2, 3 (not 1) -> 2 and 3 tie at 2500 -> lowest index 2 (class 2, not 0).
    # (80,80): box 0 only. (5,5): boxes 0 and 2 -> 2.
    assert t.classes[0].tolist() == [1, 2, 2, 0, 2]
    assert t.deltas[0, 2].tolist() == [12, 45, 38, 5]


def test_image_without_boxes_is_all_background():
    points = grid_points([(4, 4), (2, 2)], [8, 16], 0.0, torch.device("cpu"))
    t = assigner([[-1, 64], [64, INF]], [8, 16])(points, [instances((32, 32), [], [])])
    assert t.classes.shape == (1, 20)
    assert (t.classes == 3).all()
    assert (t.centerness == 0).all() and (t.deltas == 0).all()


def test_centerness_target_hand_computed():
    deltas = torch.tensor([[8.0, 8.0, 8.0, 24.0], [2.0, 1.0, 6.0, 3.0]])
    expected = [math.sqrt(8 / 24), math.sqrt((2 / 6) * (1 / 3))]
    assert centerness_target(deltas).tolist() == pytest.approx(expected)


def _dense_reference(points, strides, sizes, boxes, classes, num_classes, radius):
    """Brute force over every (point, box) pair, straight from the spec's wording."""
    out = []
    for (x, y), s, (lo, hi) in zip(points, strides, sizes):
        best = None
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            d = (x - x0, y - y0, x1 - x, y1 - y)
            if radius > 0:
                cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, radius * s
                region = (max(cx - r, x0), max(cy - r, y0), min(cx + r, x1), min(cy + r, y1))
                inside = min(x - region[0], y - region[1], region[2] - x, region[3] - y) > 0
            else:
                inside = min(d) > 0
            if inside and lo <= max(d) <= hi:
                area = (x1 - x0) * (y1 - y0)
                if best is None or area < best[0]:
                    best = (area, j)
        out.append(num_classes if best is None else classes[best[1]])
    return out


@pytest.mark.parametrize("radius", [0.0, 1.5])
def test_chunked_matches_brute_force_on_random_boxes(radius):
    generator = torch.Generator().manual_seed(0)
    sizes = [[-1, 16], [16, 32], [32, INF]]
    strides = [4, 8, 16]
    points = grid_points([(16, 16), (8, 8), (4, 4)], strides, 0.0, torch.device("cpu"))
    xy = torch.rand(40, 2, generator=generator) * 56
    wh = torch.rand(40, 2, generator=generator) * 40 + 1
    boxes = torch.cat((xy, xy + wh), dim=1).round()
    classes = torch.randint(0, 3, (40,), generator=generator)
    t = assigner(sizes, strides, radius=radius, chunk=97)(
        points, [instances((64, 64), boxes.tolist(), classes.tolist())]
    )
    all_points = torch.cat(points).tolist()
    point_strides = [s for p, s in zip(points, strides) for _ in range(len(p))]
    point_sizes = [z for p, z in zip(points, sizes) for _ in range(len(p))]
    expected = _dense_reference(
        all_points, point_strides, point_sizes, boxes.tolist(), classes.tolist(), 3, radius
    )
    assert t.classes[0].tolist() == expected
    assert (t.classes[0] != 3).sum() > 20
