"""train_net.py end to end, in subprocesses, on tiny data: the embedded job (train -> checkpoint ->
--eval-only -> AP table), COCO through DETECTRON2_DATASETS, and a bad-data run that stops before training.
Multi-process runs and resume are in test_train_multiprocess.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from train_helpers import (
    REPO,
    SHAPES_CONFIG,
    TINY_OPTS,
    ap_rows,
    run_train_net,
    shapes_run,
    simple_boxes,
    write_coco,
)


@pytest.mark.slow
def test_embedded_job_trains_checkpoints_and_evaluates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A low score threshold so that the 4-iteration model still outputs detections to compare.
    low_thresh = ["MODEL.FCOS.SCORE_THRESH_TEST", "0.001"]
    trained = run_train_net(
        shapes_run(
            tmp_path, out, *low_thresh, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"
        )
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {
        "config.yaml",
        "config_my.yaml",
        "log.txt",
        "metrics.json",
        "training_curves.png",
        "model_0000001.pth",
        "model_0000003.pth",
        "model_final.pth",
        "last_checkpoint",
    } <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert (out / "config_my.yaml").read_text() == SHAPES_CONFIG.read_text()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert "NUM_CLASSES: 4" in (out / "config.yaml").read_text()  # from the dataset's 4 categories
    train_rows = ap_rows(trained.stdout)
    assert list(train_rows) == ["bbox"]
    assert "Box AP on ['shapes_val']" in (out / "log.txt").read_text()
    train_detections = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert len(train_detections) > 0

    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    evaluated = run_train_net(
        shapes_run(tmp_path, tmp_path / "eval", *low_thresh, *weights, flags=["--eval-only"])
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # Same weights, same images, deterministic inference: the same detections and table as after training.
    assert (
        json.loads((tmp_path / "eval" / "inference" / "coco_instances_results.json").read_text())
        == train_detections
    )
    assert ap_rows(evaluated.stdout) == train_rows

    tta = run_train_net(
        shapes_run(
            tmp_path,
            tmp_path / "tta",
            *low_thresh,
            *weights,
            "TEST.AUG.ENABLED",
            "True",
            "TEST.AUG.MIN_SIZES",
            "(64, 96)",
            "TEST.AUG.MAX_SIZE",
            "96",
            flags=["--eval-only"],
        )
    )
    assert tta.returncode == 0, tta.stderr[-3000:]
    rows = ap_rows(tta.stdout)
    assert list(rows) == ["bbox", "bbox_TTA"] and rows["bbox"] == train_rows["bbox"]
    assert (tmp_path / "tta" / "inference_TTA" / "coco_instances_results.json").is_file()


@pytest.mark.slow
def test_coco_through_detectron2_datasets(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    for split, count in (("train2017", 3), ("val2017", 2)):
        boxes = [[(1, b), (18, b2)] for (_, b), (_, b2) in simple_boxes(count, 1)]
        ann_file, _ = write_coco(root / "coco", split, categories, boxes)
        (root / "coco" / "annotations").mkdir(exist_ok=True)
        ann_file.rename(root / "coco" / "annotations" / f"instances_{split}.json")
    out = tmp_path / "out"
    result = run_train_net(
        [
            "--config-file",
            str(REPO / "configs" / "Base-FCOS.yaml"),
            *TINY_OPTS,
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
            "MODEL.RESNETS.NORM",
            "BN",
            "MODEL.BACKBONE.FREEZE_AT",
            "0",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.BASE_LR",
            "0.001",
            "OUTPUT_DIR",
            str(out),
        ],
        env={"DETECTRON2_DATASETS": str(root)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert (
        f"Loaded 3 images in COCO format from {root}/coco/annotations/instances_train2017.json"
        in log
    )
    assert "NUM_CLASSES: 80" in (out / "config.yaml").read_text()
    assert list(ap_rows(result.stdout)) == ["bbox"]


@pytest.mark.slow
def test_bad_data_stops_before_training_with_one_message(tmp_path: Path) -> None:
    categories = [{"id": 1, "name": "a"}]
    ann_file, image_dir = write_coco(tmp_path, "train", categories, [[(1, [4.0, 4.0, 10.0, 10.0])]])
    (image_dir / "0.png").unlink()
    out = tmp_path / "out"
    result = run_train_net(
        [
            "--config-file",
            str(SHAPES_CONFIG),
            "--ann_file_train",
            str(ann_file),
            "--image_dir_train",
            str(image_dir),
            "OUTPUT_DIR",
            str(out),
        ]
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{image_dir / '0.png'}: image file missing" in result.stderr
    assert not out.exists()
