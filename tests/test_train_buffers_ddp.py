"""With trainable BatchNorm, 2-process training must evaluate and save one model.

Each process sees its own images, so its BatchNorm running statistics drift apart from the others'.
The final evaluation of a training run (each process evaluates its share of the val set) must give
the detections that ``--eval-only`` of the saved ``model_final.pth`` gives, and a ``--resume``d run
must keep that property. A unit test checks the buffer averaging itself on hand-set values.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from detectron2.utils import comm
from torch import nn
from train_helpers import ap_rows, run_train_net, shapes_run

from fcos.engine.hooks import synchronize_buffers
from fcos.engine.launch import launch

TWO_PROCESSES = ["--num-gpus", "2", "--dist-url", "auto"]
# Trainable BN backbone (the embedded config's), 1 image per process, every candidate kept at test
# time
# so that the detections depend on every BN statistic.
OPTS = [
    "SOLVER.MAX_ITER",
    "4",
    "SOLVER.CHECKPOINT_PERIOD",
    "2",
    "TEST.EVAL_PERIOD",
    "0",
    "MODEL.FCOS.SCORE_THRESH_TEST",
    "0.0",
    "SOLVER.BASE_LR",
    "0.01",
]


def _detections(results_file: Path) -> Dict[int, List[dict]]:
    by_image: Dict[int, List[dict]] = defaultdict(list)
    for det in json.loads(results_file.read_text()):
        by_image[det["image_id"]].append(det)
    return {k: sorted(v, key=lambda d: -d["score"]) for k, v in by_image.items()}


def _assert_same_detections(trained: Path, evaluated: Path) -> None:
    a, b = _detections(trained), _detections(evaluated)
    assert a.keys() == b.keys() and len(a) == 4
    for image_id in a:
        assert len(a[image_id]) == len(b[image_id]) > 0, image_id
        for x, y in zip(a[image_id], b[image_id]):
            assert x["score"] == pytest.approx(y["score"], abs=1e-4), image_id
        for x in a[image_id]:
            # Same box and class among detections of nearly the same score (ties may swap order).
            close = [
                y
                for y in b[image_id]
                if abs(y["score"] - x["score"]) <= 1e-4 and y["category_id"] == x["category_id"]
            ]
            assert any(
                max(abs(p - q) for p, q in zip(x["bbox"], y["bbox"])) < 1e-2 for y in close
            ), image_id


def _train_then_compare(tmp_path: Path, out: Path, flags: List[str]) -> str:
    """Train (2 processes), --eval-only model_final.pth (1 process); compare detections and AP."""
    trained = run_train_net(
        shapes_run(tmp_path, out, *OPTS, flags=TWO_PROCESSES + flags), timeout=400
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    shutil.copy(out / "inference" / "coco_instances_results.json", tmp_path / "trained.json")
    eval_out = tmp_path / "eval"
    evaluated = run_train_net(
        shapes_run(
            tmp_path,
            eval_out,
            *OPTS,
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            flags=["--eval-only"],
        )
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    _assert_same_detections(
        tmp_path / "trained.json", eval_out / "inference" / "coco_instances_results.json"
    )
    assert ap_rows(trained.stdout) == ap_rows(evaluated.stdout)
    return trained.stdout


@pytest.mark.slow
def test_final_evaluation_and_resume_match_eval_only_of_the_saved_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _train_then_compare(tmp_path, out, [])
    # Resume from the mid-run checkpoint (iteration 1): 2 more steps in 2 processes, same property.
    (out / "last_checkpoint").write_text("model_0000001.pth")
    resumed = _train_then_compare(tmp_path, out, ["--resume"])
    assert "Starting training from iteration 2" in resumed


def _buffer_worker(result_file: str) -> None:
    """Rank r sets running_mean r + 1, running_var 2 (r + 1); rank 0 writes the synced values."""
    rank = comm.get_rank()
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    bn = model[1]
    bn.running_mean.fill_(rank + 1.0)
    bn.running_var.fill_(2.0 * (rank + 1))
    bn.num_batches_tracked.fill_(7)
    synchronize_buffers(model)
    values = comm.all_gather(
        {k: v.tolist() for k, v in bn.state_dict().items() if k.startswith(("running", "num"))}
    )
    if rank == 0:
        Path(result_file).write_text(json.dumps(values))


@pytest.mark.slow
def test_synchronize_buffers_averages_floating_buffers(tmp_path: Path) -> None:
    result_file = tmp_path / "buffers.json"
    launch(_buffer_worker, 2, dist_url="auto", args=(str(result_file),), device="cpu")
    per_rank = json.loads(result_file.read_text())
    expected = {"running_mean": [1.5, 1.5], "running_var": [3.0, 3.0], "num_batches_tracked": 7}
    assert per_rank == [expected, expected]


def test_synchronize_buffers_is_a_no_op_in_one_process() -> None:
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(4.0)
    synchronize_buffers(bn)
    assert torch.equal(bn.running_mean, torch.full((3,), 4.0))
