"""The double-click scripts run the commands the CLIs accept.

Each .bat/.sh is read, its variables and its python command line are extracted, and the command is run
as written (from a scratch folder that mirrors the repository, with a fake COCO tree as the datasets
root and tiny model weights where the pretrained file goes) plus a few overrides that shrink the model
and the schedule. A script whose command drifts from the CLI fails here; the Windows and Linux twins
must hold the same command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from inference_helpers import REPO_ROOT, VAL_IMAGE_SIZE, random_fcos, save_weights

from fcos.data import shapes
from fcos.engine.defaults import load_config

BAT_VARIABLES = ("ANACONDA_ROOT", "ENV_NAME", "DATASETS_ROOT")
SH_VARIABLES = ("PYTHON", "DATASETS_ROOT")
# The seed's R-50 config shrunk to an R-18 with a small head and 128-px images.
TINY_MODEL_OPTS = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.FPN.OUT_CHANNELS",
    "64",
    "MODEL.FCOS.NUM_CONVS",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    "160",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "160",
    "MODEL.DEVICE",
    "cpu",
]
TINY_TRAIN_OPTS = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.0001",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "0",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
    "DATALOADER.NUM_WORKERS",
    "0",
]
PRETRAINED = "pretrained_weights/FCOS_imprv_R_50_FPN_1x.pth"


def read_script(path: Path) -> Tuple[Dict[str, str], List[str]]:
    """(variables set at the top, the python command's arguments after the interpreter, unexpanded)."""
    text = path.read_text(encoding="ascii")
    lines = text.splitlines()
    if path.suffix == ".bat":
        variables = dict(re.findall(r'^set "(\w+)=([^"]*)"$', text, flags=re.MULTILINE))
        continuation, start = "^", re.compile(r"^python\s")
    else:
        variables = dict(re.findall(r"^(\w+)=\$\{\w+:-(.*)\}$", text, flags=re.MULTILINE))
        continuation, start = "\\", re.compile(r'^"\$PYTHON"\s')
    first = next(i for i, line in enumerate(lines) if start.match(line))
    command = ""
    for line in lines[first:]:
        command += line.rstrip()
        if not command.endswith(continuation):
            break
        command = command[:-1] + " "
    return variables, shlex.split(command)[1:]


def expand(args: List[str], values: Dict[str, str]) -> List[str]:
    """Substitute %VAR% (cmd) and $VAR / ${VAR} (bash)."""

    def one(arg: str) -> str:
        for name, value in values.items():
            arg = (
                arg.replace(f"%{name}%", value)
                .replace(f"${{{name}}}", value)
                .replace(f"${name}", value)
            )
        return arg

    return [one(a) for a in args]


def test_bat_files_are_crlf_with_the_user_variables_at_the_top():
    for name in ("train_fcos.bat", "demo_inference_fcos.bat"):
        data = (REPO_ROOT / name).read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n") > 10, f"{name} must use CRLF line endings"
        variables, _ = read_script(REPO_ROOT / name)
        assert tuple(variables)[:3] == BAT_VARIABLES
        lines = data.decode("ascii").splitlines()
        first_command = next(
            line for line in lines if line and not line.startswith(("@echo", "rem", "set "))
        )
        assert (
            first_command == 'cd /d "%~dp0"'
        ), f"{name}: only comments and the variables come before the commands"
        assert 'call "%ANACONDA_ROOT%\\Scripts\\activate.bat" "%ENV_NAME%"' in lines
    assert "*.bat text eol=crlf" in (REPO_ROOT / ".gitattributes").read_text().splitlines()


@pytest.mark.parametrize("stem", ["train_fcos", "demo_inference_fcos"])
def test_windows_and_linux_twins_run_the_same_command(stem):
    bat_vars, bat_args = read_script(REPO_ROOT / f"{stem}.bat")
    sh_vars, sh_args = read_script(REPO_ROOT / f"{stem}.sh")
    assert tuple(sh_vars) == SH_VARIABLES
    values = {"DATASETS_ROOT": "/data"}
    assert expand(bat_args, values) == expand(sh_args, values)
    assert os.access(REPO_ROOT / f"{stem}.sh", os.X_OK)


def _fake_coco(root: Path, shapes_root: Path) -> Path:
    """DATASETS_ROOT/coco with COCO's 80 categories and generated shapes images named like COCO's."""
    paths = shapes.ensure_shapes_dataset(
        shapes_root, num_train=4, num_val=2, image_size=VAL_IMAGE_SIZE
    )
    coco_categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    for split in shapes.SPLITS:
        data = json.loads(paths[f"{split}_json"].read_text())
        (root / "coco" / f"{split}2017").mkdir(parents=True)
        for image in data["images"]:
            new_name = f"{image['id'] + 100:012d}.jpg"
            shutil.copy(
                paths[f"{split}_images"] / image["file_name"],
                root / "coco" / f"{split}2017" / new_name,
            )
            image["file_name"] = new_name
        data["categories"] = (
            coco_categories  # shapes ids 1-4 become person, bicycle, car, motorcycle
        )
        (root / "coco" / "annotations").mkdir(exist_ok=True)
        (root / "coco" / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Tuple[Path, Path]:
    """A scratch folder mirroring the repository (so outputs land there) plus a fake datasets root."""
    work = tmp_path_factory.mktemp("scripts")
    for name in ("configs", "demo", "fcos", "dataset", "tools", "train_net.py"):
        (work / name).symlink_to(REPO_ROOT / name)
    datasets = _fake_coco(work / "datasets", work / "shapes")
    cfg = load_config(str(REPO_ROOT / "configs" / "fcos_R_50_FPN.yaml"), TINY_MODEL_OPTS)
    save_weights(random_fcos(cfg), work / PRETRAINED)
    return work, datasets


def _run(work: Path, args: List[str], **env: str) -> subprocess.CompletedProcess:
    """``python args`` from ``work``, as the script would run it (its interpreter is this one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )


def test_demo_script_command_runs(workspace):
    work, datasets = workspace
    _, args = read_script(REPO_ROOT / "demo_inference_fcos.bat")
    assert args[0] == "demo/demo.py" and args[-2:] == ["MODEL.WEIGHTS", PRETRAINED]
    result = _run(work, expand(args, {"DATASETS_ROOT": str(datasets)}) + TINY_MODEL_OPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = sorted(p.name for p in (work / "output" / "demo").iterdir())
    assert drawn == sorted(p.name for p in (datasets / "coco" / "val2017").glob("000000000*.jpg"))
    assert len(drawn) == 2


def test_train_script_command_runs(workspace):
    """Fine-tunes from the (tiny) pretrained file for 2 iterations, evaluates on the fake COCO val."""
    work, datasets = workspace
    _, args = read_script(REPO_ROOT / "train_fcos.bat")
    assert args == [
        "train_net.py",
        "--config-file",
        "configs/fcos_R_50_FPN.yaml",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.BASE_LR",
        "0.00125",
    ]
    args = expand(args, {"DATASETS_ROOT": str(datasets)}) + TINY_MODEL_OPTS + TINY_TRAIN_OPTS
    result = _run(work, args, DETECTRON2_DATASETS=str(datasets))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "output" / "fcos_R_50_FPN" / "model_final.pth").is_file()
