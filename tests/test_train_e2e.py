"""train_net.py end to end, in subprocesses, on tiny data: the embedded job (train -> checkpoint ->
--eval-only -> AP table), COCO through DETECTRON2_DATASETS, 2-process gloo DDP, resume after kill -9,
and a bad-data run that stops before training."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from train_helpers import (
    REPO,
    SHAPES_CONFIG,
    TINY_OPTS,
    TRAIN_NET,
    run_train_net,
    simple_boxes,
    tiny_shapes_opts,
    write_coco,
)

# P3-P5 with res5 (the p3-p5 subset of the seed's defect 4); objects of the 64 px images split over 3 levels.
P3_P5_OPTS = [
    "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FCOS.IN_FEATURES", "['p3', 'p4', 'p5']",
    "MODEL.FCOS.FPN_STRIDES", "[8, 16, 32]",
    "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST", "[[-1, 16], [16, 32], [32, 100000]]",
    "MODEL.FCOS.TOP_BLOCK_IN_FEATURE", "res5",
]


def ap_rows(output: str) -> Dict[str, List[str]]:
    """Rows of the final AP table that train_net.py prints: label -> [AP, AP50, AP75, APs, APm, APl]."""
    table = output[output.rindex("Box AP on"):]
    rows = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7:
            break
        rows[cells[0]] = cells[1:]
    return rows


def _shapes_run(tmp_path: Path, out: Path, *opts: str, flags: Sequence[str] = ()) -> List[str]:
    """Command line for the tiny embedded job: ``flags`` (e.g. --eval-only) before the config ``opts``."""
    return ["--config-file", str(SHAPES_CONFIG), *flags, *TINY_OPTS, *tiny_shapes_opts(tmp_path / "shapes"),
            "OUTPUT_DIR", str(out), *opts]


@pytest.mark.slow
def test_embedded_job_trains_checkpoints_and_evaluates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trained = run_train_net(_shapes_run(tmp_path, out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "config_my.yaml", "log.txt", "metrics.json", "training_curves.png",
            "model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert (out / "config_my.yaml").read_text() == SHAPES_CONFIG.read_text()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert "NUM_CLASSES: 4" in (out / "config.yaml").read_text()  # from the dataset's 4 categories
    train_rows = ap_rows(trained.stdout)
    assert list(train_rows) == ["bbox"]
    assert "Box AP on ['shapes_val']" in (out / "log.txt").read_text()

    evaluated = run_train_net(_shapes_run(tmp_path, tmp_path / "eval", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                                          flags=["--eval-only"]))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # Same weights, same images, deterministic inference: the same table as after training.
    assert ap_rows(evaluated.stdout) == train_rows


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
        ["--config-file", str(REPO / "configs" / "Base-FCOS.yaml"), *TINY_OPTS,
         "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
         "MODEL.BACKBONE.FREEZE_AT", "0", "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.001", "OUTPUT_DIR", str(out)],
        env={"DETECTRON2_DATASETS": str(root)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Loaded 3 images in COCO format from {root}/coco/annotations/instances_train2017.json" in log
    assert "NUM_CLASSES: 80" in (out / "config.yaml").read_text()
    assert list(ap_rows(result.stdout)) == ["bbox"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["build_fcos_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone"])
def test_two_process_gloo_training_with_p3_p5_norm_sync_and_syncbn(tmp_path: Path, backbone: str) -> None:
    out = tmp_path / "out"
    result = run_train_net(
        _shapes_run(tmp_path, out, *P3_P5_OPTS, "MODEL.BACKBONE.NAME", backbone,
                    "MODEL.FCOS.HEAD_NORM", "SyncBN", "MODEL.FCOS.NORM_SYNC", "True",
                    "SOLVER.MAX_ITER", "3", "SOLVER.REFERENCE_WORLD_SIZE", "0",
                    flags=["--num-gpus", "2", "--dist-url", "auto"]),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert "Batch 2 images over 2 process(es)" in log
    # Only the seed's backbone builds P6/P7 that the p3-p5 head does not use, and only it needs the fallback.
    assert ("find_unused_parameters=True" in log) == (backbone == "build_retinanet_resnet_fpn_backbone")
    assert (out / "model_final.pth").is_file()
    assert list(ap_rows(result.stdout)) == ["bbox"]


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, min_iteration: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    tag = out / "last_checkpoint"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        if tag.is_file() and (m := re.match(r"model_(\d+)\.pth", tag.read_text())) and int(m[1]) >= min_iteration:
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of iteration >= {min_iteration} within {timeout} s")


@pytest.mark.slow
def test_resume_after_kill_9_continues_iteration_lr_and_optimizer_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    max_iter = 14
    # A checkpoint every iteration, so the kill is likely to land during a save. Warmup spans the whole
    # run (detectron2 caps it at MAX_ITER): lr(i) = base * (0.001 * (1 - i / max_iter) + i / max_iter).
    opts = ["SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()", "SOLVER.WARMUP_ITERS", "1000",
            "SOLVER.MAX_ITER", str(max_iter)]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_NET), *_shapes_run(tmp_path, out, *opts)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for_checkpoint(out, proc, min_iteration=3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    last = (out / "last_checkpoint").read_text()
    checkpoint = torch.load(out / last, map_location="cpu", weights_only=True)
    done = checkpoint["iteration"]
    assert last == f"model_{done:07d}.pth" and done < max_iter - 1

    resumed = run_train_net(_shapes_run(tmp_path, out, *opts, flags=["--resume"]))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Starting training from iteration {done + 1}" in resumed.stdout
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == final["trainer"]["iteration"] == max_iter - 1
    # The LR schedule and AdamW's step counters continued: one step per iteration since iteration 0
    # (restarted ones would count only the iterations after the resume).
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == max_iter
    steps = {float(s["step"]) for s in final["trainer"]["_trainer"]["optimizer"]["state"].values()}
    assert steps == {float(max_iter)}
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    last_lr = [m["lr"] for m in metrics if m.get("iteration") == max_iter - 1][-1]
    alpha = (max_iter - 1) / max_iter
    assert last_lr == pytest.approx(0.001 * (0.001 * (1 - alpha) + alpha), rel=1e-6)


@pytest.mark.slow
def test_bad_data_stops_before_training_with_one_message(tmp_path: Path) -> None:
    categories = [{"id": 1, "name": "a"}]
    ann_file, image_dir = write_coco(tmp_path, "train", categories, [[(1, [4.0, 4.0, 10.0, 10.0])]])
    (image_dir / "0.png").unlink()
    out = tmp_path / "out"
    result = run_train_net(["--config-file", str(SHAPES_CONFIG), "--ann_file_train", str(ann_file),
                            "--image_dir_train", str(image_dir), "OUTPUT_DIR", str(out)])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{image_dir / '0.png'}: image file missing" in result.stderr
    assert not out.exists()
