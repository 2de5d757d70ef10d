"""dataset/voc2coco.py on a small generated VOC tree, checked box by box against hand-computed values.

The tree holds the cases that go wrong in practice: a full-image box written 1-based (xmin=1,
xmax=W), a difficult object, a box touching the right/bottom border, one sticking out of its image
(clipped), a one-pixel box (xmax == xmin), an image whose XML has no <filename> and one whose <size>
is 0 (size read from the JPEG), an unknown label, a box with xmax < xmin, an object missing a
coordinate and a truncated XML file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from dataset.voc2coco import main
from fcos.data.common import DatasetError
from fcos.data.voc import convert

REPO = Path(__file__).resolve().parent.parent
LABELS = ["cat", "dog", "person"]


def _obj(name: str, box: tuple[object, object, object, object] | None, difficult: int = 0) -> str:
    """One <object> element; ``box`` entries of None leave that coordinate out."""
    coords = ""
    if box is not None:
        coords = "".join(
            f"<{t}>{v}</{t}>"
            for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box)
            if v is not None
        )
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"


def _xml(objects: list[str], filename: str | None, size: tuple[int, int] | None) -> str:
    parts = ["<annotation>", "<folder>VOC</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        )
    return "".join(parts + objects + ["</annotation>"])


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """VOC root with five listed annotations (0003 is malformed) and their JPEGs."""
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    sizes = {
        "0001": (50, 40),
        "0002": (60, 30),
        "0003": (10, 10),
        "0004": (30, 20),
        "0005": (20, 20),
    }
    for stem, size in sizes.items():
        Image.new("RGB", size, (120, 60, 30)).save(root / "JPEGImages" / f"{stem}.jpg")
    xmls = {
        "0001": _xml(
            [
                _obj("cat", (1, 1, 50, 40)),  # the whole image, 1-based inclusive
                _obj("dog", (10, 12, 20, 30), difficult=1),
                _obj("person", (30, 5, 50, 40)),
            ],  # touches the right and bottom border
            "0001.jpg",
            (50, 40),
        ),
        "0002": _xml(
            [
                _obj(
                    "dog", (50, 0, 70, 25)
                ),  # sticks out left-top (ymin=0) and right (xmax=70 > 60)
                _obj("bird", (5, 5, 10, 10)),
            ],  # not in LABELS
            None,
            (60, 30),
        ),  # no <filename>: annotation stem + .jpg
        "0004": _xml(
            [_obj("cat", (2, 3, 4, 5)), _obj("person", (7, 8, 7, 8))],  # one pixel
            "0004.jpg",
            (0, 20),
        ),  # width 0: size read from the JPEG (30x20)
        "0005": _xml(
            [
                _obj("cat", (40, 3, 12, 9)),  # xmax < xmin
                _obj("dog", (2, 2, 6, None)),  # no <ymax>
                _obj("cat", (3, 3, 8, 8)),
            ],
            "0005.jpg",
            (20, 20),
        ),
    }
    for stem, text in xmls.items():
        (root / "Annotations" / f"{stem}.xml").write_text(text)
    (root / "Annotations" / "0003.xml").write_text(
        "<annotation><filename>0003.jpg</filename><size><wid"
    )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("0001\n0002\n0003\n0004\n0005\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("0004\n0001\n")
    (root / "labels.txt").write_text("".join(f"{name}\n" for name in LABELS))
    return root


# (file_name, width, height, [(category, [x, y, w, h], iscrowd)]) for the default --difficult keep.
EXPECTED = [
    (
        "0001.jpg",
        50,
        40,
        [("cat", [0, 0, 50, 40], 0), ("dog", [9, 11, 11, 19], 0), ("person", [29, 4, 21, 36], 0)],
    ),
    ("0002.jpg", 60, 30, [("dog", [49, 0, 11, 25], 0)]),
    ("0004.jpg", 30, 20, [("cat", [1, 2, 3, 3], 0), ("person", [6, 7, 1, 1], 0)]),
    ("0005.jpg", 20, 20, [("cat", [2, 2, 6, 6], 0)]),
]


def _boxes_by_image(
    json_path: Path,
) -> list[tuple[str, int, int, list[tuple[str, list[float], int]]]]:
    """The dataset as EXPECTED-style tuples, read through pycocotools (ids in order 1..N)."""
    coco = COCO(str(json_path))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out = []
    for image in coco.loadImgs(sorted(coco.getImgIds())):
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])), key=lambda a: a["id"])
        for ann in anns:
            assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
        boxes = [(names[a["category_id"]], a["bbox"], a["iscrowd"]) for a in anns]
        out.append((image["file_name"], image["width"], image["height"], boxes))
    return out


def test_voc_root_conversion_matches_hand_computed_boxes(voc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "train.json"
    rc = main(
        [
            "--voc_root",
            str(voc),
            "--split",
            "trainval",
            "--labels",
            str(voc / "labels.txt"),
            "--output",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert _boxes_by_image(out) == EXPECTED
    data = json.loads(out.read_text())
    assert [im["id"] for im in data["images"]] == [1, 2, 3, 4]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 8))
    assert data["categories"] == [
        {"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(LABELS, 1)
    ]
    ann = voc / "Annotations"
    assert captured.err.splitlines() == [
        f"skipped object: {ann}/0002.xml: <object>[2]/<name> 'bird' is not in the label list",
        f"skipped file: {ann}/0003.xml: malformed XML: unclosed token: line 1, column 47",
        f"skipped object: {ann}/0005.xml: <object>[1]/<bndbox>/<xmax> (12) < <xmin> (40)",
        f"skipped object: {ann}/0005.xml: <object>[2]/<bndbox>/<ymax> missing",
    ]
    lines = captured.out.splitlines()
    table = dict(line.rsplit(None, 1) for line in lines[2 : lines.index(f"wrote {out}")])
    assert table == {
        "images": "4",
        "boxes": "7",
        "  cat": "3",
        "  dog": "2",
        "  person": "2",
        "difficult objects (kept as boxes)": "1",
        "boxes clipped to the image": "1",
        "objects skipped": "3",
        "files skipped": "1",
    }
    assert not (tmp_path / "train_labels.txt").exists()


def test_difficult_policies(voc: Path) -> None:
    paths = [voc / "Annotations" / "0001.xml"]
    crowd = convert(paths, LABELS, difficult="crowd").coco["annotations"]
    assert [(a["category_id"], a["iscrowd"]) for a in crowd] == [(1, 0), (2, 1), (3, 0)]
    skip = convert(paths, LABELS, difficult="skip")
    assert [(a["category_id"], a["bbox"]) for a in skip.coco["annotations"]] == [
        (1, [0, 0, 50, 40]),
        (3, [29, 4, 21, 36]),
    ]
    assert skip.stats.difficult == 1 and skip.coco["info"]["difficult_objects"] == "skip"


def test_strict_fails_with_one_line_per_problem_and_writes_nothing(
    voc: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "train.json"
    out.write_text("previous content")
    rc = main(
        [
            "--voc_root",
            str(voc),
            "--labels",
            str(voc / "labels.txt"),
            "--output",
            str(out),
            "--strict",
        ]
    )
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err[0] == "voc2coco: error: --strict: nothing written, because of:"
    assert f"  {voc}/Annotations/0005.xml: <object>[1]/<bndbox>/<xmax> (12) < <xmin> (40)" in err
    assert len(err) == 5 and "Traceback" not in "\n".join(err)
    assert out.read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC", "train.json"]


def test_strict_passes_on_clean_input(voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "val.json"
    rc = main(
        [
            "--voc_root",
            str(voc),
            "--split",
            "val",
            "--labels",
            str(voc / "labels.txt"),
            "--output",
            str(out),
            "--strict",
        ]
    )
    assert rc == 0
    assert _boxes_by_image(out) == [EXPECTED[2], EXPECTED[0]]  # split order fixes the ids


def test_labels_inferred_and_written_next_to_output(voc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "train.json"
    assert main(["--voc_root", str(voc), "--output", str(out)]) == 0
    assert "pass it as --labels" in capsys.readouterr().out
    inferred = ["bird", "cat", "dog", "person"]
    assert (tmp_path / "sub" / "train_labels.txt").read_text() == "bird\ncat\ndog\nperson\n"
    got = _boxes_by_image(out)
    assert got[1] == ("0002.jpg", 60, 30, [("dog", [49, 0, 11, 25], 0), ("bird", [4, 4, 6, 6], 0)])
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == inferred


@pytest.mark.parametrize("entry", [["dataset/voc2coco.py"], ["-m", "dataset.voc2coco"]])
def test_cli_with_seed_options(voc: Path, tmp_path: Path, entry: list[str]) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("0004\n0001\n")
    out = tmp_path / "seed.json"
    cmd = [
        sys.executable,
        *entry,
        "--ann_dir",
        str(voc / "Annotations"),
        "--ann_ids",
        str(ids),
        "--ext",
        "xml",
        "--labels",
        str(voc / "labels.txt"),
        "--output",
        str(out),
        "--image_dir",
        str(voc / "JPEGImages"),
        "--extract_num_from_imgid",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "warning: --extract_num_from_imgid is ignored" in proc.stderr
    assert _boxes_by_image(out) == [EXPECTED[2], EXPECTED[0]]


def test_ann_paths_list_order_and_ann_dir_sorting(voc: Path, tmp_path: Path) -> None:
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{voc}/Annotations/0005.xml\n\n{voc}/Annotations/0001.xml\n")
    out = tmp_path / "a.json"
    assert (
        main(
            [
                "--ann_paths_list",
                str(listing),
                "--labels",
                str(voc / "labels.txt"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert [im[0] for im in _boxes_by_image(out)] == ["0005.jpg", "0001.jpg"]

    only = tmp_path / "only"
    only.mkdir()
    for stem in ("0005", "0001", "0002"):
        (only / f"{stem}.xml").write_bytes((voc / "Annotations" / f"{stem}.xml").read_bytes())
    assert (
        main(["--ann_dir", str(only), "--labels", str(voc / "labels.txt"), "--output", str(out)])
        == 0
    )
    assert [im[0] for im in _boxes_by_image(out)] == ["0001.jpg", "0002.jpg", "0005.jpg"]


def test_missing_size_without_image_dir_skips_the_file(voc: Path) -> None:
    result = convert([voc / "Annotations" / "0004.xml", voc / "Annotations" / "0001.xml"], LABELS)
    assert [str(p) for p in result.problems] == [
        f"{voc}/Annotations/0004.xml: <size>/<width> is 0 and no --image_dir to read the image size from"
    ]
    assert [im["file_name"] for im in result.coco["images"]] == ["0001.jpg"]


def test_convert_raises_when_nothing_is_usable(voc: Path) -> None:
    with pytest.raises(DatasetError, match="none of the 1 annotation files could be used"):
        convert([voc / "Annotations" / "0003.xml"], LABELS)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--labels", "{voc}/missing.txt"],
            "{voc}/missing.txt: cannot read the labels file: No such file",
        ),
        (
            ["--split", "test"],
            "{voc}/ImageSets/Main/test.txt: cannot read the split file: No such file",
        ),
        (["--labels", "{voc}/dup.txt"], "{voc}/dup.txt: label 3 'cat' is listed twice"),
    ],
)
def test_unrecoverable_input_is_one_line_and_exit_2(
    voc: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    (voc / "dup.txt").write_text("cat\ndog\ncat\n")
    out = tmp_path / "x.json"
    rc = main(["--voc_root", str(voc), "--output", str(out)] + [a.format(voc=voc) for a in args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("voc2coco: error: " + message.format(voc=voc))
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_box_entirely_outside_the_image_is_skipped(tmp_path: Path) -> None:
    xml = tmp_path / "far.xml"
    xml.write_text(
        _xml([_obj("cat", (70, 5, 90, 9)), _obj("cat", (0, 0, 60, 31))], "far.jpg", (60, 30))
    )
    result = convert([xml], ["cat"])
    assert [str(p) for p in result.problems] == [
        f"{xml}: <object>[1]/<bndbox> (70, 5, 90, 9) lies outside the 60x30 image"
    ]
    assert [a["bbox"] for a in result.coco["annotations"]] == [
        [0, 0, 60, 30]
    ]  # x0=-1, y1=31 clipped
    assert result.stats.clipped == 1 and result.stats.skipped_objects == 1


def test_windows_separators_in_filename_become_forward_slashes(tmp_path: Path) -> None:
    """A ``<filename>`` written on Windows (``sub\\a.jpg``) is a "/" path in the JSON, and its image
    is found through it when the size has to be read from the file."""
    images = tmp_path / "JPEGImages"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(images / "sub" / "a.jpg")
    first, second = tmp_path / "a.xml", tmp_path / "b.xml"
    # <size> 0 x 0: the size is read from the image, found through the converted name.
    first.write_text(_xml([_obj("cat", (1, 1, 30, 20))], "sub\\a.jpg", (0, 0)))
    # No extension after the last separator: the dot in the folder name is not one, .jpg is added.
    second.write_text(_xml([_obj("cat", (1, 1, 5, 5))], "v1.2\\b", (10, 10)))
    result = convert([first, second], ["cat"], image_dir=images)
    assert result.problems == []
    assert [(im["file_name"], im["width"], im["height"]) for im in result.coco["images"]] == [
        ("sub/a.jpg", 30, 20),
        ("v1.2/b.jpg", 10, 10),
    ]
