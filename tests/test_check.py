"""dataset/check.py: a good dataset passes, each kind of breakage fails with a message naming file and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from dataset.check import main
from fcos.data.check import check_coco_dataset
from fcos.data.voc import convert

REPO = Path(__file__).resolve().parent.parent


def _good() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.jpg", "width": 20, "height": 10},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 40, 30],
                "area": 1200,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 2,
                "bbox": [1, 1, 5, 3],
                "area": 15,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 2,
                "bbox": [10, 2, 4, 4],
                "area": 16,
                "iscrowd": 1,
            },
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """(annotation file, image folder) of a small valid dataset."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(images / "a.jpg")
    Image.new("RGB", (20, 10), (200, 10, 30)).save(images / "b.jpg")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(_good()))
    return ann, images


def _write(ann: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = _good()
    edit(data)
    ann.write_text(json.dumps(data))


def test_good_dataset_passes(dataset: tuple[Path, Path], capsys) -> None:
    ann, images = dataset
    assert main(["--ann_file", str(ann), "--image_dir", str(images)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"{ann}: OK"
    report = check_coco_dataset(ann, images)
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.summary == {
        "images": 2,
        "annotations": 3,
        "categories": {"cat": 1, "dog": 2},
        "images_without_annotations": 0,
        "errors": 0,
        "warnings": 0,
    }


def test_cli_runs_as_module(dataset: tuple[Path, Path]) -> None:
    ann, images = dataset
    (images / "b.jpg").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "dataset.check", "--ann_file", str(ann), "--image_dir", str(images)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"  {images}/b.jpg: image file missing (images[1], id 2)" in proc.stdout.splitlines()


def _duplicate_image_id(data: dict[str, Any]) -> None:
    """b.jpg takes a.jpg's id; b's annotations go too, so that the duplicate is the only error."""
    data["images"][1]["id"] = 1
    del data["annotations"][1:]


# Each case: how to break the good dataset, and the error expected (formatted with ann / images).
BROKEN: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "missing image": (
        lambda ann, images: (images / "b.jpg").unlink(),
        "{images}/b.jpg: image file missing (images[1], id 2)",
    ),
    "unreadable image": (
        lambda ann, images: (images / "b.jpg").write_bytes(b"not a jpeg"),
        "{images}/b.jpg: cannot read the image (images[1], id 2): cannot identify image file",
    ),
    "size mismatch": (
        lambda ann, images: _write(ann, lambda d: d["images"][0].update(width=41)),
        "{images}/a.jpg: the file is 40x30 but {ann} says 41x30 (images[0], id 1)",
    ),
    "zero-size box": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][1].update(bbox=[1, 1, 0, 3])),
        "{ann}: annotations[1] (id 2, image b.jpg).bbox [1, 1, 0, 3]: zero or negative size",
    ),
    "negative-size box": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][0].update(bbox=[5, 5, 4, -1])),
        "{ann}: annotations[0] (id 1, image a.jpg).bbox [5, 5, 4, -1]: zero or negative size",
    ),
    "box outside": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][1].update(bbox=[20, 0, 5, 5])),
        "{ann}: annotations[1] (id 2, image b.jpg).bbox [20, 0, 5, 5]: entirely outside the 20x10 image",
    ),
    "unknown category": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][2].update(category_id=7)),
        "{ann}: annotations[2] (id 3, image b.jpg).category_id: unknown category id 7",
    ),
    "unknown image": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][2].update(image_id=9)),
        "{ann}: annotations[2].image_id (id 3): no image with id 9",
    ),
    "duplicate image id": (
        lambda ann, images: _write(ann, _duplicate_image_id),
        "{ann}: images[1]: duplicate image id 1 (a.jpg and b.jpg)",
    ),
    "duplicate annotation id": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][2].update(id=1)),
        "{ann}: annotations[2]: duplicate annotation id 1 (also annotations[0])",
    ),
    "duplicate category id": (
        lambda ann, images: _write(ann, lambda d: d["categories"].append({"id": 1, "name": "x"})),
        "{ann}: categories[2]: duplicate category id 1 ('cat' and 'x')",
    ),
    "bad width": (
        lambda ann, images: _write(ann, lambda d: d["images"][1].update(width="20")),
        "{ann}: images[1].width (b.jpg): expected a positive integer, got '20'",
    ),
    "bad bbox": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][0].update(bbox=[0, 0, 4])),
        "{ann}: annotations[0] (id 1, image a.jpg).bbox: expected [x, y, width, height] of finite numbers, "
        "got [0, 0, 4]",
    ),
    "ignore flag": (
        lambda ann, images: _write(ann, lambda d: d["annotations"][0].update(ignore=1)),
        "{ann}: annotations[0] (id 1, image a.jpg).ignore is 1: detectron2 does not support 'ignore'; "
        "use iscrowd=1 to have COCO evaluation ignore a box",
    ),
    "not COCO: array": (
        lambda ann, images: ann.write_text("[1, 2]"),
        "{ann}: top level is an array, expected an object with 'images', 'annotations' and "
        "'categories' (not a COCO file)",
    ),
    "not COCO: missing key": (
        lambda ann, images: _write(ann, lambda d: d.pop("annotations")),
        "{ann}: missing key 'annotations' (not a COCO detection file)",
    ),
    "not COCO: wrong type": (
        lambda ann, images: _write(ann, lambda d: d.update(images={"a.jpg": 1})),
        "{ann}: 'images' is an object, expected an array",
    ),
    "truncated JSON": (
        lambda ann, images: ann.write_text(ann.read_text()[:150]),
        "{ann}: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 151",
    ),
    "missing JSON": (
        lambda ann, images: ann.unlink(),
        "{ann}: cannot read: No such file or directory",
    ),
}


# The annotation file itself cannot be read: nothing to check, one line and exit status 2.
UNREADABLE = {
    "not COCO: array",
    "not COCO: missing key",
    "not COCO: wrong type",
    "truncated JSON",
    "missing JSON",
}
DEGENERATE = {"zero-size box", "negative-size box", "box outside"}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_dataset_fails_naming_file_and_field(
    dataset: tuple[Path, Path], capsys, case: str
) -> None:
    # --strict: degenerate boxes are errors too (without it they are one warning, see below).
    ann, images = dataset
    breakage, expected = BROKEN[case]
    breakage(ann, images)
    status = main(["--ann_file", str(ann), "--image_dir", str(images), "--strict"])
    expected = expected.format(ann=ann, images=images)
    report = check_coco_dataset(ann, images, strict_boxes=True)
    assert len(report.errors) == 1 and report.errors[0].startswith(expected), report.errors
    captured = capsys.readouterr()
    if case in UNREADABLE:
        assert status == 2 and not report.readable
        assert captured.err == f"check: error: {report.errors[0]}\n" and captured.out == ""
        return
    assert status == 1 and report.readable
    out = captured.out.splitlines()
    assert f"  {report.errors[0]}" in out and out[-1] == f"{ann}: FAILED: 1 error(s)"


def test_degenerate_boxes_are_one_warning_naming_a_few(dataset: tuple[Path, Path], capsys) -> None:
    ann, images = dataset

    def edit(d: dict[str, Any]) -> None:
        d["annotations"][0]["bbox"] = [5, 5, 0, 3]  # zero width
        d["annotations"][1]["bbox"] = [1, 1, 4, -2]  # negative height
        d["annotations"][2]["bbox"] = [20, 0, 5, 5]  # right of the 20 px wide b.jpg
        # two more below b.jpg
        d["annotations"] += [
            dict(d["annotations"][1], id=10 + i, bbox=[0, 10, 3, 3]) for i in range(2)
        ]

    _write(ann, edit)
    report = check_coco_dataset(ann, images)
    assert report.ok and report.errors == []
    degenerate = [w for w in report.warnings if "degenerate box" in w]
    assert degenerate == [
        f"{ann}: 5 degenerate box(es) with no area inside their image, which training drops: "
        "annotations[0] (id 1, image a.jpg).bbox [5, 5, 0, 3]: zero or negative size; "
        "annotations[1] (id 2, image b.jpg).bbox [1, 1, 4, -2]: zero or negative size; "
        "annotations[2] (id 3, image b.jpg).bbox [20, 0, 5, 5]: entirely outside the 20x10 image; "
        "and 2 more "
        "(DATASETS.STRICT_BOXES True / dataset/check.py --strict refuse them)"
    ]
    # Both images lost their only boxes: training sees them as images without annotations.
    assert report.summary["images_without_annotations"] == 2
    assert main(["--ann_file", str(ann), "--image_dir", str(images)]) == 0
    assert main(["--ann_file", str(ann), "--image_dir", str(images), "--strict"]) == 1
    assert "FAILED: 5 error(s)" in capsys.readouterr().out


def test_missing_image_folder_is_one_line(dataset: tuple[Path, Path], capsys) -> None:
    ann, images = dataset
    assert main(["--ann_file", str(ann), "--image_dir", str(images / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"check: error: {images / 'nope'}: not a folder (--image_dir)\n"
    assert captured.out == ""


def test_warnings_alone_exit_0(dataset: tuple[Path, Path]) -> None:
    ann, images = dataset

    def edit(d: dict[str, Any]) -> None:
        d["categories"][1]["id"] = 5  # non-contiguous ids
        d["annotations"] = [d["annotations"][0]]  # b.jpg loses its annotations
        d["annotations"][0]["bbox"] = [-2, 1, 43, 20]  # sticks out left and right
        del d["annotations"][0]["area"]

    _write(ann, edit)
    report = check_coco_dataset(ann, images)
    assert report.ok
    assert report.warnings == [
        f"{ann}: category ids are not 1..2 (1, 5); fine, detectron2 maps them to contiguous ids",
        f"{ann}: 1 box(es) extend beyond their image, e.g. annotations[0] (id 1, image a.jpg); detectron2 clips them",
        f"{ann}: 1 annotation(s) without 'area'; COCO evaluation (pycocotools) needs it",
        f"{ann}: 1 image(s) without annotations (b.jpg); detectron2 drops them from training "
        "when DATALOADER.FILTER_EMPTY_ANNOTATIONS is True (its default) and trains on them as "
        "images without objects when it is False",
    ]
    assert report.summary["categories"] == {"cat": 1, "dog": 0}
    assert report.summary["images_without_annotations"] == 1
    assert main(["--ann_file", str(ann), "--image_dir", str(images)]) == 0


def test_header_mode_misses_truncated_image_that_full_mode_finds(
    dataset: tuple[Path, Path],
) -> None:
    ann, images = dataset
    noisy = Image.frombytes("RGB", (40, 30), bytes((i * 97) % 256 for i in range(40 * 30 * 3)))
    noisy.save(images / "a.jpg", quality=95)
    data = (images / "a.jpg").read_bytes()
    (images / "a.jpg").write_bytes(data[: len(data) // 2])
    assert check_coco_dataset(ann, images).ok
    full = check_coco_dataset(ann, images, read_images=True)
    assert len(full.errors) == 1
    expected = f"{images}/a.jpg: cannot read the image (images[0], id 1): image file is truncated"
    assert full.errors[0].startswith(expected)
    assert main(["--ann_file", str(ann), "--image_dir", str(images), "--full"]) == 1


def test_exif_rotated_image_is_measured_as_detectron2_reads_it(dataset: tuple[Path, Path]) -> None:
    ann, images = dataset
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: detectron2 reads the 40x30 file as 30x40
    Image.new("RGB", (40, 30)).save(images / "a.jpg", exif=exif)
    report = check_coco_dataset(ann, images)
    assert report.errors == [
        f"{images}/a.jpg: the file is 30x40 but {ann} says 40x30 (images[0], id 1) "
        "(width and height swapped: EXIF orientation?)"
    ]


def test_existence_only_mode_skips_size_check(dataset: tuple[Path, Path]) -> None:
    ann, images = dataset
    _write(ann, lambda d: d["images"][0].update(width=41, height=31))
    assert check_coco_dataset(ann, images, read_images=False).ok
    (images / "a.jpg").unlink()
    assert check_coco_dataset(ann, images, read_images=False).errors == [
        f"{images}/a.jpg: image file missing (images[0], id 1)"
    ]


def test_converted_voc_dataset_passes(tmp_path: Path) -> None:
    """voc2coco's output is a dataset the checker accepts, with the counts the XML implies."""
    Image.new("RGB", (30, 20)).save(tmp_path / "x.jpg")
    xml = tmp_path / "x.xml"
    xml.write_text(
        "<annotation><filename>x.jpg</filename><size><width>30</width><height>20</height></size>"
        "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>30</xmax><ymax>20</ymax>"
        "</bndbox></object></annotation>"
    )
    ann = tmp_path / "x.json"
    ann.write_text(json.dumps(convert([xml], ["cat", "dog"]).coco))
    report = check_coco_dataset(ann, tmp_path)
    assert report.ok and report.warnings == []
    assert report.summary["categories"] == {"cat": 1, "dog": 0}


def test_format_caps_long_lists(dataset: tuple[Path, Path]) -> None:
    ann, images = dataset
    _write(
        ann,
        lambda d: d["annotations"].extend(
            {"id": 10 + i, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]} for i in range(25)
        ),
    )
    report = check_coco_dataset(ann, images)
    assert len(report.errors) == 25
    text = report.format(max_lines=20).splitlines()
    assert text[0] == "errors (25):" and text[21] == "  ... and 5 more"


def test_garbage_records_are_reported_not_raised(dataset: tuple[Path, Path]) -> None:
    ann, images = dataset
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"id": [1], "file_name": "a.jpg"},
                    "b.jpg",
                    {"id": 2, "file_name": None, "width": 20},
                ],
                "annotations": [
                    {"id": 1, "image_id": [1], "category_id": 1, "bbox": [0, 0, 1, 1]},
                    {"id": {"x": 1}},
                    None,
                    {"id": 4, "image_id": 2, "category_id": 1},
                ],
                "categories": ["cat", {"id": "1", "name": "cat"}, {"id": 3, "name": ""}],
            }
        )
    )
    report = check_coco_dataset(ann, images)
    assert [e.split(": ", 1)[1] for e in report.errors] == [
        "categories[0] is a string, expected an object",
        "categories[1].id: expected an integer, got '1'",
        "categories[2].name: expected a non-empty string, got ''",
        "images[0].id: expected an integer, got [1]",
        "images[1] is a string, expected an object",
        "images[2].file_name: expected a non-empty string, got None",
        "annotations[0].image_id (id 1): no image with id [1]",
        "annotations[1].id: expected an integer, got {'x': 1}",
        "annotations[2] is null, expected an object",
    ]
