"""``SOLVER.EPOCHS``: a training schedule that follows the size of the user's training set.

A from-scratch recipe over-fits a small dataset or under-trains a large one when its length is a
fixed number of iterations; what was measured to generalise (README, "Train on your own data from
scratch") is a number of passes over the data. With ``SOLVER.EPOCHS > 0`` the config's schedule is
read as a shape and a minimum: ``SOLVER.MAX_ITER`` becomes
``max(MAX_ITER, ceil(EPOCHS * images / IMS_PER_BATCH))`` and the iteration counts that belong to it
(``STEPS``, ``WARMUP_ITERS``, ``TEST.EVAL_PERIOD``, ``SOLVER.CHECKPOINT_PERIOD``) are scaled by the
same factor. The minimum is there because a randomly initialised detector needs a number of
updates to learn at all, however few the images (measured: ~500 before the val AP levelled off). Keys given on the command line win;
a ``SOLVER.MAX_ITER`` given there turns the conversion off. The key is then cleared, so the run's
config.yaml (and ``--resume`` from it) keeps the iteration counts that were used.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog

from .config import SetupError

logger = logging.getLogger(__name__)

SCALED_KEYS = (
    "SOLVER.STEPS",
    "SOLVER.WARMUP_ITERS",
    "TEST.EVAL_PERIOD",
    "SOLVER.CHECKPOINT_PERIOD",
)


def count_training_images(cfg: CfgNode, names: Sequence[str]) -> int:
    """Images the train loader will use: all of them, or those with a box when
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` makes detectron2 drop the others."""
    total = 0
    for name in names:
        records = DatasetCatalog.get(name)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            records = [
                r
                for r in records
                if any(a.get("iscrowd", 0) == 0 for a in r.get("annotations", []))
            ]
        total += len(records)
    return total


def epoch_schedule(
    cfg: CfgNode, epochs: float, num_images: int, given: Sequence[str]
) -> Dict[str, object]:
    """The ``KEY: value`` changes that turn ``epochs`` into iterations for ``num_images``."""
    batch = cfg.SOLVER.IMS_PER_BATCH
    max_iter = max(cfg.SOLVER.MAX_ITER, math.ceil(epochs * num_images / batch))
    factor = max_iter / cfg.SOLVER.MAX_ITER
    values: Dict[str, object] = {"SOLVER.MAX_ITER": max_iter}
    if "SOLVER.STEPS" not in given:
        values["SOLVER.STEPS"] = tuple(
            min(max_iter - 1, max(1, round(s * factor))) for s in cfg.SOLVER.STEPS
        )
    if "SOLVER.WARMUP_ITERS" not in given:
        values["SOLVER.WARMUP_ITERS"] = round(cfg.SOLVER.WARMUP_ITERS * factor)
    for key, period in (
        ("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD),
        ("SOLVER.CHECKPOINT_PERIOD", cfg.SOLVER.CHECKPOINT_PERIOD),
    ):
        if key not in given and period > 0:
            values[key] = max(1, round(period * factor))
    return values


def apply_epochs(cfg: CfgNode, names: Sequence[str], opts: Sequence[str]) -> None:
    """With ``SOLVER.EPOCHS > 0``, set the schedule from the size of the training sets ``names``.

    ``cfg`` must be unfrozen. Raises SetupError when the training sets hold no image to count.
    """
    epochs = cfg.SOLVER.EPOCHS
    if epochs <= 0:
        return
    given = list(opts)[::2]
    cfg.SOLVER.EPOCHS = 0
    if "SOLVER.MAX_ITER" in given:
        logger.info(f"SOLVER.EPOCHS {epochs} not used: SOLVER.MAX_ITER was given")
        return
    num_images = count_training_images(cfg, names)
    if num_images == 0:
        raise SetupError(
            f"SOLVER.EPOCHS: the training sets {list(names)} have no image to train on; "
            "check DATASETS.TRAIN, or give SOLVER.MAX_ITER"
        )
    values = epoch_schedule(cfg, epochs, num_images, given)
    for key, value in values.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    logger.info(
        f"SOLVER.EPOCHS {epochs} over {num_images} training images at "
        f"{cfg.SOLVER.IMS_PER_BATCH} per iteration: "
        + ", ".join(f"{k} {v}" for k, v in values.items())
    )
