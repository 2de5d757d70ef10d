#!/usr/bin/env python
"""Train and evaluate FCOS with detectron2: COCO, custom COCO-format data, or the embedded shapes dataset.

    python train_net.py --config-file configs/fcos_shapes.yaml                  # embedded data, CPU ok
    python train_net.py --config-file configs/fcos_R_50_FPN.yaml --num-gpus 8   # COCO ($DETECTRON2_DATASETS)
    python train_net.py --config-file CFG --ann_file_train a.json --image_dir_train imgs/ \\
        --ann_file_val b.json --image_dir_val imgs/                              # your data
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth

Config and data problems (a missing or mistyped config key, a missing COCO folder, bad annotation
files, NUM_CLASSES that disagrees with the data) are found here, in the launching process, before
any worker starts or any iteration runs. Every bad input ends the run with one line and exit status
2, a diverging run with exit status 1 (``fcos.engine.cli``; ``FCOS_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

# fvcore's focal loss is a torch.jit.script function: torch 2.x warns at import, in every process.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)

from detectron2.config import CfgNode  # noqa: E402
from detectron2.engine import (  # noqa: E402
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    hooks,
)
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from fcos import FCOSCheckpointer  # noqa: E402
from fcos.checkpoint import check_weights_file, scratch_advice  # noqa: E402
from fcos.engine.cli import quiet_expected_errors, run  # noqa: E402
from fcos.engine.config import SetupError, get_fcos_cfg, merge_config  # noqa: E402
from fcos.engine.curves import archive_previous_metrics  # noqa: E402
from fcos.engine.datasets import (  # noqa: E402
    apply_sizes_from_data,
    check_datasets_exist,
    custom_datasets_from_args,
    num_classes_set_explicitly,
    prepare_shapes,
    resolve_num_classes,
    use_custom_datasets,
    uses_shapes,
)
from fcos.engine.defaults import check_precision_config, resolve_device  # noqa: E402
from fcos.engine.evaluation import format_ap_table  # noqa: E402
from fcos.engine.launch import launch  # noqa: E402
from fcos.engine.schedule import apply_epochs  # noqa: E402
from fcos.engine.trainer import FCOSTrainer  # noqa: E402
from fcos.file_io import copy_file_atomic  # noqa: E402

logger = logging.getLogger("fcos.train_net")

# detectron2's default_setup only configures the "detectron2" and "fvcore" loggers.
PROJECT_LOGGER = "fcos"


def build_parser() -> argparse.ArgumentParser:
    """detectron2's usual flags plus the seed's custom-data flags (which take effect only when given)."""
    parser = default_argument_parser()
    group = parser.add_argument_group(
        "custom COCO-format data (replaces DATASETS.TRAIN/TEST only when given)"
    )
    group.add_argument("--ann_file_train", help="COCO JSON of the training set")
    group.add_argument("--image_dir_train", help="folder with the training images")
    group.add_argument(
        "--name_train",
        default="dataset_train",
        help="dataset name to register (default: %(default)s, as in the seed)",
    )
    group.add_argument("--ann_file_val", help="COCO JSON of the validation set")
    group.add_argument("--image_dir_val", help="folder with the validation images")
    group.add_argument(
        "--name_val",
        default="dataset_val",
        help="dataset name to register (default: %(default)s, as in the seed)",
    )
    return parser


def _register_datasets(cfg: CfgNode, args: argparse.Namespace, check: bool) -> None:
    """Register custom and embedded datasets named by ``args``/``cfg`` (cfg unfrozen when custom data is given)."""
    train, val = custom_datasets_from_args(
        args.ann_file_train,
        args.image_dir_train,
        args.name_train,
        args.ann_file_val,
        args.image_dir_val,
        args.name_val,
    )
    use_custom_datasets(cfg, train, val, check=check)
    if uses_shapes(cfg):
        prepare_shapes(cfg)


def setup_config(args: argparse.Namespace, world_size: int) -> CfgNode:
    """The run's final, frozen config; checks the data and raises SetupError on any problem."""
    cfg = get_fcos_cfg()
    merge_config(cfg, args.config_file, args.opts)
    _register_datasets(cfg, args, check=True)
    if not args.eval_only:
        check_datasets_exist(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_datasets_exist(cfg.DATASETS.TEST, "DATASETS.TEST")
    names: List[str] = ([] if args.eval_only else list(cfg.DATASETS.TRAIN)) + list(
        cfg.DATASETS.TEST
    )
    resolve_num_classes(cfg, names, explicit=num_classes_set_explicitly(cfg, args.opts))
    size_source = cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN
    apply_sizes_from_data(cfg, size_source, args.opts)
    if not args.eval_only:
        apply_epochs(cfg, cfg.DATASETS.TRAIN, args.opts)
    _check_weights_exist(cfg, args.resume)
    resolve_device(cfg)
    check_precision_config(cfg)
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference and cfg.SOLVER.IMS_PER_BATCH % reference != 0:
        raise SetupError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by SOLVER.REFERENCE_WORLD_SIZE ({reference})"
        )
    cfg = DefaultTrainer.auto_scale_workers(cfg, world_size)
    if cfg.SOLVER.IMS_PER_BATCH % world_size != 0:
        raise SetupError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number of processes ({world_size})"
        )
    cfg.freeze()
    return cfg


def _check_weights_exist(cfg: CfgNode, resume: bool) -> None:
    """A missing local MODEL.WEIGHTS is an error now, unless --resume will use a checkpoint instead.

    The message says how to train without weights: ``MODEL.WEIGHTS ""`` only for a config whose
    backbone can learn from random weights, the from-scratch config otherwise.
    """
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    try:
        check_weights_file(cfg.MODEL.WEIGHTS, scratch_advice(cfg))
    except FileNotFoundError as err:
        raise SetupError(str(err)) from None


def _worker_setup(cfg: CfgNode, args: argparse.Namespace) -> None:
    """Per-process setup: dataset registration, loggers, config copies, batch/LR summary."""
    cfg.defrost()
    _register_datasets(cfg, args, check=False)
    cfg.freeze()
    default_setup(cfg, args)
    quiet_expected_errors()
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=PROJECT_LOGGER)
    if comm.is_main_process() and args.config_file:
        # config_my.yaml: the user's --config-file as given (config.yaml is the full merged config).
        copy_file_atomic(args.config_file, os.path.join(cfg.OUTPUT_DIR, "config_my.yaml"))
    solver = cfg.SOLVER
    logger.info(
        f"Batch {solver.IMS_PER_BATCH} images over {comm.get_world_size()} process(es), {solver.OPTIMIZER} "
        f"BASE_LR {solver.BASE_LR:g} ({solver.BASE_LR / solver.IMS_PER_BATCH:.3g} per image), "
        f"MAX_ITER {solver.MAX_ITER}, NUM_CLASSES {cfg.MODEL.FCOS.NUM_CLASSES}, device {cfg.MODEL.DEVICE}"
    )


def evaluate(cfg: CfgNode, args: argparse.Namespace) -> Dict[str, object]:
    """``--eval-only``: load MODEL.WEIGHTS (or the last checkpoint with ``--resume``) and evaluate."""
    model = FCOSTrainer.build_model(cfg)
    checkpointer = FCOSCheckpointer(
        model, save_dir=cfg.OUTPUT_DIR, allow_unsafe_pickle=cfg.CHECKPOINT.ALLOW_UNSAFE_PICKLE
    )
    if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
        logger.warning("--eval-only without MODEL.WEIGHTS: evaluating randomly initialised weights")
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    results: Dict[str, object] = OrderedDict(FCOSTrainer.test(cfg, model))
    if cfg.TEST.AUG.ENABLED:
        results.update(FCOSTrainer.test_with_TTA(cfg, model))
    return results


def train(cfg: CfgNode, args: argparse.Namespace) -> Dict[str, object]:
    """Train (resuming with ``--resume``); returns the final evaluation's results."""
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if comm.is_main_process() and not resuming:
        archived = archive_previous_metrics(cfg.OUTPUT_DIR)
        if archived is not None:
            logger.info(
                f"New run in {cfg.OUTPUT_DIR}: the previous run's metrics.json is now {archived.name}"
            )
    trainer = FCOSTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    tta_results: Dict[str, object] = {}

    def test_with_tta() -> Dict[str, object]:
        tta_results.update(trainer.test_with_TTA(cfg, trainer.model))
        return tta_results

    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks([hooks.EvalHook(0, test_with_tta)])
    trainer.train()
    # DefaultTrainer keeps the last evaluation's results here (its EvalHook closure sets it).
    results: Dict[str, object] = OrderedDict(getattr(trainer, "_last_eval_results", None) or {})
    results.update(tta_results)
    return results


def main(cfg: CfgNode, args: argparse.Namespace) -> None:
    """One process's job (all processes run it under ``launch``)."""
    _worker_setup(cfg, args)
    results = evaluate(cfg, args) if args.eval_only else train(cfg, args)
    if comm.is_main_process() and cfg.DATASETS.TEST:
        table = format_ap_table(results)
        logger.info(f"Box AP on {list(cfg.DATASETS.TEST)}:\n{table}")


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, check the config and data, then launch; returns the exit status (see above)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S"
    )
    world_size = args.num_gpus * args.num_machines

    def setup_and_launch() -> int:
        cfg = setup_config(args, world_size)
        launch(
            main,
            args.num_gpus,
            args.num_machines,
            args.machine_rank,
            args.dist_url,
            args=(cfg, args),
            device=cfg.MODEL.DEVICE,
        )
        return 0

    return run("train_net.py", setup_and_launch)


if __name__ == "__main__":
    sys.exit(cli())
