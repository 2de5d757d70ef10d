"""Training hooks and step logic the project adds to detectron2's DefaultTrainer.

* :class:`TrainingCurveHook` redraws the training-curve PNG after each evaluation and at the end.
* :class:`SynchronizeBuffersHook` makes every process hold the same buffers (BatchNorm running
  statistics) before each evaluation and checkpoint, see :func:`synchronize_buffers`.
* :class:`FiniteLossMixin` stops training at the first NaN/Inf head output (checked by the model's
  loss computation, ``fcos.losses.check_finite_predictions``) or loss, in every process, before the
  optimizer step, naming the iteration: detectron2 0.6 only raises in the main process (the others then
  hang in the next collective until the 30-minute timeout) and after the bad gradients were computed.
* :class:`FiniteLossAMPTrainer` is the mixed-precision step on CPU and CUDA (detectron2's
  ``AMPTrainer`` asserts CUDA, in 0.6 and main).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm
from torch import nn

from fcos.errors import DIVERGENCE_HINT, NonFiniteLossError
from fcos.precision import Precision

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


class AutocastTrainer(SimpleTrainer):
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
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
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


class FiniteLossAMPTrainer(FiniteLossMixin, AutocastTrainer):
    """The mixed-precision step that stops at a NaN/Inf output or loss in every process."""


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
