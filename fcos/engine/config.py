"""Training-side config keys that detectron2 0.6 lacks, and the project's full config schema.

``SOLVER.OPTIMIZER`` exists because detectron2 0.6 only builds SGD, and from-scratch training of the
embedded config in a CPU budget needs AdamW (measured: AdamW lr 1e-3 far ahead of SGD 0.01 in minutes).
``DATASETS.SHAPES`` describes the embedded synthetic dataset, so one config file fully defines the
README's first command, data included.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from fcos.config import add_fcos_config
from fcos.data import shapes

OPTIMIZERS = ("SGD", "ADAMW")


class SetupError(ValueError):
    """A problem with the run's config, data or weights found before training; the message says what to fix."""


def add_training_config(cfg: CN) -> None:
    """Add ``SOLVER.OPTIMIZER``/``BETAS``/``AMP.PRECISION`` and ``DATASETS.SHAPES.*`` to ``cfg``."""
    cfg.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2); SGD uses SOLVER.MOMENTUM instead.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Training autocast dtype with detectron2's SOLVER.AMP.ENABLED: "auto" (float16 + GradScaler
    # on CUDA, bfloat16 on a CPU with native bf16, else fp32) | "float16" | "bfloat16"
    # (fcos.precision).
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.DATASETS.SHAPES = CN()
    # Where the embedded dataset is generated; "" = fcos.data.shapes' default (datasets/generated/shapes in the repository).
    cfg.DATASETS.SHAPES.ROOT = ""
    cfg.DATASETS.SHAPES.NUM_TRAIN = shapes.DEFAULT_NUM_TRAIN
    cfg.DATASETS.SHAPES.NUM_VAL = shapes.DEFAULT_NUM_VAL
    # (height, width) of every generated image.
    cfg.DATASETS.SHAPES.IMAGE_SIZE = tuple(shapes.DEFAULT_IMAGE_SIZE)
    cfg.DATASETS.SHAPES.SEED = 0


def get_fcos_cfg() -> CN:
    """detectron2's defaults plus the FCOS library's keys (``add_fcos_config``) and the training keys above."""
    cfg = get_cfg()
    add_fcos_config(cfg)
    add_training_config(cfg)
    return cfg
