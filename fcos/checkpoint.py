"""FCOSCheckpointer: detectron2's checkpointer with crash-safe saves.

A training job can be killed at any moment (OOM killer, preemption, kill -9). detectron2's
``Checkpointer.save`` writes ``model_XXXX.pth`` in place and then rewrites ``last_checkpoint``; a kill in
between leaves a truncated file that ``--resume`` picks up and fails on. Here every file is written to a
temporary name in the same folder, flushed to disk and renamed over the final name (``os.replace`` is
atomic within a file system), and ``last_checkpoint`` is only rewritten, the same way, after the
checkpoint is complete. A reader therefore sees either the old state or the new one, never a partial file.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, IO

import torch
from detectron2.checkpoint import DetectionCheckpointer

LAST_CHECKPOINT_TAG = "last_checkpoint"
# Temporary files start with "." and end in ".tmp" so that neither detectron2's
# ``get_all_checkpoint_files`` (``*.pth``) nor a user listing checkpoints mistakes one for a checkpoint.
_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: str) -> None:
    """Persist a rename: the directory entry itself must reach the disk, not only the file's data."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` so that it either keeps its old content or has the complete new content.

    ``write`` receives a binary file object on a temporary file in the same folder (same file system,
    so the final ``os.replace`` is atomic). On any error the temporary file is removed and ``path`` is
    untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f"{_TMP_PREFIX}{os.path.basename(path)}.", suffix=_TMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    _fsync_dir(directory)


class FCOSCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` never leaves ``last_checkpoint`` pointing at a partial file.

    ``save_dir`` must be a local folder (the atomic rename needs a real file system).
    """

    def save(self, name: str, **kwargs: Any) -> None:
        """Dump the model and checkpointables to ``{save_dir}/{name}.pth`` atomically, then tag it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name, not a path")
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        tag_file = os.path.join(self.save_dir, LAST_CHECKPOINT_TAG)
        atomic_write(tag_file, lambda f: f.write(last_filename_basename.encode("utf-8")))
