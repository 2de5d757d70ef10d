"""Crash-safe file output: every file the project writes is either complete or absent.

A run can be killed at any moment (OOM killer, preemption, Ctrl-C, kill -9). Each writer here fills a
temporary file in the destination folder (same file system, so the final ``os.replace`` is atomic on
POSIX and Windows alike), flushes it, gives it the permissions a plain ``open()`` would have
(``0666 & ~umask``; ``mkstemp`` creates ``0600``) and only then renames it over the target. A reader
sees the old file or the new one, never a torn one. A crash before the rename leaves at most a hidden
temporary file (name starting with ``.``) that nothing loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    """The process umask (only readable by setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    """Persist a rename: on POSIX the directory entry itself must reach the disk.

    Windows cannot open a directory as a file (``PermissionError``); NTFS journals the rename itself.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: PathLike, *, keep_extension: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    For writers that take a file name (OpenCV, ONNX, matplotlib). On any exception the temporary file
    is removed and ``path`` is untouched. ``keep_extension`` ends the temporary name with ``path``'s
    extension, for writers that choose the format from it (``cv2.imwrite``); otherwise it ends in
    ``.tmp``, so that globs such as detectron2's ``*.pth`` checkpoint listing never match it.
    """
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    suffix = ".tmp" + (os.path.splitext(name)[1] if keep_extension else "")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Let ``write`` fill a binary file object, flushed to disk, that then replaces ``path``."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Serialise ``obj`` as JSON (``json.dumps`` keywords pass through) and write it atomically."""
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs))


def copy_file_atomic(source: PathLike, destination: PathLike) -> None:
    """Copy ``source``'s bytes to ``destination`` atomically."""

    def copy(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    atomic_write(destination, copy)
