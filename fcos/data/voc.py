"""Pascal-VOC XML annotations -> one COCO-format dataset dict for detectron2.

The command line is ``dataset/voc2coco.py`` (the seed's path and flags). What the conversion does,
listed because each point changes the output:

* Geometry. VOC pixel coordinates are 1-based and inclusive: a box with xmin=1, xmax=W covers the whole
  image width. COCO boxes are 0-based continuous ``[x, y, w, h]``, so x = xmin - 1, y = ymin - 1,
  w = xmax - xmin + 1, h = ymax - ymin + 1, and area = w * h. Boxes are clipped to the image (and
  counted); xmax == xmin is a valid one-pixel box, xmax < xmin is an error.
* Image ids are 1..N in input order (sorted file names for a directory). The seed took them from the
  digits in file names, which collide (``a_1.jpg`` and ``b_1.jpg``); ``--extract_num_from_imgid`` is
  still accepted but ignored, with a warning.
* Difficult objects (``<difficult>1``) are kept as normal boxes by default, like the seed and like
  detectron2's own VOC loader: detectron2's data mapper drops ``iscrowd`` boxes during training, so
  marking them crowd would turn visible objects into background for the classifier. ``--difficult
  crowd`` writes them with ``iscrowd: 1`` instead, which makes COCO evaluation ignore them the way the
  official VOC evaluation ignores difficult objects: use it for the split you evaluate on. ``skip``
  leaves them out.
* Bad input never stops the run with a traceback: each problem is one line naming the file and the XML
  field, the bad object (or file) is skipped and counted, and ``--strict`` turns any such problem into
  an error that writes nothing. The JSON is written to a temporary file and renamed, so it is either
  complete or absent.
* Without ``--labels`` the label list is inferred (sorted unique names) and written next to the output
  as ``<output stem>_labels.txt``; pass that file as ``--labels`` for the other splits so that their
  category ids agree.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Sequence

from .common import (
    IMAGE_ERRORS,
    DatasetError,
    format_table,
    image_size,
    progress,
)

DifficultPolicy = Literal["keep", "crowd", "skip"]
DIFFICULT_POLICIES: tuple[DifficultPolicy, ...] = ("keep", "crowd", "skip")


@dataclass(frozen=True)
class Problem:
    """One skippable defect in the input: ``message`` names the file and field, ``scope`` what is lost."""

    xml_path: str
    message: str
    scope: Literal["object", "file"]

    def __str__(self) -> str:
        return self.message


class _SkipFile(Exception):
    """Raised while reading one XML file when the whole file has to be skipped; carries the message."""


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` as written in the XML: 1-based inclusive pixel coordinates, not yet converted."""

    index: int  # 1-based position among the file's <object> elements, as in "<object>[2]" messages
    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool


@dataclass(frozen=True)
class VocImage:
    """One parsed annotation file: the image it describes and its objects."""

    xml_path: str
    file_name: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


@dataclass
class ConversionStats:
    """Counts reported in the summary table after a conversion."""

    images: int = 0
    boxes: int = 0
    boxes_per_class: Counter[str] = field(default_factory=Counter)
    difficult: int = 0
    clipped: int = 0
    skipped_objects: int = 0
    skipped_files: int = 0


@dataclass
class Conversion:
    """Result of :func:`convert`: the COCO dict plus what the user needs to know about it."""

    coco: dict[str, Any]
    labels: list[str]
    labels_inferred: bool
    difficult: DifficultPolicy
    problems: list[Problem]
    stats: ConversionStats


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-blank, stripped lines of a small text file; an unreadable file is a one-line DatasetError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_labels(path: str | Path) -> list[str]:
    """Read a labels file, one class name per line; category ids are 1..K in this order.

    Unlike the seed, a name may contain spaces ("traffic light") because lines, not words, are names.
    """
    labels = read_lines(path, "labels file")
    if not labels:
        raise DatasetError(f"{path}: the labels file lists no label")
    _check_labels(labels, str(path))
    return labels


def _check_labels(labels: Sequence[str], origin: str) -> None:
    """Reject duplicate or blank names: either would make category ids ambiguous."""
    seen: set[str] = set()
    for i, name in enumerate(labels, 1):
        if not name.strip():
            raise DatasetError(f"{origin}: label {i} is blank")
        if name in seen:
            raise DatasetError(f"{origin}: label {i} {name!r} is listed twice")
        seen.add(name)


def parse_voc_xml(
    xml_path: str | Path, image_dir: str | Path | None = None, image_ext: str = ".jpg"
) -> tuple[VocImage | None, list[Problem]]:
    """Read one VOC annotation file.

    Returns the parsed image (``None`` when the whole file must be skipped) and the problems found;
    a bad object is left out of the image and reported, so one typo does not cost the whole file.
    ``image_dir`` is only used to read the image size when ``<size>`` is missing or zero.
    """
    path = str(xml_path)
    try:
        root = _read_xml(path)
        file_name = _file_name(root, path, image_ext)
        width, height = _image_size(root, path, file_name, image_dir)
    except _SkipFile as e:
        return None, [Problem(path, str(e), "file")]
    objects: list[VocObject] = []
    problems: list[Problem] = []
    for index, element in enumerate(root.findall("object"), 1):
        try:
            objects.append(_parse_object(element, index, path))
        except _SkipFile as e:
            problems.append(Problem(path, str(e), "object"))
    return VocImage(path, file_name, width, height, tuple(objects)), problems


def _read_xml(path: str) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise _SkipFile(f"{path}: malformed XML: {e}") from e
    except OSError as e:
        raise _SkipFile(f"{path}: cannot read: {e.strerror or e}") from e
    if root.tag != "annotation":
        raise _SkipFile(f"{path}: root element is <{root.tag}>, expected <annotation>")
    return root


def _file_name(root: ET.Element, path: str, image_ext: str) -> str:
    """Image path relative to the image folder: ``<filename>``, else the annotation's stem.

    Some labelling tools write ``<filename>`` without an extension; ``image_ext`` completes it.
    Tools on Windows may write ``sub\\0001.jpg``: COCO ``file_name`` is "/"-separated (detectron2
    joins it to the image root with ``os.path.join``, which takes "/" on Windows too), so the JSON
    works on every OS.
    """
    name = (root.findtext("filename") or "").strip().replace("\\", "/")
    if not name:
        return Path(path).stem + image_ext
    return name if PurePosixPath(name).suffix else name + image_ext


def _image_size(
    root: ET.Element, path: str, file_name: str, image_dir: str | Path | None
) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        reason = "<size> missing"
    else:
        width = _size_field(size, "width", path)
        height = _size_field(size, "height", path)
        if width and height:
            return width, height
        tag = "width" if not width else "height"
        reason = f"<size>/<{tag}> " + ("missing" if size.find(tag) is None else "is 0")
    if image_dir is None:
        raise _SkipFile(f"{path}: {reason} and no --image_dir to read the image size from")
    image_path = Path(image_dir) / file_name
    try:
        return image_size(image_path)
    except IMAGE_ERRORS as e:
        raise _SkipFile(f"{path}: {reason} and the image {image_path} cannot be read: {e}") from e


def _size_field(size: ET.Element, tag: str, path: str) -> int:
    """Integer value of ``<size>/<tag>``; 0 when missing or zero (the caller then reads the image)."""
    text = (size.findtext(tag) or "").strip()
    if not text:
        return 0
    try:
        value = float(text)
    except ValueError:
        raise _SkipFile(f"{path}: <size>/<{tag}> is not a number ({text!r})") from None
    if value < 0 or not value.is_integer():
        raise _SkipFile(f"{path}: <size>/<{tag}> is not a pixel count ({text!r})")
    return int(value)


def _parse_object(element: ET.Element, index: int, path: str) -> VocObject:
    where = f"{path}: <object>[{index}]"
    name = (element.findtext("name") or "").strip()
    if not name:
        raise _SkipFile(f"{where}/<name> missing")
    bndbox = element.find("bndbox")
    if bndbox is None:
        raise _SkipFile(f"{where}/<bndbox> missing")
    xmin, ymin, xmax, ymax = (
        _coordinate(bndbox, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax")
    )
    for low, high, lo_tag, hi_tag in ((xmin, xmax, "xmin", "xmax"), (ymin, ymax, "ymin", "ymax")):
        if high < low:
            raise _SkipFile(f"{where}/<bndbox>/<{hi_tag}> ({high:g}) < <{lo_tag}> ({low:g})")
    return VocObject(index, name, xmin, ymin, xmax, ymax, _difficult(element, where))


def _coordinate(bndbox: ET.Element, tag: str, where: str) -> float:
    text = (bndbox.findtext(tag) or "").strip()
    if not text:
        raise _SkipFile(f"{where}/<bndbox>/<{tag}> missing")
    try:
        value = float(text)
    except ValueError:
        raise _SkipFile(f"{where}/<bndbox>/<{tag}> is not a number ({text!r})") from None
    if not math.isfinite(value):
        raise _SkipFile(f"{where}/<bndbox>/<{tag}> is not finite ({text!r})")
    return value


def _difficult(element: ET.Element, where: str) -> bool:
    text = (element.findtext("difficult") or "0").strip()
    if text not in ("0", "1"):
        raise _SkipFile(f"{where}/<difficult> is not 0 or 1 ({text!r})")
    return text == "1"


def voc_box_to_coco(obj: VocObject, width: int, height: int) -> tuple[list[float], bool]:
    """COCO ``[x, y, w, h]`` of a VOC box clipped to the image, and whether clipping changed it.

    The 1-based inclusive pixel range [xmin, xmax] covers the continuous interval [xmin - 1, xmax].
    """
    x0, y0, x1, y1 = obj.xmin - 1, obj.ymin - 1, obj.xmax, obj.ymax
    cx0, cx1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    cy0, cy1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    return [cx0, cy0, cx1 - cx0, cy1 - cy0], clipped


def convert(
    xml_paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    *,
    difficult: DifficultPolicy = "keep",
    image_dir: str | Path | None = None,
    image_ext: str = ".jpg",
    strict: bool = False,
) -> Conversion:
    """Convert VOC annotation files to one COCO dataset dict (nothing is written to disk).

    ``labels`` fixes the categories (ids 1..K in that order); ``None`` infers them as the sorted unique
    object names. Skippable problems are returned in ``Conversion.problems``; with ``strict`` any of
    them raises :class:`DatasetError` instead (one line per problem). No usable annotation file at
    all also raises :class:`DatasetError`.
    """
    if difficult not in DIFFICULT_POLICIES:
        raise ValueError(f"difficult must be one of {DIFFICULT_POLICIES}, got {difficult!r}")
    if not xml_paths:
        raise DatasetError("no annotation file given")
    if labels is not None:
        _check_labels(labels, "labels")
    stats = ConversionStats()
    problems: list[Problem] = []
    images: list[VocImage] = []
    owner_of_file: dict[str, str] = {}
    for xml_path in progress(xml_paths, len(xml_paths), "reading VOC XML"):
        image, found = parse_voc_xml(xml_path, image_dir, image_ext)
        problems.extend(found)
        if image is not None and image.file_name in owner_of_file:
            other = owner_of_file[image.file_name]
            message = f"{image.xml_path}: <filename> {image.file_name} is also used by {other}"
            problems.append(Problem(image.xml_path, message, "file"))
            image = None
        if image is None:
            stats.skipped_files += 1
            continue
        owner_of_file[image.file_name] = image.xml_path
        images.append(image)
    label_list = (
        list(labels)
        if labels is not None
        else sorted({o.name for im in images for o in im.objects})
    )
    coco = _build_coco(images, label_list, difficult, stats, problems)
    # Label and clipping problems are found after parsing; report everything in input file order.
    file_order = {str(p): i for i, p in enumerate(xml_paths)}
    problems.sort(key=lambda p: file_order[p.xml_path])
    stats.skipped_objects = sum(p.scope == "object" for p in problems)
    if strict and problems:
        raise DatasetError("\n".join(p.message for p in problems))
    if not images:
        raise DatasetError(f"none of the {len(xml_paths)} annotation files could be used")
    return Conversion(coco, label_list, labels is None, difficult, problems, stats)


def _build_coco(
    images: list[VocImage],
    labels: list[str],
    difficult: DifficultPolicy,
    stats: ConversionStats,
    problems: list[Problem],
) -> dict[str, Any]:
    category_of = {name: i for i, name in enumerate(labels, 1)}
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, image in enumerate(images, 1):
        coco_images.append(
            {
                "id": image_id,
                "file_name": image.file_name,
                "width": image.width,
                "height": image.height,
            }
        )
        for obj in image.objects:
            where = f"{image.xml_path}: <object>[{obj.index}]"
            if obj.name not in category_of:
                message = f"{where}/<name> {obj.name!r} is not in the label list"
                problems.append(Problem(image.xml_path, message, "object"))
                continue
            stats.difficult += obj.difficult
            if obj.difficult and difficult == "skip":
                continue
            bbox, clipped = voc_box_to_coco(obj, image.width, image.height)
            if bbox[2] <= 0 or bbox[3] <= 0:
                corners = f"({obj.xmin:g}, {obj.ymin:g}, {obj.xmax:g}, {obj.ymax:g})"
                message = f"{where}/<bndbox> {corners} lies outside the {image.width}x{image.height} image"
                problems.append(Problem(image.xml_path, message, "object"))
                continue
            stats.clipped += clipped
            stats.boxes_per_class[obj.name] += 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_of[obj.name],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": int(obj.difficult and difficult == "crowd"),
                }
            )
    stats.images = len(coco_images)
    stats.boxes = len(annotations)
    return {
        # pycocotools 2.0.9/2.0.10 copy "info" in COCO.loadRes and fail when it is missing.
        "info": {
            "description": "Pascal VOC annotations converted by fcos-d2 dataset/voc2coco.py",
            "difficult_objects": difficult,
        },
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "none"} for i, name in enumerate(labels, 1)
        ],
    }


def summary_table(result: Conversion) -> str:
    """The end-of-run table: images, boxes per class, and what was skipped or clipped."""
    stats = result.stats
    rows: list[tuple[str, int]] = [("images", stats.images), ("boxes", stats.boxes)]
    rows += [(f"  {name}", stats.boxes_per_class[name]) for name in result.labels]
    handled = {"keep": "kept as boxes", "crowd": "written as iscrowd", "skip": "left out"}[
        result.difficult
    ]
    rows += [
        (f"difficult objects ({handled})", stats.difficult),
        ("boxes clipped to the image", stats.clipped),
        ("objects skipped", stats.skipped_objects),
        ("files skipped", stats.skipped_files),
    ]
    return format_table(("", "count"), rows)
