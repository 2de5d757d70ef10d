"""Training hooks and step logic the project adds to detectron2's DefaultTrainer.

* :class:`TrainingCurveHook` redraws the training-curve PNG after each evaluation and at the end.
* :class:`SynchronizeBuffersHook` makes every process hold the same buffers (BatchNorm running
  statistics) before each evaluation and checkpoint, see :func:`synchronize_buffers`.
* :class:`FiniteLossMixin` stops training at the first NaN/Inf head output (checked by the model's
  loss computation, ``fcos.losses.check_finite_predictions``) or loss, in every process, before the
  optimizer step, naming the iteration: detectron2 0.6 only raises in the main process (the others then
  hang in the next collective until the 30-minute timeout) and after the bad gradients were computed.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from torch import nn

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

    def _write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        prefix: str = "",
        iter: Optional[int] = None,  # noqa: A002 - detectron2 main's keyword name
    ) -> None:
        """Stop on a non-finite loss, then write the metrics as detectron2 does.

        ``iter`` is passed by detectron2 main (its asynchronous metric writer runs after
        ``self.iter`` moved on) and forwarded only when given: 0.6's method has no such argument.
        """
        step = self.iter if iter is None else iter
        bad = {k: float(v.detach()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
        device = next(loss.device for loss in loss_dict.values())
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        if comm.get_world_size() > 1:
            dist.all_reduce(flag)
        if flag.item() > 0:
            where = f"in this process: {bad}" if bad else "in another process"
            raise NonFiniteLossError(f"a loss became NaN or Inf at iteration {step} ({where})")
        if iter is None:
            super()._write_metrics(loss_dict, data_time, prefix)  # type: ignore[misc]
        else:
            super()._write_metrics(loss_dict, data_time, prefix, iter=iter)  # type: ignore[misc]


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


def synchronize_buffers(model: nn.Module) -> None:
    """Average every floating-point buffer of ``model`` over all processes, in place.

    DDP trains without syncing buffers (one broadcast per iteration would make every process's
    BatchNorm statistics those of process 0's images only). Each process's running mean and variance
    are then moving averages over its own images; their mean over processes is the moving average
    over all images (exact for the mean; for the variance it leaves out the small spread between the
    processes' batch means). Integer buffers (``num_batches_tracked``) advance in lockstep and stay.
    No-op in one process.
    """
    if comm.get_world_size() == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)
    flat /= comm.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


class SynchronizeBuffersHook(HookBase):
    """Call :func:`synchronize_buffers` before every evaluation and checkpoint, and at the end.

    Must come before detectron2's PeriodicCheckpointer and EvalHook (and after PreciseBN, which
    recomputes the statistics per process), so the saved model is the evaluated model and every
    process evaluates its share of the val set with the same statistics. ``periods`` are the
    evaluation and checkpoint periods (0 = never); the last iteration always synchronises.
    """

    def __init__(self, model: nn.Module, periods: Sequence[int]) -> None:
        self._model = model
        self._periods = [p for p in periods if p > 0]

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter >= self.trainer.max_iter or any(next_iter % p == 0 for p in self._periods):
            synchronize_buffers(self._model)

    def after_train(self) -> None:
        # Only after a completed run: after an exception another process may never get here.
        if self.trainer.iter >= self.trainer.max_iter:
            synchronize_buffers(self._model)
