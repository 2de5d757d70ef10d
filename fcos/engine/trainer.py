"""The FCOS trainer: detectron2's DefaultTrainer with the pieces it lacks on this project's machines.

Kept from DefaultTrainer: model/optimizer/scheduler/data loader building order, hooks, ``--resume``.
Changed: DDP also on CPU (gloo; detectron2 passes GPU ``device_ids``), ``find_unused_parameters`` only for a
backbone that builds levels the head does not use, buffers (BatchNorm statistics) averaged over
processes before every evaluation and checkpoint, AdamW as well as SGD, NaN/Inf stop on every rank,
degenerate boxes dropped with a count, the training-curve PNG, COCO evaluation without the C++ extension,
atomic checkpoints (FCOSCheckpointer), FCOS's own test-time augmentation (FCOSWithTTA), and
``SOLVER.AMP`` on CPU as well as CUDA, with the dtype chosen by ``SOLVER.AMP.PRECISION``.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections import OrderedDict
from typing import Any, Dict, Iterable, List

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import DatasetEvaluator
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fcos import FCOSCheckpointer, FCOSWithTTA
from fcos.precision import Precision, resolve_precision

from .augmentation import build_train_mapper
from .config import OPTIMIZERS
from .datasets import drop_degenerate_boxes
from .evaluation import build_coco_evaluator
from .hooks import (
    FiniteLossAMPTrainer,
    FiniteLossTrainer,
    SynchronizeBuffersHook,
    TrainingCurveHook,
)

logger = logging.getLogger(__name__)


def unused_backbone_levels(cfg: CfgNode, model: nn.Module) -> List[str]:
    """Backbone outputs the FCOS head does not read (their parameters never get a gradient)."""
    produced = model.backbone.output_shape()
    return sorted(set(produced) - set(cfg.MODEL.FCOS.IN_FEATURES))


def _without_forward_buffer_sync() -> Dict[str, bool]:
    """The DDP argument that turns off the per-iteration buffer broadcast, by feature detection.

    torch >= 2.13 calls it ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated there).
    """
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def create_ddp_model(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """Wrap ``model`` in DDP (detectron2's ``create_ddp_model``) for several processes, GPU or CPU.

    Buffers are not broadcast at every forward, as in detectron2's DefaultTrainer; the processes'
    BatchNorm statistics are averaged before each evaluation and checkpoint instead
    (:class:`~fcos.engine.hooks.SynchronizeBuffersHook`). That costs one small all-reduce per
    evaluation/checkpoint and keeps the statistics of all processes' images. SyncBN (``"SyncBN"``
    norms) would also make the batch statistics of training global, at two all-reduces per BN layer
    and iteration: worth it only for a few images per process, so it stays a config choice.

    ``build_fcos_resnet_fpn_backbone`` builds only the levels in ``IN_FEATURES``, so DDP needs no
    ``find_unused_parameters``. The seed's ``build_retinanet_resnet_fpn_backbone`` always builds P3-P7
    (its checkpoints have those keys), so with an ``IN_FEATURES`` subset, and only then, unused
    parameters are searched for each step (slower; logged with the fix).
    """
    if comm.get_world_size() == 1:
        return model
    unused = unused_backbone_levels(cfg, model)
    if unused:
        logger.warning(
            f"Backbone {cfg.MODEL.BACKBONE.NAME} builds {unused} but MODEL.FCOS.IN_FEATURES is "
            f"{list(cfg.MODEL.FCOS.IN_FEATURES)}: using DDP find_unused_parameters=True (slower). "
            "build_fcos_resnet_fpn_backbone builds only the levels the head uses."
        )
    # detectron2 defaults device_ids to the local GPU; a CPU module needs None.
    device_ids = [comm.get_local_rank()] if next(model.parameters()).is_cuda else None
    return d2_create_ddp_model(
        model,
        device_ids=device_ids,
        find_unused_parameters=bool(unused),
        **_without_forward_buffer_sync(),
    )


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD exactly as detectron2 builds it, or AdamW with the same parameter groups and gradient clipping."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    if name == "ADAMW":
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params,
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    raise ValueError(
        f"SOLVER.OPTIMIZER: unknown optimizer {cfg.SOLVER.OPTIMIZER!r}; choose one of {list(OPTIMIZERS)}"
    )


def training_precision(cfg: CfgNode) -> Precision:
    """``SOLVER.AMP`` resolved for ``MODEL.DEVICE``, logged once per process (trainer creation)."""
    amp, device_type = cfg.SOLVER.AMP, torch.device(cfg.MODEL.DEVICE).type
    precision = resolve_precision("SOLVER.AMP", amp.ENABLED, amp.PRECISION, device_type)
    if precision.warning:
        logger.warning(precision.warning)
    logger.info(precision.description)
    return precision


class FCOSTrainer(DefaultTrainer):
    """DefaultTrainer for FCOS; see the module docstring for what differs."""

    def __init__(self, cfg: CfgNode) -> None:
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(cfg, model)
        precision = training_precision(cfg)
        if precision.enabled:
            self._trainer = FiniteLossAMPTrainer(model, data_loader, optimizer, precision)
        else:
            self._trainer = FiniteLossTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Atomic saves: a kill -9 during a save never leaves last_checkpoint pointing at a torn file.
        self.checkpointer = FCOSCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            allow_unsafe_pickle=cfg.CHECKPOINT.ALLOW_UNSAFE_PICKLE,
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def state_dict(self) -> Dict[str, Any]:
        """Iteration, hook states (LR scheduler) and, unlike detectron2 0.6, the optimizer state.

        detectron2 0.6's DefaultTrainer saves only the iteration and hooks, so ``--resume`` restarted
        AdamW's moments (or SGD's momentum) from zero.
        """
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; a state without ``_trainer`` (from detectron2 0.6 or the
        seed) resumes with a fresh optimizer.

        TrainerBase's loader, not DefaultTrainer's: detectron2 main's reads ``_trainer``
        unconditionally, 0.6 has none.
        """
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning(
                "The checkpoint has no optimizer state (written by plain detectron2?): it starts fresh"
            )

    def build_hooks(self) -> List[hooks.HookBase]:
        """detectron2's hooks, buffer sync before the first checkpoint/eval hook, curves last."""
        ret = super().build_hooks()
        saving = (hooks.PeriodicCheckpointer, hooks.EvalHook)
        first = next(i for i, h in enumerate(ret) if isinstance(h, saving))
        periods = (self.cfg.TEST.EVAL_PERIOD, self.cfg.SOLVER.CHECKPOINT_PERIOD)
        ret.insert(first, SynchronizeBuffersHook(self.model, periods))
        if comm.is_main_process():
            ret.append(TrainingCurveHook(self.cfg.OUTPUT_DIR))
        return ret

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Iterable[List[dict]]:
        """detectron2's loader over the training sets, minus boxes with no area inside their image,
        with the colour jitter of ``INPUT.COLOR_JITTER``."""
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            proposal_files=None,
        )
        dataset = drop_degenerate_boxes(dataset, cfg.DATASETS.TRAIN, cfg.DATASETS.STRICT_BOXES)
        return build_detection_train_loader(cfg, dataset=dataset, mapper=build_train_mapper(cfg))

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        return build_coco_evaluator(dataset_name, output_folder or f"{cfg.OUTPUT_DIR}/inference")

    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: nn.Module) -> Dict[str, Dict[str, float]]:
        """Evaluate with test-time augmentation (``TEST.AUG``); metric names get a ``_TTA`` suffix."""
        logger.info("Running inference with test-time augmentation ...")
        tta_model = FCOSWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, f"{cfg.OUTPUT_DIR}/inference_TTA")
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, tta_model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())
