"""FCOSCheckpointer.save is atomic: a failure or kill -9 mid-save never corrupts what resume reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fcos.checkpoint as checkpoint_module
from fcos.checkpoint import FCOSCheckpointer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _model(value: float) -> nn.Module:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def test_save_writes_checkpoint_then_tag(tmp_path: Path) -> None:
    checkpointer = FCOSCheckpointer(_model(1.5), str(tmp_path), save_to_disk=True)
    checkpointer.save("model_0000009", iteration=9)

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    data = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert data["iteration"] == 9
    assert torch.equal(data["model"]["weight"], torch.full((2, 3), 1.5))
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]


def test_failure_mid_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = FCOSCheckpointer(_model(1.0), str(tmp_path), save_to_disk=True)
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()

    def half_written_then_crash(obj: object, f) -> None:
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_written_then_crash)
    checkpointer.model = _model(2.0)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_final")
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000019")

    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_tag_is_written_only_after_checkpoint_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replaced = []
    real_replace = os.replace

    def recording_replace(src: str, dst: str) -> None:
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", recording_replace)
    FCOSCheckpointer(_model(1.0), str(tmp_path), save_to_disk=True).save("model_0000004")
    assert replaced == ["model_0000004.pth", "last_checkpoint"]


def test_failed_tag_write_keeps_previous_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = FCOSCheckpointer(_model(1.0), str(tmp_path), save_to_disk=True)
    checkpointer.save("model_0000004")
    real_replace = os.replace

    def fail_on_tag(src: str, dst: str) -> None:
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", fail_on_tag)
    with pytest.raises(OSError, match="interrupted"):
        checkpointer.save("model_0000009")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_kill_9_during_save_leaves_resumable_last_checkpoint(tmp_path: Path) -> None:
    """A real SIGKILL while overwriting the checkpoint that ``last_checkpoint`` names (as a re-run that
    saves the same iteration does): resume still reads the complete previous version."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from torch import nn
        import fcos.checkpoint as m
        model = nn.Linear(3, 2)
        nn.init.constant_(model.weight, 7.0)
        checkpointer = m.FCOSCheckpointer(model, {str(tmp_path)!r}, save_to_disk=True)
        checkpointer.save("model_0000004")
        real_save = torch.save
        def save_then_die(obj, f):
            real_save(obj, f)
            f.seek(0)
            f.truncate(100)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        m.torch.save = save_then_die
        nn.init.constant_(model.weight, 9.0)
        checkpointer.save("model_0000004")
        """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    resumed = FCOSCheckpointer(_model(0.0), str(tmp_path))
    assert resumed.has_checkpoint()
    assert resumed.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    resumed.resume_or_load("", resume=True)
    assert torch.equal(resumed.model.weight, torch.full((2, 3), 7.0))
    leftovers = [
        name
        for name in os.listdir(tmp_path)
        if name not in ("last_checkpoint", "model_0000004.pth")
    ]
    assert len(leftovers) == 1 and leftovers[0].startswith(".") and leftovers[0].endswith(".tmp")


def test_atomic_write_gives_plain_file_permissions(tmp_path):
    """mkstemp's 0600 must not leak into checkpoints that other users/tools need to read."""
    previous = os.umask(0o022)
    try:
        checkpoint_module.atomic_write(str(tmp_path / "model.pth"), lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "model.pth").stat().st_mode & 0o777 == 0o644
