"""COCO evaluation through the project's evaluator: which COCOeval runs, and its numbers.

detectron2 without its C++ extension (this project's install) evaluates with faster-coco-eval's
COCOeval; these tests pin that choice and compare every summary number with pycocotools' own
COCOeval on data that reaches the corner cases: crowd regions, all three size ranges, more than 100
detections per image and category (so the maxDets cut changes results), several categories and an
image without objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.coco_data import SyntheticCase, generate
from fcos.engine import coco_backend
from fcos.engine.evaluation import build_coco_evaluator

PARITY_CASE = SyntheticCase(
    num_images=20,
    num_categories=3,
    mean_boxes=8,
    empty_image_fraction=0.05,
    crowd_fraction=0.1,
    detections_per_image=360,
    seed=3,
)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULTS_FILE = "coco_instances_results.json"  # where COCOEvaluator saves the predictions


@pytest.fixture
def no_detectron2_cocoeval(monkeypatch: pytest.MonkeyPatch) -> None:
    """detectron2._C as in this project's install: importable, without the COCOeval functions."""
    monkeypatch.setitem(sys.modules, "detectron2._C", types.ModuleType("detectron2._C"))


@contextlib.contextmanager
def registered(gt: Dict, tmp_path: Path, name: str) -> Iterator[str]:
    """``gt`` as a COCO json, registered and loaded (for its category mapping) as ``name``."""
    json_file = tmp_path / f"{name}.json"
    json_file.write_text(json.dumps(gt))
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    try:
        DatasetCatalog.get(name)
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def evaluate(evaluator, gt: Dict, detections: Sequence[Dict]) -> Dict:
    """Feed ``detections`` (COCO results, category ids 1..K) to ``evaluator`` as model outputs."""
    by_image: Dict[int, List[Dict]] = {image["id"]: [] for image in gt["images"]}
    for det in detections:
        by_image[det["image_id"]].append(det)
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    evaluator.reset()
    for image_id, dets in by_image.items():
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64).reshape(-1, 4)
        instances = Instances(sizes[image_id])
        xyxy = BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        instances.pred_boxes = Boxes(xyxy.float())  # float32, as a model outputs them
        instances.scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
        instances.pred_classes = torch.tensor([d["category_id"] - 1 for d in dets])
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()


def pycocotools_eval(
    gt_file: Path, results_file: Path, max_dets: Sequence[int] = (1, 10, 100)
) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(results_file)), "bbox")
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def test_faster_coco_eval_gives_pycocotools_numbers(
    tmp_path: Path, no_detectron2_cocoeval: None
) -> None:
    gt, detections = generate(PARITY_CASE)
    areas = np.array([a["area"] for a in gt["annotations"]])
    per_image_category = Counter((d["image_id"], d["category_id"]) for d in detections)
    # The data reaches every corner case it is meant to.
    assert any(a["iscrowd"] for a in gt["annotations"])
    assert (areas < 32**2).any() and (areas >= 96**2).any()
    assert ((areas >= 32**2) & (areas < 96**2)).any()
    assert 1 not in {a["image_id"] for a in gt["annotations"]}
    assert max(per_image_category.values()) > 100

    with registered(gt, tmp_path, "coco_eval_parity") as name:
        evaluator = build_coco_evaluator(name, str(tmp_path))
        results = evaluate(evaluator, gt, detections)["bbox"]
    assert evaluator.implementations["bbox"].startswith("faster_coco_eval.")

    gt_file, results_file = tmp_path / f"{name}.json", tmp_path / RESULTS_FILE
    reference = pycocotools_eval(gt_file, results_file)
    assert 0.05 < reference.stats[0] < 0.5  # a non-trivial AP, neither all hits nor none
    # All 12 summary numbers (AP and AR at every IoU / size / maxDets), bit for bit.
    np.testing.assert_array_equal(evaluator.summary_stats["bbox"], reference.stats)
    assert [results[m] for m in METRICS] == [100 * float(v) for v in reference.stats[:6]]
    # Per-category AP, which detectron2 derives from the accumulated precision array.
    for k, category in enumerate(gt["categories"]):
        precision = reference.eval["precision"][:, :, k, 0, -1]
        expected = float(np.mean(precision[precision > -1]) * 100)
        assert results[f"AP-{category['name']}"] == expected
    # More than 100 detections per image and category matter: a larger cut finds more objects.
    larger_cut = pycocotools_eval(gt_file, results_file, (1, 10, 1000))
    assert larger_cut.stats[8] > reference.stats[8] + 0.01


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged(logger_name: str) -> Iterator[List[str]]:
    """INFO messages of one logger, whatever handlers and propagation earlier tests set up."""
    handler, log = _Messages(), logging.getLogger(logger_name)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_hand_computed_ap_and_the_log_names_the_implementation(
    tmp_path: Path, no_detectron2_cocoeval: None
) -> None:
    """One image, two boxes of one class; detections: hit (0.9), false positive (0.8), hit (0.7).

    Precision is 1 up to recall 0.5 and 2/3 from there to recall 1, at every IoU threshold (the
    hits are exact), so COCO's 101-point AP is (51 * 1 + 50 * 2/3) / 101.
    """
    box = {"image_id": 7, "category_id": 1, "iscrowd": 0}
    gt = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 200, "width": 300}],
        "annotations": [
            dict(box, id=1, bbox=[10, 10, 50, 40], area=2000),
            dict(box, id=2, bbox=[150, 100, 60, 60], area=3600),
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    detections = [
        {"image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.9},
        {"image_id": 7, "category_id": 1, "bbox": [240, 10, 40, 40], "score": 0.8},
        {"image_id": 7, "category_id": 1, "bbox": [150, 100, 60, 60], "score": 0.7},
    ]
    with logged("detectron2.evaluation.coco_evaluation") as messages:
        with registered(gt, tmp_path, "coco_eval_hand") as name:
            results = evaluate(build_coco_evaluator(name, str(tmp_path)), gt, detections)["bbox"]
    expected = (51 + 50 * 2 / 3) / 101 * 100
    for metric in ("AP", "AP50", "AP75", "APm"):
        assert results[metric] == pytest.approx(expected, abs=1e-9), metric
    assert np.isnan(results["APs"])  # no small objects
    prefix = "COCO bbox metrics computed by faster_coco_eval."
    assert any(m.startswith(prefix) for m in messages)


def test_detectron2_compiled_cocoeval_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = types.ModuleType("detectron2._C")
    stub.COCOevalEvaluateImages = stub.COCOevalAccumulate = lambda *args: None
    monkeypatch.setitem(sys.modules, "detectron2._C", stub)
    gt, _ = generate(SyntheticCase(num_images=2, num_categories=2, detections_per_image=1))
    with registered(gt, tmp_path, "coco_eval_compiled") as name:
        evaluator = build_coco_evaluator(name, str(tmp_path))
    assert evaluator.fast_cocoeval is None  # detectron2 keeps its own choice


def test_without_faster_coco_eval_pycocotools_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_detectron2_cocoeval: None
) -> None:
    for module in ("faster_coco_eval", "faster_coco_eval.core.faster_eval_api"):
        monkeypatch.setitem(sys.modules, module, None)
    case = SyntheticCase(num_images=3, num_categories=2, detections_per_image=20)
    gt, detections = generate(case)
    with registered(gt, tmp_path, "coco_eval_fallback") as name:
        evaluator = build_coco_evaluator(name, str(tmp_path))
        results = evaluate(evaluator, gt, detections)["bbox"]
    assert evaluator.fast_cocoeval is None
    assert evaluator.implementations["bbox"].startswith("pycocotools.cocoeval.COCOeval")
    reference = pycocotools_eval(tmp_path / f"{name}.json", tmp_path / RESULTS_FILE)
    assert results["AP"] == 100 * float(reference.stats[0])


def test_substitution_is_scoped_to_one_evaluation(
    tmp_path: Path, no_detectron2_cocoeval: None
) -> None:
    """detectron2's module-level COCOeval_opt is detectron2's own again after the evaluation."""
    from detectron2.evaluation import coco_evaluation

    case = SyntheticCase(num_images=2, num_categories=2, detections_per_image=10)
    gt, detections = generate(case)
    with registered(gt, tmp_path, "coco_eval_scoped") as name:
        evaluator = coco_backend.build_evaluator(name, str(tmp_path), detectron2_fast=False)
        evaluate(evaluator, gt, detections)
    assert evaluator.implementations["bbox"].startswith("faster_coco_eval.")
    assert coco_evaluation.COCOeval_opt.__module__.split(".")[0] in ("detectron2", "pycocotools")
