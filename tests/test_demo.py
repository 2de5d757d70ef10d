"""demo/demo.py: inputs (files, folders, globs), failures by name, drawn images, COCO JSON, video."""

from __future__ import annotations

import importlib.util
import json
import logging
import ntpath
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data.detection_utils import read_image
from inference_helpers import (
    SHAPES_CONFIG,
    TINY_OPTS,
    random_fcos,
    save_weights,
    shapes_val,
    tiny_cfg,
)
from predictor import FCOSPredictor

_spec = importlib.util.spec_from_file_location(
    "fcos_demo", Path(__file__).resolve().parents[1] / "demo" / "demo.py"
)
demo = importlib.util.module_from_spec(_spec)
sys.modules["fcos_demo"] = demo  # dataclasses look their module up there
_spec.loader.exec_module(demo)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    weights = save_weights(random_fcos(tiny_cfg()), root / "model.pth")
    images, ann_file = shapes_val(root / "shapes", num_val=3)
    return root, weights, images, ann_file


def _argv(weights: Path, *args: str, opts=()) -> list:
    return [
        "--config-file",
        str(SHAPES_CONFIG),
        *args,
        "--opts",
        *TINY_OPTS,
        "MODEL.WEIGHTS",
        str(weights),
        *opts,
    ]


@pytest.fixture
def demo_log(caplog):
    """The demo's log records (its logger does not propagate: detectron2's setup_logger turns that off)."""
    logger = logging.getLogger("fcos.demo")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_folder_glob_missing_and_unreadable_inputs(setup, tmp_path, demo_log):
    root, weights, images, ann_file = setup
    caplog = demo_log
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    out, results = tmp_path / "out", tmp_path / "results.json"
    code = demo.main(
        _argv(
            weights,
            "--input",
            str(images[0].parent),
            str(tmp_path / "absent.jpg"),
            str(images[0].parent / "00000[01].jpg"),
            str(broken),
            "--output",
            str(out),
            "--json",
            str(results),
            "--ann_file",
            str(ann_file),
            "--confidence-threshold",
            "0.1",
        )
    )
    assert code == 1
    assert "input not found: " + str(tmp_path / "absent.jpg") in caplog.text
    assert f"cannot read {broken}" in caplog.text
    assert "2 of 5 inputs failed" in caplog.text
    # The glob's two files are the folder's first two: each image is processed once.
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in images]
    assert read_image(str(out / images[0].name)).shape == (96, 128, 3)

    records = json.loads(results.read_text())
    coco = json.loads(ann_file.read_text())
    ids = {im["file_name"]: im["id"] for im in coco["images"]}
    predictor = FCOSPredictor(tiny_cfg("MODEL.WEIGHTS", str(weights)))
    expected = []
    for path in images:
        instances = predictor(read_image(str(path), format="BGR"))
        for (x0, y0, x1, y1), score, cls in zip(
            instances.pred_boxes.tensor.tolist(),
            instances.scores.tolist(),
            instances.pred_classes.tolist(),
        ):
            if score >= 0.1:
                expected.append((ids[path.name], cls + 1, [x0, y0, x1 - x0, y1 - y0], score))
    assert len(records) == len(expected) > 0
    for record, (image_id, category_id, bbox, score) in zip(records, expected):
        assert (record["image_id"], record["category_id"]) == (image_id, category_id)
        assert record["bbox"] == pytest.approx(bbox, abs=1e-4) and record["score"] == pytest.approx(
            score, abs=1e-6
        )


def test_custom_annotation_file_gives_names_and_category_ids(setup, tmp_path):
    """A config whose datasets are not registered: class count, names and ids come from --ann_file."""
    root, weights, images, _ = setup
    ann_file = tmp_path / "custom.json"
    categories = [
        {"id": 7, "name": "b"},
        {"id": 3, "name": "a"},
        {"id": 20, "name": "d"},
        {"id": 11, "name": "c"},
    ]
    ann_file.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    results = tmp_path / "r.json"
    code = demo.main(
        _argv(
            weights,
            "--input",
            str(images[1]),
            "--json",
            str(results),
            "--ann_file",
            str(ann_file),
            "--confidence-threshold",
            "0.0",
            opts=("DATASETS.TEST", "('dataset_val',)", "DATASETS.TRAIN", "('dataset_train',)"),
        )
    )
    assert code == 0
    records = json.loads(results.read_text())
    assert records and {r["category_id"] for r in records} <= {3, 7, 11, 20}
    assert {r["image_id"] for r in records} == {1}
    assert demo.CocoIds.from_sources(4, str(ann_file), None).category_ids == [3, 7, 11, 20]


def test_threshold_filters_what_is_written(setup, tmp_path):
    _, weights, images, _ = setup
    counts = {}
    for threshold in ("0.0", "0.15"):
        results = tmp_path / f"r{threshold}.json"
        assert (
            demo.main(
                _argv(
                    weights,
                    "--input",
                    str(images[0]),
                    "--json",
                    str(results),
                    "--confidence-threshold",
                    threshold,
                )
            )
            == 0
        )
        scores = [r["score"] for r in json.loads(results.read_text())]
        assert all(s >= float(threshold) for s in scores)
        counts[threshold] = len(scores)
    assert counts["0.0"] > counts["0.15"] > 0


def test_single_output_file_and_tta(setup, tmp_path):
    _, weights, images, _ = setup
    out = tmp_path / "drawn.png"
    code = demo.main(
        _argv(
            weights,
            "--input",
            str(images[2]),
            "--output",
            str(out),
            opts=("TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(96, 128)"),
        )
    )
    assert code == 0 and read_image(str(out)).shape == (96, 128, 3)


def test_output_file_name_with_several_inputs_is_refused(setup, tmp_path, capsys):
    _, weights, images, _ = setup
    argv = _argv(
        weights, "--input", str(images[0]), str(images[1]), "--output", str(tmp_path / "x.jpg")
    )
    assert demo.main(argv) == 2
    assert "is a file name, but there are 2 input images" in capsys.readouterr().err


def test_missing_weights_points_to_the_weights_readme(setup, tmp_path, capsys):
    _, _, images, _ = setup
    assert demo.main(_argv(tmp_path / "nothing.pth", "--input", str(images[0]))) == 2
    err = capsys.readouterr().err
    assert "nothing.pth" in err and "pretrained_weights/README.md" in err


def test_weights_of_another_class_count_are_refused(setup, capsys):
    """Inference must not silently run a skipped (random) class head."""
    _, weights, images, _ = setup
    opts = (
        "MODEL.FCOS.NUM_CLASSES",
        "3",
        "DATASETS.TEST",
        "('dataset_val',)",
        "DATASETS.TRAIN",
        "('dataset_train',)",
    )
    assert demo.main(_argv(weights, "--input", str(images[0]), opts=opts)) == 2
    assert "head.cls_score" in capsys.readouterr().err


def test_video_input(setup, tmp_path):
    _, weights, images, _ = setup
    video = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (128, 96))
    for path in images:
        writer.write(cv2.imread(str(path)))
    writer.release()
    out = tmp_path / "out.avi"
    assert demo.main(_argv(weights, "--video-input", str(video), "--output", str(out))) == 0
    capture = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (96, 128, 3)
    assert not np.array_equal(frames[0], cv2.imread(str(images[0])))


def test_expand_inputs(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    inputs = demo.expand_inputs(
        [str(tmp_path), str(tmp_path / "*.jpg"), str(tmp_path / "notes.txt"), "nope/*.jpg"]
    )
    assert inputs.files == [
        str(tmp_path / "a.PNG"),
        str(tmp_path / "b.jpg"),
        str(tmp_path / "notes.txt"),
    ]
    assert inputs.missing == ["nope/*.jpg"]


def test_output_paths_keep_distinct_names():
    paths = demo.output_paths(["x/a.jpg", "y/a.jpg", "y/b.jpg"], "out")
    assert paths == {"x/a.jpg": "out/a.jpg", "y/a.jpg": "out/a_1.jpg", "y/b.jpg": "out/b.jpg"}
    assert demo.output_paths(["x/a.jpg"], "out/picture.png") == {"x/a.jpg": "out/picture.png"}
    assert demo.output_paths(["x/a.jpg"], None) == {}


def test_windows_paths_name_outputs_and_find_image_ids(monkeypatch, tmp_path):
    """With Windows' os.path (ntpath): drive letters, backslashes and the mixed separators that
    ``%DATASETS_ROOT%/coco/...`` gives keep their base names; COCO "/" file names match them."""
    monkeypatch.setattr(demo, "os", types.SimpleNamespace(path=ntpath))
    files = ["D:\\data\\a.jpg", "D:\\datasets/coco/val2017/a.jpg", "E:\\b.PNG"]
    assert demo.output_paths(files, "D:\\out") == {
        files[0]: "D:\\out\\a.jpg",
        files[1]: "D:\\out\\a_1.jpg",
        files[2]: "D:\\out\\b.PNG",
    }
    picture = "D:\\out\\picture.png"
    assert demo.output_paths(files[:1], picture) == {files[0]: picture}
    ann_file = tmp_path / "val.json"
    images = [{"id": 7, "file_name": "sub/a.jpg"}, {"id": 9, "file_name": "b.PNG"}]
    ann_file.write_text(json.dumps({"categories": [{"id": 1, "name": "x"}], "images": images}))
    ids = demo.CocoIds.from_sources(1, str(ann_file), None)
    assert [ids.image_id(path, i) for i, path in enumerate(files + ["D:\\c.jpg"])] == [7, 7, 9, 4]
