"""SOLVER.EPOCHS: the schedule follows the number of training images (fcos.engine.schedule)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import pytest
import yaml
from train_helpers import REPO, simple_categories, write_coco

import train_net
from fcos.engine.config import SetupError

SHAPE = """_BASE_: "{base}"
SOLVER:
  EPOCHS: 10
  IMS_PER_BATCH: 4
  MAX_ITER: 10
  STEPS: (8, 9)
  WARMUP_ITERS: 1
  CHECKPOINT_PERIOD: 4
TEST:
  EVAL_PERIOD: 3
"""


def _setup(tmp_path: Path, catalog: List[str], num_boxed: int, num_empty: int, opts: Sequence[str]):
    tmp_path.mkdir(exist_ok=True)
    boxes = [[(1, [10.0, 10.0, 30.0, 40.0])]] * num_boxed + [[]] * num_empty
    train, train_dir = write_coco(tmp_path, "train", simple_categories(1), boxes, size=64)
    config = tmp_path / "shape.yaml"
    config.write_text(SHAPE.format(base=REPO / "configs" / "fcos_custom_scratch.yaml"))
    catalog += [f"t_{tmp_path.name}", f"v_{tmp_path.name}"]
    argv = [
        "--config-file",
        str(config),
        "--ann_file_train",
        str(train),
        "--image_dir_train",
        str(train_dir),
        "--name_train",
        catalog[-2],
        "--ann_file_val",
        str(train),
        "--image_dir_val",
        str(train_dir),
        "--name_val",
        catalog[-1],
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        *opts,
    ]
    return train_net.setup_config(train_net.build_parser().parse_args(argv), 1)


def test_epochs_set_max_iter_and_scale_the_schedule(tmp_path: Path, catalog: List[str]) -> None:
    cfg = _setup(tmp_path, catalog, num_boxed=3, num_empty=2, opts=[])
    # 5 images (empty ones train as background) x 10 epochs / 4 per iteration = 12.5 -> 13;
    # factor 13 / 10: steps 10.4 -> 10, 11.7 -> 12; warmup 1.3 -> 1; periods 3.9 -> 4, 5.2 -> 5.
    assert cfg.SOLVER.MAX_ITER == 13
    assert tuple(cfg.SOLVER.STEPS) == (10, 12)
    assert cfg.SOLVER.WARMUP_ITERS == 1
    assert cfg.TEST.EVAL_PERIOD == 4 and cfg.SOLVER.CHECKPOINT_PERIOD == 5
    dumped = yaml.safe_load(cfg.dump())
    assert dumped["SOLVER"]["EPOCHS"] == 0 and dumped["SOLVER"]["MAX_ITER"] == 13


def test_filtered_empty_images_are_not_counted(tmp_path: Path, catalog: List[str]) -> None:
    cfg = _setup(
        tmp_path,
        catalog,
        num_boxed=3,
        num_empty=2,
        opts=["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True", "SOLVER.EPOCHS", "20"],
    )
    assert cfg.SOLVER.MAX_ITER == 15  # 3 x 20 / 4 (all 5 images: 25)


def test_the_config_max_iter_is_the_minimum(tmp_path: Path, catalog: List[str]) -> None:
    cfg = _setup(tmp_path, catalog, 3, 2, ["SOLVER.EPOCHS", "2"])
    assert cfg.SOLVER.MAX_ITER == 10 and tuple(cfg.SOLVER.STEPS) == (8, 9)  # 5 x 2 / 4 -> 3 < 10


def test_command_line_keys_win(tmp_path: Path, catalog: List[str]) -> None:
    cfg = _setup(tmp_path, catalog, 3, 2, ["TEST.EVAL_PERIOD", "7", "SOLVER.STEPS", "(11,)"])
    assert (
        cfg.SOLVER.MAX_ITER == 13 and cfg.TEST.EVAL_PERIOD == 7 and tuple(cfg.SOLVER.STEPS) == (11,)
    )
    cfg = _setup(tmp_path / "b", catalog, 3, 2, ["SOLVER.MAX_ITER", "40"])
    assert cfg.SOLVER.MAX_ITER == 40 and tuple(cfg.SOLVER.STEPS) == (8, 9)


def test_no_training_image_is_one_error(tmp_path: Path, catalog: List[str]) -> None:
    with pytest.raises(SetupError, match="SOLVER.EPOCHS: the training sets .* have no image"):
        _setup(
            tmp_path,
            catalog,
            0,
            2,
            ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True", "INPUT.SIZES_FROM_DATA", "False"],
        )
