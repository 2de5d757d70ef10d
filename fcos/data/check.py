"""Check a COCO-format detection dataset before training on it.

The command line is ``python dataset/check.py --ann_file X.json --image_dir DIR [--full]`` (exit 1 when
the dataset has errors, 0 when it has none; warnings are fine). ``train_net.py`` calls
:func:`check_coco_dataset`
before a custom training starts, because a bad annotation otherwise surfaces minutes into training as an
unrelated-looking crash (a KeyError in the loader, a size mismatch on one image, a NaN loss from a
zero-size box) or, worse, silently trains on the wrong data.

Errors are what breaks detectron2 or makes the data wrong: a file that is not COCO JSON, missing or
unreadable images, image sizes that disagree with the file (detectron2 stops on those), unknown
category or image ids, duplicate ids, ``ignore: 1`` (detectron2's loader rejects it). Warnings are
what works but deserves a look: boxes that stick out of their image (detectron2 clips them),
category ids that are not 1..K (detectron2 maps them), images without annotations (what happens to
them depends on the config: ``train_net.py`` passes its own ``empty_images_note``), annotations
without ``area`` (COCO evaluation needs it).

Degenerate boxes (no area inside their image: zero or negative size, or entirely outside it; see
:func:`degenerate_box`) are mis-clicks that real datasets have a few of. Training drops them, so by
default they are ONE warning that counts them and names a few; ``strict_boxes`` (``--strict``,
``DATASETS.STRICT_BOXES True``) makes each of them an error, which refuses the dataset.

The default reads only image headers (size and EXIF orientation), which is fast; ``--full`` decodes
every image and so also finds truncated files.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from .common import IMAGE_ERRORS, format_table, image_size, progress
from .sizes import SizeStats, SizeSuggestion, format_sizes, size_stats, suggest_sizes

ReadImages = bool | Literal["header"]

# What happens to images without annotations when no config is known (the command line).
EMPTY_IMAGES_NOTE = (
    "detectron2 drops them from training when DATALOADER.FILTER_EMPTY_ANNOTATIONS is True "
    "(its default) and trains on them as images without objects when it is False"
)

# Box coordinates may exceed the image by float rounding without being wrong.
_OUTSIDE_TOLERANCE = 1e-3
# How many degenerate boxes the one warning names.
_NAMED_DEGENERATE = 3


def degenerate_box(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    width: float | None = None,
    height: float | None = None,
) -> str | None:
    """Why an ``(x0, y0, x1, y1)`` box has no area inside its ``width`` x ``height`` image, or None.

    The one definition of "degenerate", shared by this checker and training's loader (which drops
    such boxes): they give FCOS no positive location and a zero-size regression target.
    """
    if x1 <= x0 or y1 <= y0:
        return "zero or negative size"
    if width is None or height is None:
        return None
    if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
        return f"entirely outside the {width}x{height} image"
    return None


@dataclass
class Report:
    """Outcome of :func:`check_coco_dataset`.

    ``errors`` and ``warnings`` are one-line messages naming the file and the field; ``summary`` holds
    the counts shown in the table: ``images``, ``annotations``, ``categories`` (name -> annotation
    count), ``images_without_annotations``, ``errors``, ``warnings``.
    """

    ann_file: str
    # False when the file itself could not be read as COCO JSON (``errors`` then says why).
    readable: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    sizes: SizeStats | None = None
    strides: tuple[int, ...] = ()
    suggestion: SizeSuggestion | None = None

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed): the dataset can be trained on."""
        return not self.errors

    def format(self, max_lines: int = 20) -> str:
        """Errors and warnings (at most ``max_lines`` of each), then the summary table and a verdict."""
        parts: list[str] = []
        for title, lines in (("errors", self.errors), ("warnings", self.warnings)):
            if lines:
                parts.append(f"{title} ({len(lines)}):")
                parts += [f"  {line}" for line in lines[:max_lines]]
                if len(lines) > max_lines:
                    parts.append(f"  ... and {len(lines) - max_lines} more")
        parts.append(format_table(("", "count"), self._summary_rows()))
        if self.sizes is not None and self.sizes.short_sides.size:
            parts += format_sizes(self.sizes, self.suggestion, self.strides)
        verdict = "OK" if self.ok else f"FAILED: {len(self.errors)} error(s)"
        parts.append(f"{self.ann_file}: {verdict}")
        return "\n".join(parts)

    def _summary_rows(self) -> list[tuple[str, object]]:
        rows: list[tuple[str, object]] = [
            ("images", self.summary.get("images", "-")),
            ("annotations", self.summary.get("annotations", "-")),
        ]
        rows += [(f"  {name}", count) for name, count in self.summary.get("categories", {}).items()]
        rows += [
            ("images without annotations", self.summary.get("images_without_annotations", "-")),
            ("errors", len(self.errors)),
            ("warnings", len(self.warnings)),
        ]
        return rows


def check_coco_dataset(
    ann_file: str | Path,
    image_dir: str | Path,
    read_images: ReadImages = "header",
    strict_boxes: bool = False,
    empty_images_note: str = EMPTY_IMAGES_NOTE,
    strides: Sequence[int] = (),
) -> Report:
    """Check a COCO detection JSON and its images; never raises for bad input, reports it instead.

    ``read_images``: ``False`` only checks that image files exist, ``"header"`` (default, fast) also
    reads each header for the size, ``True`` decodes every image completely. ``empty_images_note``
    ends the warning about images without annotations: what the caller's config does with them.
    With ``strides`` (the FCOS levels of a config) the report suggests input sizes and level ranges.
    ``strict_boxes``: each degenerate box is an error instead of being counted in one warning.
    """
    report = Report(str(ann_file))
    data = _load_json(report)
    report.readable = data is not None
    if data is not None:
        _Checker(report, data, Path(image_dir), read_images, strict_boxes, empty_images_note).run()
        report.sizes = size_stats(data)
        report.strides = tuple(strides)
        report.suggestion = suggest_sizes(report.sizes, strides) if strides else None
    report.summary["errors"] = len(report.errors)
    report.summary["warnings"] = len(report.warnings)
    return report


def _json_type(value: object) -> str:
    """JSON's name for the type of a parsed value, for messages about wrong types."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(value), "a number")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_json(report: Report) -> dict[str, Any] | None:
    """The parsed top-level object when it has the three COCO lists; otherwise record why and return None."""
    name = report.ann_file
    try:
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        report.errors.append(f"{name}: cannot read: {e.strerror or e}")
        return None
    except UnicodeDecodeError as e:
        report.errors.append(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})")
        return None
    except json.JSONDecodeError as e:
        report.errors.append(f"{name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return None
    if not isinstance(data, dict):
        report.errors.append(
            f"{name}: top level is {_json_type(data)}, expected an object with "
            "'images', 'annotations' and 'categories' (not a COCO file)"
        )
        return None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            report.errors.append(f"{name}: missing key '{key}' (not a COCO detection file)")
        elif not isinstance(data[key], list):
            report.errors.append(f"{name}: '{key}' is {_json_type(data[key])}, expected an array")
    return None if report.errors else data


class _Checker:
    """Runs the per-record checks of one loaded COCO dict, appending to one report."""

    def __init__(
        self,
        report: Report,
        data: dict[str, Any],
        image_dir: Path,
        read_images: ReadImages,
        strict_boxes: bool,
        empty_images_note: str = EMPTY_IMAGES_NOTE,
    ):
        self.report = report
        self.empty_images_note = empty_images_note
        self.data = data
        self.image_dir = image_dir
        self.read_images = read_images
        self.strict_boxes = strict_boxes
        self.degenerate: list[str] = []  # "<where>.bbox [...]: <reason>" of each degenerate box
        self.name = report.ann_file
        self.categories: dict[int, str] = {}
        self.images: dict[Any, tuple[int, dict[str, Any]]] = {}  # image id -> (index, record)
        # Ids of records already reported as invalid: annotations that use them are not reported again.
        self.rejected_categories: set[Any] = set()
        self.rejected_images: set[Any] = set()

    def error(self, message: str) -> None:
        self.report.errors.append(f"{self.name}: {message}")

    def run(self) -> None:
        self._check_categories()
        self._check_image_records()
        annotated = self._check_annotations()
        empty = [
            record["file_name"]
            for image_id, (_, record) in self.images.items()
            if image_id not in annotated
        ]
        if empty:
            examples = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
            self.report.warnings.append(
                f"{self.name}: {len(empty)} image(s) without annotations ({examples}); "
                f"{self.empty_images_note}"
            )
        self.report.summary.update(
            images=len(self.data["images"]), images_without_annotations=len(empty)
        )
        self._check_image_files()

    def _check_categories(self) -> None:
        for i, cat in enumerate(self.data["categories"]):
            where = f"categories[{i}]"
            if not isinstance(cat, dict):
                self.error(f"{where} is {_json_type(cat)}, expected an object")
                continue
            cat_id, name = cat.get("id"), cat.get("name")
            if not _is_int(cat_id):
                self.error(f"{where}.id: expected an integer, got {cat_id!r}")
            elif not isinstance(name, str) or not name:
                self.error(f"{where}.name: expected a non-empty string, got {name!r}")
                self.rejected_categories.add(cat_id)
            elif cat_id in self.categories:
                self.error(
                    f"{where}: duplicate category id {cat_id} ({self.categories[cat_id]!r} and {name!r})"
                )
            else:
                self.categories[cat_id] = name
        if not self.data["categories"]:
            self.error("'categories' is empty")
        ids = sorted(self.categories)
        if ids and ids != list(range(1, len(ids) + 1)):
            shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
            self.report.warnings.append(
                f"{self.name}: category ids are not 1..{len(ids)} ({shown}); "
                "fine, detectron2 maps them to contiguous ids"
            )

    def _check_image_records(self) -> None:
        for i, image in enumerate(self.data["images"]):
            where = f"images[{i}]"
            if not isinstance(image, dict):
                self.error(f"{where} is {_json_type(image)}, expected an object")
                continue
            image_id, file_name = image.get("id"), image.get("file_name")
            if not (_is_int(image_id) or isinstance(image_id, str)):
                self.error(f"{where}.id: expected an integer, got {image_id!r}")
                continue
            if not isinstance(file_name, str) or not file_name:
                self.error(f"{where}.file_name: expected a non-empty string, got {file_name!r}")
                self.rejected_images.add(image_id)
                continue
            bad_size = [
                k
                for k in ("width", "height")
                if not (_is_number(image.get(k)) and image[k] > 0 and float(image[k]).is_integer())
            ]
            if bad_size:
                key = bad_size[0]
                self.error(
                    f"{where}.{key} ({file_name}): expected a positive integer, got {image.get(key)!r}"
                )
                self.rejected_images.add(image_id)
                continue
            if image_id in self.images:
                first = self.images[image_id][1]["file_name"]
                self.error(f"{where}: duplicate image id {image_id!r} ({first} and {file_name})")
                continue
            self.images[image_id] = (i, image)

    def _check_annotations(self) -> set[Any]:
        """Check every annotation; return the ids of images that have at least one valid annotation."""
        annotated: set[Any] = set()
        seen_ids: dict[Any, int] = {}
        per_category: Counter[int] = Counter()
        outside: list[str] = []
        without_area = 0
        for i, ann in enumerate(self.data["annotations"]):
            where = f"annotations[{i}]"
            if not isinstance(ann, dict):
                self.error(f"{where} is {_json_type(ann)}, expected an object")
                continue
            ann_id = ann.get("id")
            if not (_is_int(ann_id) or isinstance(ann_id, str)):
                self.error(f"{where}.id: expected an integer, got {ann_id!r}")
                continue
            if ann_id in seen_ids:
                self.error(
                    f"{where}: duplicate annotation id {ann_id!r} (also annotations[{seen_ids[ann_id]}])"
                )
                continue
            seen_ids[ann_id] = i
            image_id = ann.get("image_id")
            valid_id = _is_int(image_id) or isinstance(image_id, str)
            if valid_id and image_id in self.rejected_images:
                continue
            if not valid_id or image_id not in self.images:
                self.error(f"{where}.image_id (id {ann_id!r}): no image with id {image_id!r}")
                continue
            image = self.images[image_id][1]
            where = f"{where} (id {ann_id!r}, image {image['file_name']})"
            category_id = ann.get("category_id")
            if _is_int(category_id) and category_id in self.rejected_categories:
                continue
            if not _is_int(category_id) or category_id not in self.categories:
                self.error(f"{where}.category_id: unknown category id {category_id!r}")
                continue
            if ann.get("ignore", 0) != 0:
                self.error(
                    f"{where}.ignore is {ann['ignore']!r}: detectron2 does not support 'ignore'; "
                    "use iscrowd=1 to have COCO evaluation ignore a box"
                )
                continue
            box_state = self._check_box(ann.get("bbox"), where, image)
            if box_state == "bad":
                continue
            if box_state == "sticks out":
                outside.append(where)
            if "area" not in ann:
                without_area += 1
            per_category[category_id] += 1
            annotated.add(image_id)
        self._report_degenerate()
        if outside:
            self.report.warnings.append(
                f"{self.name}: {len(outside)} box(es) extend beyond their image, e.g. "
                f"{outside[0]}; detectron2 clips them"
            )
        if without_area:
            self.report.warnings.append(
                f"{self.name}: {without_area} annotation(s) without 'area'; "
                "COCO evaluation (pycocotools) needs it"
            )
        self.report.summary["annotations"] = len(self.data["annotations"])
        self.report.summary["categories"] = {
            self.categories[c]: per_category[c] for c in sorted(self.categories)
        }
        return annotated

    def _report_degenerate(self) -> None:
        """Each degenerate box as an error (strict), or all of them as one warning naming a few."""
        if self.strict_boxes:
            for line in self.degenerate:
                self.error(line)
            return
        if self.degenerate:
            named = "; ".join(self.degenerate[:_NAMED_DEGENERATE])
            more = len(self.degenerate) - _NAMED_DEGENERATE
            self.report.warnings.append(
                f"{self.name}: {len(self.degenerate)} degenerate box(es) with no area inside their "
                f"image, which training drops: {named}"
                + (f"; and {more} more" if more > 0 else "")
                + " (DATASETS.STRICT_BOXES True / dataset/check.py --strict refuse them)"
            )

    def _check_box(
        self, bbox: object, where: str, image: dict[str, Any]
    ) -> Literal["ok", "sticks out", "bad"]:
        """Check one ``[x, y, w, h]`` box against its image; records errors and degenerate boxes."""
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            self.error(
                f"{where}.bbox: expected [x, y, width, height] of finite numbers, got {bbox!r}"
            )
            return "bad"
        x, y, w, h = bbox
        width, height = image["width"], image["height"]
        reason = degenerate_box(x, y, x + w, y + h, width, height)
        if reason is not None:
            self.degenerate.append(f"{where}.bbox {bbox}: {reason}")
            return "bad"
        tol = _OUTSIDE_TOLERANCE
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            return "sticks out"
        return "ok"

    def _check_image_files(self) -> None:
        records = list(self.images.values())
        for i, image in progress(records, len(records), "checking images"):
            path = self.image_dir / image["file_name"]
            where = f"(images[{i}], id {image['id']!r})"
            if self.read_images is False:
                if not path.is_file():
                    self.report.errors.append(f"{path}: image file missing {where}")
                continue
            try:
                actual = image_size(path, decode=self.read_images is True)
            except FileNotFoundError:
                self.report.errors.append(f"{path}: image file missing {where}")
                continue
            except IMAGE_ERRORS as e:
                self.report.errors.append(f"{path}: cannot read the image {where}: {e}")
                continue
            expected = (int(image["width"]), int(image["height"]))
            if actual != expected:
                hint = (
                    " (width and height swapped: EXIF orientation?)"
                    if actual == expected[::-1]
                    else ""
                )
                self.report.errors.append(
                    f"{path}: the file is {actual[0]}x{actual[1]} but {self.name} says "
                    f"{expected[0]}x{expected[1]} {where}{hint}"
                )
