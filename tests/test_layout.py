"""The package's layering rule, read from the source (every import statement, also inside functions).

* The model part (the modules directly in ``fcos/``) imports only the standard library, torch,
  torchvision, detectron2, fvcore, iopath, numpy and tabulate (the last two are detectron2's own
  top-level dependencies: numpy for checkpoints pickled as arrays, tabulate for the load table), and
  of this package only other model modules: never ``fcos.engine`` or ``fcos.data``.
* ``fcos.data`` (dataset tools) may use the model part's utilities, never ``fcos.engine``.
* Nothing in ``fcos`` imports an application (train_net.py, demo/, tools/, dataset/*.py, bench/).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fcos"

MODEL_THIRD_PARTY = {"torch", "torchvision", "detectron2", "fvcore", "iopath", "numpy", "tabulate"}
APPLICATIONS = {
    "train_net",
    "demo",
    "predictor",
    "tools",
    "export",
    "export_postprocess",
    "convert",
    "dataset",
    "bench",
    "tests",
    "training",
}


def imported_modules(path: Path, package: str = "") -> Set[str]:
    """Absolute dotted names of everything ``path`` imports (relative imports resolved against
    ``package``, by default the one ``path`` is in)."""
    package = package or ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            # `from fcos import engine` imports the subpackage fcos.engine.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _violations(
    files: List[Path], allowed_top: Set[str], forbidden_prefixes: List[str], package: str = ""
) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for path in files:
        bad = []
        for name in sorted(imported_modules(path, package)):
            top = name.split(".")[0]
            if top == "fcos":
                if any(name == p or name.startswith(p + ".") for p in forbidden_prefixes):
                    bad.append(name)
            elif top in APPLICATIONS or (
                top not in allowed_top and top not in sys.stdlib_module_names
            ):
                bad.append(name)
        if bad:
            found[path.name] = bad
    return found


def test_imported_modules_resolves_relative_and_from_imports() -> None:
    probe = PACKAGE / "engine" / "trainer.py"
    names = imported_modules(probe)
    assert "fcos.engine.config" in names  # `from .config import OPTIMIZERS`
    assert "fcos.FCOSCheckpointer" in names  # `from fcos import FCOSCheckpointer, ...`


def test_model_part_imports_only_the_model_stack() -> None:
    model_files = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in model_files} >= {
        "meta_arch.py",
        "head.py",
        "checkpoint.py",
        "config.py",
    }
    allowed = MODEL_THIRD_PARTY
    assert _violations(model_files, allowed, ["fcos.engine", "fcos.data"]) == {}


def test_data_tools_do_not_import_the_engine() -> None:
    files = sorted((PACKAGE / "data").glob("*.py"))
    allowed = MODEL_THIRD_PARTY | {"PIL", "tqdm", "pycocotools"}
    assert _violations(files, allowed, ["fcos.engine"]) == {}


def test_engine_imports_no_application() -> None:
    files = sorted((PACKAGE / "engine").glob("*.py"))
    # yaml (detectron2's config format, an fvcore dependency): config errors name a key's YAML file.
    allowed = MODEL_THIRD_PARTY | {
        "PIL",
        "tqdm",
        "pycocotools",
        "matplotlib",
        "faster_coco_eval",
        "yaml",
    }
    assert _violations(files, allowed, []) == {}


@pytest.mark.parametrize(
    "line, bad",
    [
        ("from fcos.engine.config import SetupError", "fcos.engine.config"),
        ("from .data import shapes", "fcos.data"),
        ("import train_net", "train_net"),
        ("from PIL import Image", "PIL"),
    ],
)
def test_the_rule_catches_a_violation(tmp_path: Path, line: str, bad: str) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(f"import os\nimport torch\n{line}\n", encoding="utf-8")
    found = _violations([probe], MODEL_THIRD_PARTY, ["fcos.engine", "fcos.data"], package="fcos")
    assert [name for name in found["probe.py"] if name.startswith(bad)], found
