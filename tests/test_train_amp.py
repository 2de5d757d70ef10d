"""train_net.py with SOLVER.AMP on the CPU, in subprocesses on tiny data: a bfloat16 run
checkpointed and resumed, and 2-process gloo DDP in bfloat16 with TEST.AMP evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import ap_rows, run_train_net, shapes_run

BFLOAT16 = ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]


def _trainer_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["trainer"]


@pytest.mark.slow
def test_bfloat16_run_resumes_with_its_trainer_state(tmp_path: Path) -> None:
    """The AMP trainer's state (optimizer, scaler entry) survives a real checkpoint + --resume.

    float16 is not run here: its CPU convolutions use reference kernels ~100x slower than fp32; the
    GradScaler's own state round trip is tested in test_amp.py."""
    out = tmp_path / "out"
    opts = [
        *BFLOAT16,
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "DATASETS.TEST",
        "()",
    ]
    first = run_train_net(shapes_run(tmp_path, out, *opts))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "SOLVER.AMP: bfloat16 on cpu" in first.stdout
    assert _trainer_state(out / "model_0000001.pth")["_trainer"]["grad_scaler"] == {}

    (out / "last_checkpoint").write_text("model_0000001.pth")
    resumed = run_train_net(shapes_run(tmp_path, out, *opts, flags=["--resume"]))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Starting training from iteration 2" in resumed.stdout
    # AdamW's step counters continued from the checkpoint: 4 steps in all, not 2 after a restart.
    optimizer = _trainer_state(out / "model_final.pth")["_trainer"]["optimizer"]
    steps = {float(s["step"]) for s in optimizer["state"].values()}
    assert steps == {4.0}


@pytest.mark.slow
def test_two_process_gloo_bfloat16_training_with_test_amp_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_train_net(
        shapes_run(
            tmp_path,
            out,
            "SOLVER.AMP.ENABLED",
            "True",
            "SOLVER.AMP.PRECISION",
            "bfloat16",
            "TEST.AMP.ENABLED",
            "True",
            "TEST.AMP.PRECISION",
            "bfloat16",
            "SOLVER.MAX_ITER",
            "3",
            flags=["--num-gpus", "2", "--dist-url", "auto"],
        ),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert "SOLVER.AMP: bfloat16 on cpu" in log and "TEST.AMP: bfloat16 on cpu" in log
    assert (
        _trainer_state(out / "model_final.pth")["_trainer"]["grad_scaler"] == {}
    )  # no loss scaling
    assert list(ap_rows(result.stdout)) == ["bbox"]
