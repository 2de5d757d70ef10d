"""Training hooks and step logic the project adds to detectron2's DefaultTrainer.

* :class:`TrainingCurveHook` redraws the training-curve PNG after each evaluation and at the end.
* :class:`FiniteLossMixin` stops training at the first NaN/Inf loss, in every process, before the
  optimizer step, naming the iteration: detectron2 0.6 only raises in the main process (the others then
  hang in the next collective until the 30-minute timeout) and after the bad gradients were computed.
* :class:`FiniteLossAMPTrainer` is the mixed-precision step on CPU and CUDA (detectron2's
  ``AMPTrainer`` asserts CUDA, in 0.6 and main).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Iterable, Mapping

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm
from torch import nn

from fcos.precision import Precision

from .curves import CURVE_FILE, plot_training_curves

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the message names the iteration and the losses."""


class FiniteLossMixin:
    """For SimpleTrainer subclasses: check the losses on all ranks before the metrics are written."""

    iter: int

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float, prefix: str = "") -> None:
        bad = {k: float(v.detach()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
        device = next(iter(loss_dict.values())).device
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        if comm.get_world_size() > 1:
            dist.all_reduce(flag)
        if flag.item() > 0:
            where = f"in this process: {bad}" if bad else "in another process"
            raise NonFiniteLossError(
                f"Loss became NaN or Inf at iteration {self.iter} ({where}); training stopped before the "
                "optimizer step, so the last checkpoint is intact. Lower SOLVER.BASE_LR, enable "
                "SOLVER.CLIP_GRADIENTS, or check the data (dataset/check.py)"
            )
        super()._write_metrics(loss_dict, data_time, prefix)  # type: ignore[misc]


class FiniteLossTrainer(FiniteLossMixin, SimpleTrainer):
    """detectron2's SimpleTrainer that stops at a NaN/Inf loss in every process."""


class FiniteLossAMPTrainer(FiniteLossMixin, SimpleTrainer):
    """SimpleTrainer's step under ``torch.autocast`` on any device, plus a GradScaler for float16.

    Order per step: forward and losses under autocast; backward of the (scaled) loss; the NaN/Inf
    loss check on all ranks; ``unscale_`` so that gradient clipping, which detectron2 runs inside
    ``optimizer.step`` (``SOLVER.CLIP_GRADIENTS``), sees true gradients; the scaler's step, which
    skips the update when a gradient overflowed in float16 (identically on every DDP rank:
    gradients are all-reduced before the check); the scale update. Without float16 the scaler is
    disabled and those calls are plain ``optimizer.step()``. Its state goes into the trainer state
    (``--resume``).
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
    ) -> None:
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler(
            precision.device_type, enabled=precision.needs_grad_scaler
        )

    def run_step(self) -> None:
        assert self.model.training, "[FiniteLossAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with self.precision.autocast():
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        after_backward = getattr(self, "after_backward", None)  # detectron2 main's hook point
        if after_backward is not None:
            after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        scaler_state = state_dict.get("grad_scaler") or {}
        if self.grad_scaler.is_enabled() and not scaler_state:
            logger.info(
                "The checkpoint has no GradScaler state (trained without float16): the loss scale "
                f"starts at {self.grad_scaler.get_scale():g}"
            )
        elif scaler_state:
            self.grad_scaler.load_state_dict(scaler_state)


class TrainingCurveHook(HookBase):
    """Write ``training_curves.png`` in the output folder after each evaluation and at the end.

    Must come after detectron2's PeriodicWriter so ``metrics.json`` already holds the latest values.
    """

    def __init__(self, output_dir: str) -> None:
        self._metrics = os.path.join(output_dir, "metrics.json")
        self.path = os.path.join(output_dir, CURVE_FILE)

    def _plot(self) -> None:
        if plot_training_curves(self._metrics, self.path):
            logger.info(f"Training curves written to {self.path}")

    def after_step(self) -> None:
        storage = self.trainer.storage
        latest = storage.latest()
        if any(k.endswith("/AP") and it == storage.iter for k, (_, it) in latest.items()):
            self._plot()

    def after_train(self) -> None:
        self._plot()
