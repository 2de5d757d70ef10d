"""Bad input and divergence end every command line with one line naming the culprit, the right exit
status (2 bad input, 1 divergence), no traceback (unless FCOS_DEBUG=1) and no partial output file.

Degenerate training boxes are in test_check.py / test_train_setup.py; voc2coco's and the checker's
own bad input in test_voc2coco.py / test_check.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from convert import main as convert_main
from detectron2.modeling import build_model
from export import main as export_main
from inference_helpers import (
    SHAPES_CONFIG,
    TINY_OPTS,
    random_fcos,
    save_weights,
    shapes_val,
    tiny_cfg,
)
from train_helpers import REPO, TRAIN_NET, run_train_net, shapes_run

import train_net
from fcos.checkpoint import FCOSCheckpointer, ResumeError
from fcos.engine.cli import DEBUG_ENV
from fcos.engine.config import SetupError, get_fcos_cfg, merge_config
from fcos.engine.launch import launch
from fcos.errors import NonFiniteLossError
from fcos.losses import check_finite_predictions, fcos_losses
from fcos.safe_pickle import CorruptCheckpointError

_spec = importlib.util.spec_from_file_location("fcos_demo_bad_input", REPO / "demo" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
sys.modules["fcos_demo_bad_input"] = demo
_spec.loader.exec_module(demo)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """train_net.cli() in this process adds a root log handler on pytest's captured stderr."""
    before = list(logging.getLogger().handlers)
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)


def _one_error_line(stderr: str, prog: str, subprocess_run: bool = False) -> str:
    """The message of the single ``prog: error:`` line of ``stderr``.

    A subprocess's stderr must hold no traceback. In this process an escaped exception would fail
    the test by itself, and stderr can hold "Logging error" tracebacks of log handlers that earlier
    tests left on their (closed) captured streams, so it is not searched.
    """
    if subprocess_run:
        assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0][len(f"{prog}: error: ") :]


# --- config files and keys ------------------------------------------------------------------------


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text("MODEL:\n  FCOS:\n    NUM_CONV: 2\n")
    (tmp_path / "child.yaml").write_text('_BASE_: "base.yaml"\nMODEL:\n  FCOS:\n    NUM_CLASSES: 3')
    (tmp_path / "type.yaml").write_text("MODEL:\n  FCOS:\n    NUM_CONVS: abc\n")
    (tmp_path / "renamed.yaml").write_text("MODEL:\n  FCOS:\n    ALLOW_UNSAFE_PICKLE: True\n")
    (tmp_path / "broken.yaml").write_text("MODEL:\n  FCOS: [\n")
    (tmp_path / "list.yaml").write_text("- MODEL\n")
    (tmp_path / "lost_base.yaml").write_text('_BASE_: "gone.yaml"\n')
    return tmp_path


@pytest.mark.parametrize(
    "config, opts, expected",
    [
        ("absent.yaml", [], "--config-file: {d}/absent.yaml does not exist"),
        (
            str(SHAPES_CONFIG),
            ["MODEL.FCOS.NUM_CONV", "3"],
            "command-line override: MODEL.FCOS.NUM_CONV is not a config key; "
            "did you mean MODEL.FCOS.NUM_CONVS?",
        ),
        (
            "child.yaml",
            [],
            "{d}/base.yaml (in the _BASE_ chain of {d}/child.yaml): MODEL.FCOS.NUM_CONV "
            "is not a config key; did you mean MODEL.FCOS.NUM_CONVS?",
        ),
        (
            str(SHAPES_CONFIG),
            ["MODEL.FCOS.SCORE_THRESH", "0.1"],
            "command-line override: MODEL.FCOS.SCORE_THRESH is not a config key; did you mean "
            "MODEL.FCOS.SCORE_THRESH_TEST?",
        ),
        (
            "type.yaml",
            [],
            "{d}/type.yaml: MODEL.FCOS.NUM_CONVS must be of type int "
            "(the value it replaces is 4), got 'abc' of type str",
        ),
        (
            str(SHAPES_CONFIG),
            ["SOLVER.MAX_ITER", "many"],
            "command-line override: SOLVER.MAX_ITER must be of type int (the value it replaces is 500), "
            "got 'many' of type str",
        ),
        (
            "renamed.yaml",
            [],
            "{d}/renamed.yaml: MODEL.FCOS.ALLOW_UNSAFE_PICKLE was renamed to "
            "CHECKPOINT.ALLOW_UNSAFE_PICKLE (a checkpoint-loading policy, not a model "
            "parameter); use CHECKPOINT.ALLOW_UNSAFE_PICKLE",
        ),
        (
            "broken.yaml",
            [],
            "{d}/broken.yaml: not valid YAML: expected the node content, but found "
            "'<stream end>' at line 3, column 1",
        ),
        (
            "list.yaml",
            [],
            "{d}/list.yaml: expected a mapping of config keys (KEY: value), got list",
        ),
        ("lost_base.yaml", [], "_BASE_ of {d}/lost_base.yaml: {d}/gone.yaml does not exist"),
        (
            str(SHAPES_CONFIG),
            ["MODEL.FCOS.NUM_CONVS"],
            "command-line overrides need KEY VALUE pairs, got an odd number of items: "
            "['MODEL.FCOS.NUM_CONVS']",
        ),
    ],
)
def test_config_errors_name_file_and_key(
    configs: Path, config: str, opts: List[str], expected: str
) -> None:
    with pytest.raises(SetupError) as err:
        merge_config(get_fcos_cfg(), str(configs / config), opts)
    assert str(err.value) == expected.format(d=configs)


def test_train_net_config_typo_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_train_net(
        ["--config-file", str(SHAPES_CONFIG), "MODEL.FCOS.NUM_CONV", "3", "OUTPUT_DIR", str(out)]
    )
    assert result.returncode == 2
    message = _one_error_line(result.stderr, "train_net.py", subprocess_run=True)
    assert "MODEL.FCOS.NUM_CONV is not a config key; did you mean MODEL.FCOS.NUM_CONVS?" in message
    assert not out.exists()


def test_debug_variable_shows_the_traceback(
    tmp_path: Path, capsys, monkeypatch, root_logging
) -> None:
    argv = ["--config-file", str(tmp_path / "absent.yaml")]
    assert train_net.cli(argv) == 2
    assert capsys.readouterr().err.startswith("train_net.py: error: --config-file")
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].endswith("absent.yaml does not exist")


# --- corrupt checkpoints --------------------------------------------------------------------------


def _corrupt_files(directory: Path, good: Path) -> List[Path]:
    """A truncated zip checkpoint, an empty file, a text file and a truncated .pkl."""
    directory.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    files = {
        "truncated.pth": data[: len(data) // 2],
        "empty.pth": b"",
        "notes.pth": b"hello, not weights\n",
        "truncated.pkl": b"\x80\x02}q\x00(X\x07\x00\x00\x00conv1_wq",
    }
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return [directory / name for name in files]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_weights(random_fcos(tiny_cfg()), tmp_path_factory.mktemp("weights") / "model.pth")


def test_corrupt_checkpoint_names_the_file(tmp_path: Path, weights: Path) -> None:
    model = build_model(tiny_cfg())
    for path in _corrupt_files(tmp_path, weights):
        with pytest.raises(CorruptCheckpointError) as err:
            FCOSCheckpointer(model).load(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}: not a complete checkpoint file (")
        assert "\n" not in message
        assert "truncated" in message
    empty = r"empty\.pth: not a complete checkpoint file \(the file is empty\)"
    with pytest.raises(CorruptCheckpointError, match=empty):
        FCOSCheckpointer(model).load(str(tmp_path / "empty.pth"))


def test_train_net_eval_with_truncated_weights_is_exit_2(
    tmp_path: Path, weights: Path, capsys, root_logging
) -> None:
    truncated = _corrupt_files(tmp_path / "bad", weights)[0]
    code = train_net.cli(
        shapes_run(
            tmp_path,
            tmp_path / "out",
            "MODEL.WEIGHTS",
            str(truncated),
            "MODEL.DEVICE",
            "cpu",
            "DATASETS.TEST",
            "()",
            flags=["--eval-only"],
        )
    )
    assert code == 2
    message = _one_error_line(capsys.readouterr().err, "train_net.py")
    expected = f"{truncated}: not a complete checkpoint file (RuntimeError: PytorchStreamReader"
    assert message.startswith(expected)


def test_resume_from_a_corrupt_last_checkpoint_names_both_files(tmp_path: Path) -> None:
    model = build_model(tiny_cfg())
    checkpointer = FCOSCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009")
    checkpointer.save("model_0000019")
    newest = tmp_path / "model_0000019.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(ResumeError) as err:
        FCOSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    message = str(err.value)
    assert message.startswith(f"--resume: {newest}: not a complete checkpoint file")
    assert f"{tmp_path / 'last_checkpoint'} names it" in message
    assert "the newest other one is model_0000009.pth" in message
    (tmp_path / "last_checkpoint").write_text("model_0000029.pth")
    with pytest.raises(ResumeError, match=r"names .*model_0000029\.pth, which does not exist"):
        FCOSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


def test_convert_and_export_refuse_corrupt_weights_without_output(
    tmp_path: Path, weights: Path, capsys
) -> None:
    truncated = _corrupt_files(tmp_path / "bad", weights)[0]
    out = tmp_path / "out"
    assert convert_main([str(truncated), str(out / "converted.pth")]) == 2
    message = _one_error_line(capsys.readouterr().err, "tools/convert.py")
    assert message.startswith(f"{truncated}: not a complete")
    assert (
        export_main(
            [
                "--config-file",
                str(SHAPES_CONFIG),
                "--format",
                "torchscript",
                "--output",
                str(out / "m.ts"),
                "--opts",
                *TINY_OPTS,
                "MODEL.WEIGHTS",
                str(truncated),
            ]
        )
        == 2
    )
    message = _one_error_line(capsys.readouterr().err, "tools/export.py")
    assert message.startswith(f"{truncated}: not a complete")
    assert not out.exists()


# --- the demo: same classes of input --------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing config", "key typo", "corrupt weights", "no ann_file"])
def test_demo_bad_input_is_one_line_exit_2(
    tmp_path: Path, weights: Path, capsys, case: str
) -> None:
    images, _ = shapes_val(tmp_path / "shapes", num_val=1)
    config, opts, extra = str(SHAPES_CONFIG), [*TINY_OPTS, "MODEL.WEIGHTS", str(weights)], []
    if case == "missing config":
        config = str(tmp_path / "absent.yaml")
        culprit = f"--config-file: {config} does not exist"
    elif case == "key typo":
        opts = opts + ["MODEL.FCOS.SCORE_THRESH", "0.1"]
        culprit = "did you mean MODEL.FCOS.SCORE_THRESH_TEST"
    elif case == "corrupt weights":
        truncated = _corrupt_files(tmp_path / "bad", weights)[0]
        opts = opts + ["MODEL.WEIGHTS", str(truncated)]
        culprit = f"{truncated}: not a complete checkpoint"
    else:
        extra = ["--ann_file", str(tmp_path / "absent.json")]
        culprit = f"{tmp_path / 'absent.json'}: cannot read"
    out = tmp_path / "drawn"
    code = demo.main(
        [
            "--config-file",
            config,
            "--input",
            str(images[0]),
            "--output",
            str(out),
            "--json",
            str(tmp_path / "d.json"),
            *extra,
            "--opts",
            *opts,
        ]
    )
    assert code == 2
    assert culprit in _one_error_line(capsys.readouterr().err, "demo.py")
    assert not out.exists() and not (tmp_path / "d.json").exists()


# --- divergence -----------------------------------------------------------------------------------


def test_nan_box_predictions_stop_before_the_giou_assertion() -> None:
    # fvcore's giou_loss asserts x1 <= x2 on the predicted boxes, which a NaN fails: check first.
    deltas = torch.ones(3, 4)
    deltas[1, 2] = float("nan")
    args = dict(
        pred_logits=torch.zeros(3, 2),
        pred_centerness=torch.zeros(3),
        gt_classes=torch.tensor([0, 1, 2]),
        gt_deltas=torch.ones(3, 4),
        gt_centerness=torch.ones(3),
        num_classes=2,
        focal_alpha=0.25,
        focal_gamma=2.0,
        iou_loss_type="giou",
        norm_sync=False,
    )
    expected = r"^the head's box regression \(bbox_pred\) output became NaN or Inf$"
    with pytest.raises(NonFiniteLossError, match=expected):
        fcos_losses(pred_deltas=deltas, **args)
    assert torch.isfinite(fcos_losses(pred_deltas=torch.ones(3, 4), **args)["loss_box_reg"])


def _nan_on_rank_1(marker_dir: str) -> None:
    """Worker: rank 1 has an Inf logit; every rank must raise (and say so in a marker file)."""
    rank = torch.distributed.get_rank()
    logits = torch.zeros(2, 3)
    if rank == 1:
        logits[0, 0] = float("inf")
    try:
        check_finite_predictions({"class logits (cls_score)": logits, "centerness": torch.zeros(2)})
    except NonFiniteLossError as err:
        Path(marker_dir, f"rank{rank}.txt").write_text(str(err))
        raise


@pytest.mark.slow
def test_every_process_stops_and_the_launcher_reports_the_error(tmp_path: Path) -> None:
    expected = r"class logits \(cls_score\) \(in 1 of 2 processes\)"
    with pytest.raises(NonFiniteLossError, match=expected):
        launch(_nan_on_rank_1, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    expected = "the head's class logits (cls_score) (in 1 of 2 processes) output became NaN or Inf"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [expected, expected]


def test_nan_weights_are_never_saved(tmp_path: Path) -> None:
    model = build_model(tiny_cfg())
    checkpointer = FCOSCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009")
    with torch.no_grad():
        model.head.bbox_pred.weight[0, 0, 0, 0] = float("nan")
    expected = r"head\.bbox_pred\.weight.*model_0000019\.pth was not written"
    with pytest.raises(NonFiniteLossError, match=expected):
        checkpointer.save("model_0000019")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"


@pytest.mark.slow
def test_diverging_training_exits_1_with_one_line_and_intact_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_train_net(
        shapes_run(
            tmp_path,
            out,
            "SOLVER.OPTIMIZER",
            "SGD",
            "SOLVER.BASE_LR",
            "1e9",
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            "False",
            "SOLVER.MAX_ITER",
            "20",
            "SOLVER.CHECKPOINT_PERIOD",
            "1",
            "DATASETS.TEST",
            "()",
        )
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout
    message = _one_error_line(result.stderr, "train_net.py", subprocess_run=True)
    # Caught on the head outputs (before any loss is computed), not only on the NaN loss afterwards.
    assert message.startswith("training diverged at iteration ") and "the head's" in message
    assert "SOLVER.BASE_LR" in message and "SOLVER.CLIP_GRADIENTS" in message
    last = out / (out / "last_checkpoint").read_text()
    state = torch.load(last, map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --- permissions of what train_net writes ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_every_output_file_has_umask_permissions(tmp_path: Path) -> None:
    umask = 0o027
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN_NET),
            *shapes_run(tmp_path, out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = {
        p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")
    }
    assert {
        "config.yaml",
        "config_my.yaml",
        "training_curves.png",
        "model_0000000.pth",
        "model_final.pth",
        "last_checkpoint",
        "metrics.json",
        "log.txt",
        "inference/coco_instances_results.json",
    } <= set(written)
    expected = {name: (0o777 if (out / name).is_dir() else 0o666) & ~umask for name in written}
    assert written == expected
