"""train_net.py with several processes, in subprocesses on tiny data: 2-process gloo DDP with IN_FEATURES
p3-p5, NORM_SYNC and a SyncBN head (seed defect 4), two "machines" on one host, and resume after kill -9.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.engine.launch import _find_free_port
from train_helpers import REPO, TRAIN_NET, ap_rows, run_train_net, shapes_run

# P3-P5 with res5 (the p3-p5 subset of the seed's defect 4); objects of the 64 px images split over 3 levels.
P3_P5_OPTS = [
    "MODEL.RESNETS.OUT_FEATURES",
    "['res3', 'res4', 'res5']",
    "MODEL.FPN.IN_FEATURES",
    "['res3', 'res4', 'res5']",
    "MODEL.FCOS.IN_FEATURES",
    "['p3', 'p4', 'p5']",
    "MODEL.FCOS.FPN_STRIDES",
    "[8, 16, 32]",
    "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
    "[[-1, 16], [16, 32], [32, 100000]]",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone", ["build_fcos_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone"]
)
def test_two_process_gloo_training_with_p3_p5_norm_sync_and_syncbn(
    tmp_path: Path, backbone: str
) -> None:
    out = tmp_path / "out"
    result = run_train_net(
        shapes_run(
            tmp_path,
            out,
            *P3_P5_OPTS,
            "MODEL.BACKBONE.NAME",
            backbone,
            "MODEL.FCOS.HEAD_NORM",
            "SyncBN",
            "MODEL.FCOS.NORM_SYNC",
            "True",
            "SOLVER.MAX_ITER",
            "3",
            flags=["--num-gpus", "2", "--dist-url", "auto"],
        ),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert "Batch 2 images over 2 process(es)" in log
    # Only the seed's backbone builds P6/P7 that the p3-p5 head does not use, and only it needs the fallback.
    assert ("find_unused_parameters=True" in log) == (
        backbone == "build_retinanet_resnet_fpn_backbone"
    )
    assert (out / "model_final.pth").is_file()
    assert list(ap_rows(result.stdout)) == ["bbox"]


@pytest.mark.slow
def test_two_machines_on_one_host(tmp_path: Path) -> None:
    # --num-machines/--machine-rank/--dist-url: one process per "machine", rendezvous over TCP.
    url = f"tcp://127.0.0.1:{_find_free_port()}"
    out = tmp_path / "out"
    env = dict(os.environ)
    logs = [tmp_path / f"machine{rank}.txt" for rank in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as sink:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(TRAIN_NET),
                        *shapes_run(
                            tmp_path,
                            out,
                            "SOLVER.MAX_ITER",
                            "2",
                            flags=[
                                "--num-machines",
                                "2",
                                "--machine-rank",
                                str(rank),
                                "--num-gpus",
                                "1",
                                "--dist-url",
                                url,
                            ],
                        ),
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    for proc in procs:
        proc.wait(timeout=300)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "Rank of current process: 0. World size: 2" in (out / "log.txt").read_text()
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert list(ap_rows(outputs[0])) == ["bbox"]


def _wait_for_checkpoint(
    out: Path, proc: subprocess.Popen, min_iteration: int, timeout: float = 180
) -> None:
    deadline = time.monotonic() + timeout
    tag = out / "last_checkpoint"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        if (
            tag.is_file()
            and (m := re.match(r"model_(\d+)\.pth", tag.read_text()))
            and int(m[1]) >= min_iteration
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of iteration >= {min_iteration} within {timeout} s")


@pytest.mark.slow
def test_resume_after_kill_9_continues_iteration_lr_and_optimizer_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    max_iter = 14
    # A checkpoint every iteration, so the kill is likely to land during a save. Warmup spans the whole
    # run (detectron2 caps it at MAX_ITER): lr(i) = base * (0.001 * (1 - i / max_iter) + i / max_iter).
    opts = [
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "DATASETS.TEST",
        "()",
        "SOLVER.WARMUP_ITERS",
        "1000",
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.BASE_LR",
        "0.001",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_NET), *shapes_run(tmp_path, out, *opts)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
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

    resumed = run_train_net(shapes_run(tmp_path, out, *opts, flags=["--resume"]))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Starting training from iteration {done + 1}" in resumed.stdout
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == final["trainer"]["iteration"] == max_iter - 1
    # The LR schedule and AdamW's step counters continued: one step per iteration since iteration 0
    # (restarted ones would count only the iterations after the resume).
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == max_iter
    steps = {float(s["step"]) for s in final["trainer"]["_trainer"]["optimizer"]["state"].values()}
    assert steps == {float(max_iter)}
    metrics = [
        json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()
    ]
    last_lr = [m["lr"] for m in metrics if m.get("iteration") == max_iter - 1][-1]
    alpha = (max_iter - 1) / max_iter
    assert last_lr == pytest.approx(0.001 * (0.001 * (1 - alpha) + alpha), rel=1e-6)
