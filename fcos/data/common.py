"""Pieces shared by the dataset tools (VOC conversion, the checker) and training's dataset set-up.

The tools promise the same things to the user: a problem with the input is reported as one line naming
the file and the field (never a traceback), long loops show progress, and the run ends with a small
summary table. Keeping those pieces here gives every tool the same behaviour instead of copies that
drift apart. (Output files are written with :mod:`fcos.file_io`.)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Iterator, Sequence, TypeVar

from PIL import ExifTags, Image

T = TypeVar("T")

# What PIL raises for a missing, truncated, corrupt or absurdly large image file.
IMAGE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)

# EXIF orientations 5-8 swap width and height (transpose and the 90°/270° rotations).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class DatasetError(Exception):
    """Input problem that ends a run; ``str(error)`` is the message for the user, one line per problem."""


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Iterate over ``items`` while showing progress on stderr.

    tqdm is used when installed (it comes with fvcore); otherwise a plain counter is drawn. Either way
    nothing is drawn when stderr is not a terminal, so logs and test output stay clean.
    """
    try:
        from tqdm import tqdm
    except ImportError:
        yield from _plain_progress(items, total, desc)
        return
    yield from tqdm(items, total=total, desc=desc, disable=None, file=sys.stderr)


def _plain_progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Counter-style fallback for :func:`progress`: about a hundred updates over the whole run."""
    shown = sys.stderr.isatty()
    step = max(1, total // 100)
    done = 0
    for item in items:
        yield item
        done += 1
        if shown and (done % step == 0 or done == total):
            sys.stderr.write(f"\r{desc}: {done}/{total}")
            sys.stderr.flush()
    if shown:
        sys.stderr.write("\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render ``rows`` as a plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def image_size(path: str | os.PathLike[str], decode: bool = False) -> tuple[int, int]:
    """Return ``(width, height)`` of an image as detectron2 will see it.

    detectron2's ``read_image`` applies the EXIF orientation, so a photo stored 640x480 with a
    "rotate 90°" tag is used as 480x640; COCO sizes must match that or training stops with a size
    mismatch. Without ``decode`` only the header is read (fast); with it every pixel is decoded, which
    also finds truncated files. Raises one of ``IMAGE_ERRORS`` when the file is missing or not a
    readable image.
    """
    with Image.open(path) as image:
        if decode:
            image.load()
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def coco_category_names(ann_file: str | os.PathLike[str]) -> list[str]:
    """Names of a COCO file's categories in id order, which is detectron2's contiguous class order.

    Training (class count, dataset registration) and inference (class names of a custom model) both
    need them; a file without a usable ``categories`` list is a DatasetError naming it.
    """
    try:
        with open(ann_file, encoding="utf-8") as f:
            categories = json.load(f)["categories"]
        return [str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{ann_file}: cannot read the COCO 'categories' list ({err})") from err
