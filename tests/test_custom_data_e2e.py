"""Issue 5's user path end to end: a VOC folder -> voc2coco -> dataset check -> train_net with the
custom-data flags (a few iterations) -> COCO evaluation on the converted val split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import REPO, TINY_OPTS, TINY_SIZE, ap_rows, run_train_net

from dataset.voc2coco import main as voc2coco
from fcos.data.check import check_coco_dataset

# Per image: (label, VOC 1-based inclusive box).
OBJECTS = {
    "a": [("cat", (5, 7, 14, 12)), ("dog", (21, 17, 40, 44))],
    "b": [("dog", (3, 3, 30, 30))],
    "c": [("cat", (40, 40, 64, 64))],
    "d": [("cat", (10, 20, 20, 30)), ("dog", (1, 1, 64, 64))],
}


def _voc_tree(root: Path) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for i, (stem, objects) in enumerate(OBJECTS.items()):
        Image.new("RGB", (TINY_SIZE, TINY_SIZE), (40 * i, 90, 160)).save(
            root / "JPEGImages" / f"{stem}.jpg"
        )
        body = "".join(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for name, (x0, y0, x1, y1) in objects
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{TINY_SIZE}</width>"
            f"<height>{TINY_SIZE}</height><depth>3</depth></size>{body}</annotation>"
        )
    (root / "ImageSets/Main/trainval.txt").write_text("a\nb\nc\n")
    (root / "ImageSets/Main/test.txt").write_text("d\n")
    return root


@pytest.mark.slow
def test_voc_folder_to_trained_and_evaluated_fcos(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path / "VOC")
    train_json, val_json = tmp_path / "train.json", tmp_path / "val.json"
    assert (
        voc2coco(["--voc_root", str(voc), "--split", "trainval", "--output", str(train_json)]) == 0
    )
    labels = tmp_path / "train_labels.txt"
    assert labels.read_text().split() == ["cat", "dog"]
    assert (
        voc2coco(
            [
                "--voc_root",
                str(voc),
                "--split",
                "test",
                "--labels",
                str(labels),
                "--output",
                str(val_json),
            ]
        )
        == 0
    )
    val = json.loads(val_json.read_text())
    # VOC (10, 20, 20, 30) 1-based inclusive -> COCO [9, 19, 11, 11]; the whole 64x64 image -> [0, 0, 64, 64].
    assert sorted(a["bbox"] for a in val["annotations"]) == [[0, 0, 64, 64], [9, 19, 11, 11]]
    assert check_coco_dataset(str(train_json), str(voc / "JPEGImages")).ok

    out = tmp_path / "out"
    result = run_train_net(
        [
            "--config-file",
            str(REPO / "configs" / "fcos_shapes.yaml"),
            "--ann_file_train",
            str(train_json),
            "--image_dir_train",
            str(voc / "JPEGImages"),
            "--ann_file_val",
            str(val_json),
            "--image_dir_val",
            str(voc / "JPEGImages"),
            *TINY_OPTS,
            "SOLVER.MAX_ITER",
            "3",
            "OUTPUT_DIR",
            str(out),
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "NUM_CLASSES: 2" in config
    assert "- dataset_train" in config and "- dataset_val" in config
    assert (out / "model_final.pth").is_file()
    assert list(ap_rows(result.stdout)) == ["bbox"]
