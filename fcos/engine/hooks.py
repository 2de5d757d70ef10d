"""Training hooks and step logic the project adds to detectron2's DefaultTrainer.

* :class:`TrainingCurveHook` redraws the training-curve PNG after each evaluation and at the end.
* :class:`FiniteLossMixin` stops training at the first NaN/Inf head output (checked by the model's
  loss computation, ``fcos.losses.check_finite_predictions``) or loss, in every process, before the
  optimizer step, naming the iteration: detectron2 0.6 only raises in the main process (the others then
  hang in the next collective until the 30-minute timeout) and after the bad gradients were computed.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm

from fcos.errors import DIVERGENCE_HINT, NonFiniteLossError

from .curves import CURVE_FILE, plot_training_curves

__all__ = ["FiniteLossAMPTrainer", "FiniteLossTrainer", "NonFiniteLossError", "TrainingCurveHook"]

logger = logging.getLogger(__name__)


class FiniteLossMixin:
    """For SimpleTrainer subclasses: stop on NaN/Inf outputs or losses on all ranks, at one step."""

    iter: int

    def run_step(self) -> None:
        try:
            super().run_step()  # type: ignore[misc]
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"training diverged at iteration {self.iter}: {err}; stopped before the optimizer "
                f"step, so the last checkpoint is intact. To fix: {DIVERGENCE_HINT}"
            ) from err

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float, prefix: str = "") -> None:
        bad = {k: float(v.detach()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
        device = next(iter(loss_dict.values())).device
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        if comm.get_world_size() > 1:
            dist.all_reduce(flag)
        if flag.item() > 0:
            where = f"in this process: {bad}" if bad else "in another process"
            raise NonFiniteLossError(f"a loss became NaN or Inf ({where})")
        super()._write_metrics(loss_dict, data_time, prefix)  # type: ignore[misc]


class FiniteLossTrainer(FiniteLossMixin, SimpleTrainer):
    """detectron2's SimpleTrainer that stops at a NaN/Inf loss in every process."""


class FiniteLossAMPTrainer(FiniteLossMixin, AMPTrainer):
    """detectron2's AMPTrainer (CUDA only) that stops at a NaN/Inf loss in every process."""


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
