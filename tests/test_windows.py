"""The project on Windows, simulated (tests/windows_sim.py): project code gets no POSIX-only module
and every process starts with "spawn". Under it the entry points, an import of every project module,
a custom-data training with spawned DataLoader workers and a 2-process gloo launch run in
subprocesses. A static check adds what the simulation cannot see: POSIX-only imports in code that
did not run, and POSIX-only ``os``/``signal`` attributes.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import windows_sim
from train_helpers import REPO, TINY_OPTS, ap_rows, simple_boxes, simple_categories, write_coco

# Attributes that exist only on POSIX (calling one on Windows raises AttributeError).
POSIX_ONLY_ATTRIBUTES = {
    "os": {
        "fork",
        "forkpty",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "getpgid",
        "getpgrp",
        "setsid",
        "setpgrp",
        "setuid",
        "setgid",
        "killpg",
        "getloadavg",
        "sched_getaffinity",
        "sched_setaffinity",
        "fchown",
        "chown",
        "lchown",
        "mkfifo",
        "nice",
        "uname",
        "wait3",
        "wait4",
        "WNOHANG",
        "O_CLOEXEC",
    },
    "signal": {
        "SIGKILL",
        "SIGHUP",
        "SIGQUIT",
        "SIGALRM",
        "SIGUSR1",
        "SIGUSR2",
        "SIGCHLD",
        "SIGPIPE",
        "SIGSTOP",
        "SIGCONT",
        "alarm",
        "setitimer",
        "pause",
        "pthread_kill",
        "siginterrupt",
    },
}


def project_files() -> List[Path]:
    """Every Python file of the library and the applications (not the tests)."""
    files = sorted((REPO / "fcos").rglob("*.py")) + [REPO / "train_net.py"]
    for folder in ("demo", "tools", "dataset", "bench"):
        files += sorted((REPO / folder).glob("*.py"))
    return files


def project_modules() -> Dict[str, Path]:
    """Module name -> file, as the applications' own ``sys.path`` names it (demo/, tools/ on it)."""
    modules: Dict[str, Path] = {}
    for path in project_files():
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[0] in ("demo", "tools"):
            parts = parts[1:]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def run_simulated(
    tmp_path: Path,
    args: List[str],
    log: Optional[Path] = None,
    timeout: float = 300,
    extra_paths: Tuple[Path, ...] = (),
) -> subprocess.CompletedProcess:
    """``python args`` from the repository root under the simulation."""
    env = windows_sim.environment(tmp_path / "site", extra_paths, log)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- the simulation itself


def test_simulation_refuses_posix_modules_to_project_code_only(tmp_path: Path) -> None:
    """A fake project under FCOS_WINDOWS_SIM_ROOT: its modules are refused fcntl/resource (also via
    importlib and when already imported), a third-party module it imports keeps fcntl, and the start
    method is spawn for multiprocessing and torch.multiprocessing."""
    root = tmp_path / "project"
    (root / "fcos").mkdir(parents=True)
    (root / "vendor").mkdir()
    (root / "fcos" / "__init__.py").write_text("")
    (root / "fcos" / "direct.py").write_text("import fcntl\n")
    (root / "fcos" / "dynamic.py").write_text("import importlib as i\ni.import_module('resource')")
    (root / "fcos" / "uses_vendor.py").write_text("import vendor_lib\nX = vendor_lib.fcntl.LOCK_EX")
    (root / "vendor" / "vendor_lib.py").write_text("import fcntl\n")
    probe = textwrap.dedent("""
        import fcntl, json, multiprocessing, sys
        import torch.multiprocessing
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/vendor"]
        outcome = {}
        for name in ("fcos.direct", "fcos.dynamic", "fcos.uses_vendor"):
            try:
                __import__(name)
                outcome[name] = "ok"
            except ModuleNotFoundError as err:
                outcome[name] = err.name
        outcome["start"] = [multiprocessing.get_start_method(),
                            torch.multiprocessing.get_start_method()]
        print(json.dumps(outcome))
    """)
    env = windows_sim.environment(tmp_path / "site")
    env[windows_sim.ROOT_VARIABLE] = str(root)
    command = [sys.executable, "-c", probe, str(root)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "fcos.direct": "fcntl",
        "fcos.dynamic": "resource",
        "fcos.uses_vendor": "ok",
        "start": ["spawn", "spawn"],
    }


# --------------------------------------------------------------------------- static check


def _guarded_by_import_error(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` is in a ``try`` whose handlers catch ImportError or ModuleNotFoundError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if caught & {"ImportError", "ModuleNotFoundError"}:
                return True
    return False


def _guarded_by_hasattr(
    node: ast.AST, parents: Dict[ast.AST, ast.AST], module: str, attribute: str
) -> bool:
    """Whether ``node`` is under an ``if``/``x if c else y`` testing ``hasattr(module, attr)``."""
    guard = f"hasattr({module}, '{attribute}')"
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.If, ast.IfExp)) and guard in ast.unparse(node.test):
            return True
    return False


def posix_only_uses(path: Path) -> Iterator[str]:
    """``line: what`` for each unguarded POSIX-only import or ``os``/``signal`` attribute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
            if node.module in POSIX_ONLY_ATTRIBUTES:
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module, attribute = node.value.id, node.attr
            if attribute in POSIX_ONLY_ATTRIBUTES.get(module, ()) and not _guarded_by_hasattr(
                node, parents, module, attribute
            ):
                yield f"{node.lineno}: {module}.{attribute}"
            continue
        else:
            continue
        for name in names:
            module, _, attribute = name.partition(".")
            posix = module in windows_sim.POSIX_ONLY
            posix = posix or attribute in POSIX_ONLY_ATTRIBUTES.get(module, ())
            if posix and not _guarded_by_import_error(node, parents):
                yield f"{node.lineno}: import {name}"


def test_no_posix_only_module_or_attribute_in_project_code() -> None:
    files = project_files()
    names = {p.relative_to(REPO).as_posix() for p in files}
    assert names >= {"fcos/data/shapes.py", "bench/common.py", "train_net.py", "demo/demo.py"}
    found = {str(p.relative_to(REPO)): list(posix_only_uses(p)) for p in files}
    assert {name: uses for name, uses in found.items() if uses} == {}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import fcntl\n", ["1: import fcntl"]),
        ("def f():\n    from resource import getrusage\n", ["2: import resource"]),
        ("import os\nos.fork()\n", ["2: os.fork"]),
        ("import signal\nx = signal.SIGKILL\n", ["2: signal.SIGKILL"]),
        ("from os import getuid\n", ["1: import os.getuid"]),
        ("try:\n    import resource\nexcept ModuleNotFoundError:\n    resource = None\n", []),
        ("import os\nload = os.getloadavg() if hasattr(os, 'getloadavg') else None\n", []),
    ],
)
def test_the_static_check_catches_posix_only_code(
    tmp_path: Path, source: str, expected: List[str]
) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert list(posix_only_uses(probe)) == expected


# --------------------------------------------------------------------------- under the simulation


@pytest.mark.parametrize(
    "script", ["train_net.py", "demo/demo.py", "dataset/voc2coco.py", "dataset/check.py"]
)
def test_entry_point_help(tmp_path: Path, script: str) -> None:
    result = run_simulated(tmp_path, [script, "--help"], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: ")


def test_every_project_module_imports(tmp_path: Path) -> None:
    modules = project_modules()
    assert {
        "fcos.engine.launch",
        "fcos.data.shapes",
        "train_net",
        "demo",
        "predictor",
        "export",
        "dataset.voc2coco",
        "bench.common",
    } <= set(modules)
    probe = textwrap.dedent("""
        import importlib, json, sys, traceback
        loaded, failed = {}, {}
        for name in json.loads(sys.argv[1]):
            try:
                loaded[name] = importlib.import_module(name).__file__
            except Exception:
                failed[name] = traceback.format_exc(limit=-3)
        print(json.dumps({"loaded": loaded, "failed": failed}))
    """)
    result = run_simulated(
        tmp_path,
        ["-c", probe, json.dumps(sorted(modules))],
        timeout=240,
        extra_paths=(REPO / "demo", REPO / "tools"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["failed"] == {}
    assert {name: Path(file).resolve() for name, file in outcome["loaded"].items()} == modules


def _custom_data(root: Path) -> List[str]:
    """train_net.py flags for a tiny two-class COCO-format dataset (4 train, 2 val images)."""
    categories = simple_categories(2)
    train_json, train_images = write_coco(root, "train", categories, simple_boxes(4, 2))
    val_json, val_images = write_coco(root, "val", categories, simple_boxes(2, 2))
    return [
        "--ann_file_train",
        str(train_json),
        "--image_dir_train",
        str(train_images),
        "--ann_file_val",
        str(val_json),
        "--image_dir_val",
        str(val_images),
    ]


def _tiny_run(tmp_path: Path, flags: Tuple[str, ...] = (), opts: Tuple[str, ...] = ()) -> List[str]:
    """train_net.py arguments: 2 iterations on the tiny custom data, then its evaluation."""
    return [
        "train_net.py",
        "--config-file",
        str(REPO / "configs" / "fcos_shapes.yaml"),
        *flags,
        *_custom_data(tmp_path / "data"),
        *TINY_OPTS,
        "SOLVER.MAX_ITER",
        "2",
        "MODEL.DEVICE",
        "cpu",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        *opts,
    ]


@pytest.mark.slow
def test_custom_data_training_with_spawned_dataloader_workers(tmp_path: Path) -> None:
    log = tmp_path / "processes.txt"
    args = _tiny_run(tmp_path, opts=("DATALOADER.NUM_WORKERS", "2"))
    result = run_simulated(tmp_path, args, log=log)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert list(ap_rows(result.stdout)) == ["bbox"]
    # 2 training workers, then 2 for the evaluation loader (one process, so no launch children).
    assert windows_sim.spawned_processes(log) == 4


@pytest.mark.slow
def test_two_process_gloo_launch(tmp_path: Path) -> None:
    log = tmp_path / "processes.txt"
    args = _tiny_run(tmp_path, flags=("--num-gpus", "2", "--dist-url", "auto"))
    result = run_simulated(tmp_path, args, log=log)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "World size: 2" in (tmp_path / "out" / "log.txt").read_text()
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert windows_sim.spawned_processes(log) == 2
