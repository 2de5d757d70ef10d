"""Image and object sizes of a COCO-format dataset, and the input sizes and FCOS level ranges they
call for.

A config written for other data fits the user's data badly in two silent ways: ``INPUT.*`` resizes
every image (e.g. 400 px images to 128 px, and the small objects vanish), and
``MODEL.FCOS.OBJECT_SIZES_OF_INTEREST`` sends all objects to one level while the others learn only
background. :func:`suggest_sizes` derives both from the data:

* test size: the training images' median shorter side (rounded to 16 px, at most
  ``MAX_TEST_SHORT``), i.e. the native resolution; the longer-side cap follows the widest image.
  Training uses the same size (single scale: on README's different-scene measurement, multi-scale
  training with crops reached a lower AP in the same schedule).
* level ranges: an object's largest regression distance at its centre is half its longer side (at
  the test size). Level ``i`` (stride ``s``) and the next are split at the ``i/n`` quantile of those
  distances, so the levels share the objects, clamped to ``[4 s, 8 s]``: the FCOS paper's ranges use
  ``8 s`` (64, 128, ... for strides 8, 16, ...), and below ``4 s`` the next level (stride ``2 s``)
  would get objects only about 4 of its points wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .common import format_table

MAX_TEST_SHORT = 800
MIN_TEST_SHORT = 64
SIZE_STEP = 16
TRAIN_SCALES = (1.0,)
PERCENTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True)
class SizeStats:
    """Per image: shorter and longer side; per box: longer side, its image's shorter side (px)."""

    short_sides: np.ndarray
    long_sides: np.ndarray
    box_sides: np.ndarray
    box_image_shorts: np.ndarray

    @property
    def relative_box_sides(self) -> np.ndarray:
        """Longer box side / shorter image side: the box size after any shortest-edge resize."""
        return self.box_sides / self.box_image_shorts


@dataclass(frozen=True)
class SizeSuggestion:
    """Config values for a dataset; ``opts()`` gives them as train_net.py command-line options."""

    min_size_train: tuple[int, ...]
    max_size_train: int
    min_size_test: int
    max_size_test: int
    object_sizes_of_interest: tuple[tuple[float, float], ...]
    level_shares: tuple[float, ...]

    def as_config(self) -> dict[str, Any]:
        """Full config key -> value."""
        return {
            "INPUT.MIN_SIZE_TRAIN": self.min_size_train,
            "INPUT.MAX_SIZE_TRAIN": self.max_size_train,
            "INPUT.MIN_SIZE_TEST": self.min_size_test,
            "INPUT.MAX_SIZE_TEST": self.max_size_test,
            "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST": [list(r) for r in self.object_sizes_of_interest],
        }

    def opts(self) -> list[str]:
        """The values as ``KEY VALUE`` command-line options (infinity written as 100000000)."""
        ranges = ", ".join(f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in self.object_sizes_of_interest)
        train = ", ".join(map(str, self.min_size_train)) + (
            "," if len(self.min_size_train) == 1 else ""
        )
        return [
            "INPUT.MIN_SIZE_TRAIN",
            f"({train})",
            "INPUT.MAX_SIZE_TRAIN",
            str(self.max_size_train),
            "INPUT.MIN_SIZE_TEST",
            str(self.min_size_test),
            "INPUT.MAX_SIZE_TEST",
            str(self.max_size_test),
            "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
            f"[{ranges}]",
        ]


def _fmt(value: float) -> str:
    return "100000000" if math.isinf(value) else str(int(value))


def size_stats(data: Mapping[str, Any]) -> SizeStats:
    """Sizes from a loaded COCO dict; malformed records are skipped (the checker reports them)."""
    short_of: dict[Any, float] = {}
    shorts, longs = [], []
    for image in data.get("images", []):
        if not isinstance(image, dict):
            continue
        try:
            width, height = float(image["width"]), float(image["height"])
        except (KeyError, TypeError, ValueError):
            continue
        if width > 0 and height > 0 and math.isfinite(width + height):
            if isinstance(image.get("id"), (int, str)):
                short_of[image["id"]] = min(width, height)
            shorts.append(min(width, height))
            longs.append(max(width, height))
    sides, box_image_short = [], []
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            continue
        image_id = ann.get("image_id")
        short = short_of.get(image_id) if isinstance(image_id, (int, str)) else None
        bbox = ann.get("bbox")
        if (
            short is None
            or ann.get("iscrowd", 0)
            or not (isinstance(bbox, list) and len(bbox) == 4)
        ):
            continue
        try:
            side = max(float(bbox[2]), float(bbox[3]))
        except (TypeError, ValueError):
            continue
        if side > 0 and math.isfinite(side):
            sides.append(side)
            box_image_short.append(short)
    return SizeStats(
        np.asarray(shorts), np.asarray(longs), np.asarray(sides), np.asarray(box_image_short)
    )


def _round_step(value: float) -> int:
    """Nearest multiple of SIZE_STEP (halves up), at least SIZE_STEP."""
    return max(SIZE_STEP, int(math.floor(value / SIZE_STEP + 0.5)) * SIZE_STEP)


def suggest_sizes(stats: SizeStats, strides: Sequence[int]) -> SizeSuggestion | None:
    """Input sizes and level ranges for FCOS levels of ``strides``; None without images or boxes."""
    if stats.short_sides.size == 0 or stats.relative_box_sides.size == 0:
        return None
    test_short = min(
        MAX_TEST_SHORT, max(MIN_TEST_SHORT, _round_step(float(np.median(stats.short_sides))))
    )
    widest = float(np.max(stats.long_sides / stats.short_sides))
    max_test = int(math.ceil(test_short * widest / SIZE_STEP)) * SIZE_STEP
    train = tuple(sorted({_round_step(test_short * f) for f in TRAIN_SCALES}))
    max_train = int(math.ceil(max(train) * widest / SIZE_STEP)) * SIZE_STEP
    distances = stats.relative_box_sides * test_short / 2
    n = len(strides)
    bounds = []
    for i, stride in enumerate(strides[:-1], start=1):
        quantile = float(np.quantile(distances, i / n))
        bounds.append(float(round(min(8 * stride, max(4 * stride, quantile)))))
    edges = [-1.0, *bounds, math.inf]
    ranges = tuple((edges[i], edges[i + 1]) for i in range(n))
    shares = tuple(float(np.mean((distances > lo) & (distances <= hi))) for lo, hi in ranges)
    return SizeSuggestion(train, max_train, test_short, max_test, ranges, shares)


def format_sizes(
    stats: SizeStats, suggestion: SizeSuggestion | None, strides: Sequence[int]
) -> list[str]:
    """Report lines: the percentile table, then the suggested config values for ``strides``."""
    lines = [format_table(("", *(f"p{p}" for p in PERCENTILES)), percentile_rows(stats))]
    if suggestion is not None:
        shares = ", ".join(
            f"stride {s}: {share:.0%}" for s, share in zip(strides, suggestion.level_shares)
        )
        lines.append(
            f"suggested for FCOS levels of strides {list(strides)} (objects per level: {shares}):"
        )
        opts = suggestion.opts()
        lines += [f"  {key} {value}" for key, value in zip(opts[::2], opts[1::2])]
    return lines


def percentile_rows(stats: SizeStats) -> list[tuple[str, ...]]:
    """Table rows (label, p5, p25, p50, p75, p95) of image sides and box longer sides, in pixels."""
    rows = []
    for label, values in (
        ("image shorter side", stats.short_sides),
        ("image longer side", stats.long_sides),
        ("box longer side", stats.box_sides),
        ("box longer side / image shorter side", stats.relative_box_sides),
    ):
        if values.size:
            fmt = "{:.3f}" if label.startswith("box longer side /") else "{:.0f}"
            rows.append((label, *(fmt.format(v) for v in np.percentile(values, PERCENTILES))))
    return rows
