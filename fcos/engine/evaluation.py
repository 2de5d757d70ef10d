"""COCO evaluation that works with or without detectron2's C++ extension, and the AP table for the console.

detectron2's fast COCOeval lives in its C++ extension; the install used here has no compiled extension
(``detectron2._C`` is a stub), so the evaluator runs faster-coco-eval's COCOeval then
(``coco_backend.py``).
"""

from __future__ import annotations

import importlib
import math
from typing import List, Mapping, Tuple

from tabulate import tabulate

from .coco_backend import COCOEvaluator, build_evaluator

TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def has_fast_coco_eval() -> bool:
    """Whether detectron2's compiled COCOeval functions are importable."""
    try:
        ext = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return all(hasattr(ext, name) for name in ("COCOevalEvaluateImages", "COCOevalAccumulate"))


def build_coco_evaluator(dataset_name: str, output_dir: str) -> COCOEvaluator:
    """Box AP evaluator for ``dataset_name``; predictions are saved under ``output_dir``."""
    return build_evaluator(dataset_name, output_dir, detectron2_fast=has_fast_coco_eval())


def _metric_tables(
    results: Mapping[str, object], label: str = ""
) -> List[Tuple[str, Mapping[str, float]]]:
    """(label, metrics) for every COCO metrics dict nested in ``results``, labelled by its key path."""
    if "AP" in results:
        return [(label, results)]  # type: ignore[list-item]
    found = []
    for key, value in results.items():
        if isinstance(value, Mapping):
            found += _metric_tables(value, f"{label}/{key}" if label else str(key))
    return found


def format_ap_table(results: Mapping[str, object]) -> str:
    """The main COCO box metrics as a table, one row per evaluated dataset (and TTA run).

    ``results`` is what ``DefaultTrainer.test`` returns (``{"bbox": {...}}`` for one dataset,
    ``{dataset: {"bbox": {...}}}`` for several, ``_TTA`` keys for test-time augmentation). A NaN
    metric (no objects of that size) shows as "-".
    """
    rows = []
    for label, metrics in _metric_tables(results):
        values = [float(metrics.get(m, float("nan"))) for m in TABLE_METRICS]
        rows.append([label] + ["-" if math.isnan(v) else f"{v:.2f}" for v in values])
    if not rows:
        return "no box AP results (DATASETS.TEST is empty?)"
    return tabulate(
        rows,
        headers=["evaluation"] + list(TABLE_METRICS),
        tablefmt="pipe",
        stralign="right",
        disable_numparse=True,
    )
