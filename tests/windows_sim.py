"""Windows, as far as a Linux process can pretend, for the subprocess tests of test_windows.py.

Two things break a POSIX-only project on Windows before anything else, and both are simulated in
every process of a run, spawned children included (``sitecustomize`` on ``PYTHONPATH`` is imported
at the start of each Python process, and children inherit the environment):

* POSIX-only modules (``fcntl``, ``resource``, ``pwd``, ``grp``, ``termios``) do not exist. Only the
  project's own code is refused them: third-party packages (torch, detectron2, portalocker,
  multiprocessing, ...) have Windows branches of their own that this cannot run, so they keep the
  modules. Who imports is read from the importing module's ``__file__``; both ``import``
  statements (``builtins.__import__``) and ``importlib.import_module`` are checked, and a module
  already in ``sys.modules`` is refused too.
* New processes start with "spawn" (multiprocessing's default context, which torch.multiprocessing
  and DataLoader workers use), so everything sent to a worker must pickle and module top levels run
  again in each child.

Not simulated: ``os.path`` stays POSIX, drive letters and backslash separators do not exist, file
locking and ``os.replace`` keep POSIX semantics, and there is no CUDA.
"""

from __future__ import annotations

import builtins
import importlib
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
POSIX_ONLY = frozenset({"fcntl", "resource", "pwd", "grp", "termios"})
# The project's own code: the library and the applications (first path component under the root).
PROJECT_ENTRIES = frozenset({"fcos", "train_net.py", "demo", "tools", "dataset", "bench"})
# Overrides the project root; only the simulation's own test points it elsewhere.
ROOT_VARIABLE = "FCOS_WINDOWS_SIM_ROOT"
# When set, every simulated process appends its sys.argv to this file: spawned children show up as
# "-c --multiprocessing-fork" (a forked child would not run sitecustomize and would be missing).
LOG_VARIABLE = "FCOS_WINDOWS_SIM_LOG"


def is_project_file(path: Optional[str], root: Path) -> bool:
    """Whether ``path`` (a module's ``__file__``) is project code under ``root``."""
    if not path:
        return False
    try:
        relative = Path(path).resolve().relative_to(root)
    except ValueError:
        return False
    return bool(relative.parts) and relative.parts[0] in PROJECT_ENTRIES


def _refuse(name: str, importer_globals: Optional[Mapping[str, Any]], root: Path) -> None:
    """Raise what Windows raises when ``name`` is POSIX-only and the importer is project code."""
    if name.partition(".")[0] not in POSIX_ONLY:
        return
    importer = (importer_globals or {}).get("__file__")
    if is_project_file(importer, root):
        message = f"No module named '{name}' (Windows simulation: project code {importer})"
        raise ModuleNotFoundError(message, name=name)


def install(root: Optional[Path] = None) -> None:
    """Refuse POSIX-only modules to project code under ``root``; make "spawn" the start method."""
    root = (root or Path(os.environ.get(ROOT_VARIABLE, REPO))).resolve()
    original_import: Callable[..., Any] = builtins.__import__
    original_import_module = importlib.import_module

    def guarded_import(
        name: str,
        globals: Optional[Mapping[str, Any]] = None,
        locals: Any = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        if level == 0:
            _refuse(name, globals if globals is not None else sys._getframe(1).f_globals, root)
        return original_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name: str, package: Optional[str] = None) -> Any:
        if not name.startswith("."):
            _refuse(name, sys._getframe(1).f_globals, root)
        return original_import_module(name, package)

    builtins.__import__ = guarded_import
    importlib.import_module = guarded_import_module
    multiprocessing.set_start_method("spawn", force=True)
    log = os.environ.get(LOG_VARIABLE)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(" ".join(sys.argv) + "\n")


def spawned_processes(log: Path) -> int:
    """How many processes of a run recorded in ``log`` were started by multiprocessing's spawn."""
    lines = log.read_text().splitlines()
    return sum(line.split() == ["-c", "--multiprocessing-fork"] for line in lines)


def environment(
    site_dir: Path, extra_paths: Tuple[Path, ...] = (), log: Optional[Path] = None
) -> Dict[str, str]:
    """``os.environ`` for a simulated run: a ``sitecustomize`` in ``site_dir`` that installs the
    simulation, then ``extra_paths`` and this checkout on ``PYTHONPATH`` (so ``import fcos`` is this
    checkout's, whichever one is installed); ``log`` records the run's processes."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text("import windows_sim\nwindows_sim.install()\n")
    paths = [site_dir, Path(__file__).resolve().parent, *extra_paths, REPO]
    inherited = os.environ.get("PYTHONPATH")
    pythonpath = os.pathsep.join([str(p) for p in paths] + ([inherited] if inherited else []))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    if log is not None:
        env[LOG_VARIABLE] = str(log)
    return env
