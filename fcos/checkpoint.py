"""FCOSCheckpointer: detectron2's checkpointer with crash-safe saves.

A training job can be killed at any moment (OOM killer, preemption, kill -9). detectron2's
``Checkpointer.save`` writes ``model_XXXX.pth`` in place and then rewrites ``last_checkpoint``; a kill in
between leaves a truncated file that ``--resume`` picks up and fails on. Here both are written with
:func:`fcos.file_io.atomic_write`, ``last_checkpoint`` only after the checkpoint is complete, so a reader
sees either the old state or the new one, never a partial file.

Weights that became NaN or Inf are never saved (the last good checkpoint stays the last one), and a
``--resume`` whose ``last_checkpoint`` names a missing or corrupt file is an error naming both files
rather than a silent fallback to an older checkpoint (saves are atomic, so such a file was damaged
outside this program and deserves a look).

Loading accepts the checkpoint layouts of ``checkpoint_layouts`` (recognised by their keys, read without
running pickled code), checks every shape before touching the model, skips a class head of another
class count with one warning, and logs one table of what was loaded, skipped and missing.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from tabulate import tabulate
from torch import Tensor, nn

from .checkpoint_layouts import describe, read_checkpoint
from .errors import DIVERGENCE_HINT, NonFiniteLossError
from .file_io import atomic_write
from .safe_pickle import CorruptCheckpointError

LAST_CHECKPOINT_TAG = "last_checkpoint"


PRETRAINED_README = Path(__file__).resolve().parents[1] / "pretrained_weights" / "README.md"
SEED_CONFIG = "configs/fcos_R_50_FPN.yaml"
OFFICIAL_CONFIG = "configs/fcos_R_50_FPN_official.yaml"
SCRATCH_CONFIG = "configs/fcos_custom_scratch.yaml"
CLASS_HEAD_KEYS = ("head.cls_score.weight", "head.cls_score.bias")
_MAX_LISTED_MISMATCHES = 3


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors that do not fit the model built from the config; names keys, shapes and cause."""


class ResumeError(ValueError):
    """``--resume`` cannot continue: ``last_checkpoint`` names a missing or corrupt file."""


def scratch_advice(cfg: CfgNode) -> str:
    """How to train ``cfg`` without MODEL.WEIGHTS, or what can if it cannot learn from random init.

    A FrozenBN backbone keeps random normalisation statistics and ``FREEZE_AT > 0`` keeps random
    convolutions: neither learns from scratch (the FrozenBN R-50 diverges), so ``MODEL.WEIGHTS ""``
    would be bad advice for them.
    """
    norm, freeze_at = cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT
    if norm == "FrozenBN" or freeze_at > 0:
        return (
            f"This config cannot train from scratch (MODEL.RESNETS.NORM {norm}, "
            f"MODEL.BACKBONE.FREEZE_AT {freeze_at}: a randomly initialised frozen backbone does "
            f"not learn); to train without pretrained weights, use {SCRATCH_CONFIG}."
        )
    return 'To train this config from scratch, set MODEL.WEIGHTS "".'


def missing_weights_message(path: str, advice: str = "") -> str:
    """What to download and where, for a checkpoint path that does not exist; then ``advice``."""
    return (
        f"checkpoint file {path!r} (MODEL.WEIGHTS) does not exist. {PRETRAINED_README} says what to download "
        f"and where to put it: the seed/cvpods FCOS_imprv_R_50_FPN_1x.pth as "
        f"pretrained_weights/FCOS_imprv_R_50_FPN_1x.pth for {SEED_CONFIG}, or the official FCOS "
        f"FCOS_imprv_R_50_FPN_1x.pth saved as pretrained_weights/FCOS_imprv_R_50_FPN_1x_official.pth for "
        f"{OFFICIAL_CONFIG}." + (f" {advice}" if advice else "")
    )


def check_weights_file(path: str, hint: str = "") -> None:
    """Raise FileNotFoundError, saying what to download and where, for a local path that does not exist.

    URLs are left to detectron2's PathManager; ``hint`` is appended to the message.
    """
    if path and "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path, hint))


def _mismatch_cause(key: str, ckpt_shape: Sequence[int], model_shape: Sequence[int]) -> str:
    """The config switch most likely responsible for a shape mismatch at ``key``."""
    if (
        key == "backbone.top_block.p6.weight"
        and len(ckpt_shape) == 4
        and ckpt_shape[0] == model_shape[0]
    ):
        ckpt_from_p5 = ckpt_shape[1] == ckpt_shape[0]
        model_from = "P5" if model_shape[1] == model_shape[0] else "res5 (C5)"
        if ckpt_from_p5:
            return (
                f"the checkpoint computes P6 from P5 (official FCOS), the model from {model_from}: "
                f'set MODEL.FCOS.TOP_BLOCK_IN_FEATURE: "p5" (as {OFFICIAL_CONFIG} does)'
            )
        return (
            f"the checkpoint computes P6 from res5 (C5, seed/cvpods), the model from {model_from}: "
            f'set MODEL.FCOS.TOP_BLOCK_IN_FEATURE: "res5" (as {SEED_CONFIG} does)'
        )
    lateral_input = key.startswith("backbone.fpn_lateral") and ckpt_shape[0] == model_shape[0]
    if key.startswith("backbone.bottom_up.") or lateral_input:
        return (
            "the ResNet differs from the checkpoint's: check MODEL.RESNETS.DEPTH, RES2_OUT_CHANNELS, "
            "NUM_GROUPS and WIDTH_PER_GROUP"
        )
    if key.startswith(("backbone.", "head.")):
        return "the feature width differs from the checkpoint's: check MODEL.FPN.OUT_CHANNELS"
    return "the config builds a different architecture than the checkpoint was trained with"


def _root_cause_order(key: str) -> int:
    """Sort mismatches input-side first: a ResNet mismatch explains the FPN and head ones after it."""
    for rank, prefix in enumerate(
        ("backbone.bottom_up.", "backbone.fpn_", "backbone.top_block.", "head.")
    ):
        if key.startswith(prefix):
            return rank
    return 4


def _is_class_count_change(key: str, ckpt_shape: Sequence[int], model_shape: Sequence[int]) -> bool:
    return (
        key in CLASS_HEAD_KEYS
        and ckpt_shape[0] != model_shape[0]
        and ckpt_shape[1:] == model_shape[1:]
    )


@dataclass
class FittedWeights:
    """The part of a checkpoint that fits the model, and the class head left out on purpose."""

    to_load: Dict[str, Tensor]
    skipped: Dict[str, str] = field(default_factory=dict)
    class_head_warning: Optional[str] = None


def fit_to_model(weights: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> FittedWeights:
    """Check every shape before anything is loaded.

    A class head of another class count (fine-tuning on a new dataset) is skipped; any other mismatch
    raises, so the model is never left half-loaded.

    Raises:
        CheckpointMismatchError: naming each key, both shapes and the likely cause.
    """
    fitted = FittedWeights(to_load={})
    mismatches: List[Tuple[str, List[int], List[int]]] = []
    class_counts: Optional[Tuple[int, int]] = None
    for key, value in weights.items():
        target = model_state.get(key)
        if target is None or tuple(value.shape) == tuple(target.shape):
            fitted.to_load[key] = value
            continue
        ckpt_shape, model_shape = list(value.shape), list(target.shape)
        if _is_class_count_change(key, ckpt_shape, model_shape):
            class_counts = (ckpt_shape[0], model_shape[0])
            fitted.skipped[key] = f"checkpoint has {ckpt_shape[0]} classes, model {model_shape[0]}"
        else:
            mismatches.append((key, ckpt_shape, model_shape))
    if mismatches:
        mismatches.sort(key=lambda m: _root_cause_order(m[0]))
        listed = [
            f"{k}: checkpoint {c} vs model {m}: {_mismatch_cause(k, c, m)}"
            for k, c, m in mismatches
        ]
        more = len(listed) - _MAX_LISTED_MISMATCHES
        raise CheckpointMismatchError(
            f"{len(listed)} tensor(s) do not fit the model built from the config: "
            + "; ".join(listed[:_MAX_LISTED_MISMATCHES])
            + (f"; and {more} more" if more > 0 else "")
        )
    if class_counts is not None:
        fitted.class_head_warning = (
            f"class head head.cls_score not loaded: the checkpoint has {class_counts[0]} classes, "
            f"MODEL.FCOS.NUM_CLASSES is {class_counts[1]}; it keeps its initialisation "
            "(expected when fine-tuning on a dataset with other classes)"
        )
    return fitted


def _group_name(key: str) -> str:
    """Table row of a key: its first two dotted components without level digits (``backbone.fpn_lateral``)."""
    return ".".join(key.split(".")[:2]).rstrip("0123456789")


def _compact(keys: Iterable[str]) -> str:
    """``a.b.weight, a.b.bias`` -> ``a.b.{bias,weight}``: one entry per module."""
    by_module: Dict[str, List[str]] = defaultdict(list)
    for key in sorted(keys):
        module, _, leaf = key.rpartition(".")
        by_module[module].append(leaf)
    return ", ".join(
        f"{module}.{leaves[0]}" if len(leaves) == 1 else f"{module}.{{{','.join(leaves)}}}"
        for module, leaves in by_module.items()
    )


@dataclass
class LoadReport:
    """What a load did to each model/checkpoint key; ``table()`` is the log's single summary."""

    loaded: List[str]
    skipped: Dict[str, str]
    missing: List[str]
    unexpected: List[str]

    @property
    def complete(self) -> bool:
        return not (self.skipped or self.missing or self.unexpected)

    def _columns(self) -> Dict[str, List[str]]:
        return {
            "loaded": self.loaded,
            "skipped": list(self.skipped),
            "missing": self.missing,
            "unexpected": self.unexpected,
        }

    def _counts(self) -> Dict[str, Dict[str, int]]:
        columns = self._columns()
        counts: Dict[str, Dict[str, int]] = defaultdict(lambda: dict.fromkeys(columns, 0))
        for column, keys in columns.items():
            for key in keys:
                counts[_group_name(key)][column] += 1
        return counts

    def _listing(self, keys: List[str], column: str, counts: Dict[str, Dict[str, int]]) -> str:
        """Keys of one column, a whole table row shortened to ``row*`` (e.g. an ImageNet file's missing head)."""
        by_group: Dict[str, List[str]] = defaultdict(list)
        for key in keys:
            by_group[_group_name(key)].append(key)
        parts = []
        for group, group_keys in sorted(by_group.items()):
            whole_row = all(n == 0 for other, n in counts[group].items() if other != column)
            parts.append(f"{group}* ({len(group_keys)})" if whole_row else _compact(group_keys))
        return ", ".join(parts)

    def table(self) -> str:
        columns = self._columns()
        counts = self._counts()
        rows = [[group, *counts[group].values()] for group in sorted(counts)]
        rows.append(["total", *(len(keys) for keys in columns.values())])
        lines = [tabulate(rows, headers=["module", *columns], tablefmt="pipe")]
        for key, reason in self.skipped.items():
            lines.append(f"skipped {key}: {reason}")
        if self.missing:
            lines.append(
                f"missing from the checkpoint (left at their initialisation): {self._listing(self.missing, 'missing', counts)}"
            )
        if self.unexpected:
            lines.append(
                f"in the checkpoint but not in the model (ignored): {self._listing(self.unexpected, 'unexpected', counts)}"
            )
        return "\n".join(lines)


def _check_finite_weights(state: Mapping[str, Tensor], name: str) -> None:
    """Refuse to save NaN/Inf weights: such a checkpoint would replace the last good one."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLossError(
            f"model weights became NaN or Inf ({shown}); {name}.pth was not written, so the last "
            f"checkpoint is the last good one. To fix: {DIVERGENCE_HINT}"
        )


class FCOSCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and safe, layout-aware, shape-checked loading.

    ``save_dir`` must be a local folder (the atomic rename needs a real file system). Build it with
    ``allow_unsafe_pickle=cfg.CHECKPOINT.ALLOW_UNSAFE_PICKLE`` (see ``fcos.config``).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        allow_unsafe_pickle: bool = False,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """Load ``path`` (a local file or a URL detectron2's PathManager resolves); see the module doc.

        Raises:
            FileNotFoundError: pointing to pretrained_weights/README.md.
            CheckpointMismatchError: a shape that does not fit, prefixed with the file name.
        """
        check_weights_file(path)
        try:
            return super().load(path, checkpointables)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{path}: {e}") from None
        finally:
            # detectron2 main's DetectionCheckpointer.load sets this for the duration of a load,
            # asserts it is unset on entry and does not reset it when the load raises.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """fvcore's resume-or-load; ResumeError if last_checkpoint names a missing/corrupt file."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        tag = os.path.join(self.save_dir, LAST_CHECKPOINT_TAG)
        last_name = os.path.basename(last)
        others = sorted(
            (f for f in self.get_all_checkpoint_files() if os.path.basename(f) != last_name),
            key=os.path.getmtime,
        )
        fix = (
            f"write the name of an intact checkpoint into {tag}"
            + (f" (the newest other one is {os.path.basename(others[-1])})" if others else "")
            + ", or start over without --resume"
        )
        if not os.path.isfile(last):
            raise ResumeError(f"--resume: {tag} names {last}, which does not exist; {fix}")
        try:
            return self.load(last)
        except CorruptCheckpointError as e:
            raise ResumeError(
                f"--resume: {e}; {tag} names it as the checkpoint to resume from: {fix}"
            ) from e

    def _load_file(self, filename: str) -> Dict[str, Any]:
        converted = read_checkpoint(
            filename,
            allow_unsafe_pickle=self.allow_unsafe_pickle,
            model_keys=set(self.model.state_dict()),
        )
        self.logger.info(describe(converted, filename))
        return {**converted.extras, "model": converted.state_dict}

    def _load_model(self, checkpoint: Dict[str, Any]) -> LoadReport:
        weights: Dict[str, Tensor] = checkpoint.pop("model")
        model_state = self.model.state_dict()
        fitted = fit_to_model(weights, model_state)
        if not any(key in model_state for key in fitted.to_load):
            raise CheckpointMismatchError(
                "no tensor of the checkpoint has a name of this model "
                f"(checkpoint keys such as {sorted(weights)[:3]}, model keys such as {sorted(model_state)[:3]})"
            )
        if fitted.class_head_warning:
            self.logger.warning(fitted.class_head_warning)
        incompatible = self.model.load_state_dict(fitted.to_load, strict=False)
        unexpected = set(incompatible.unexpected_keys)
        return LoadReport(
            loaded=[k for k in fitted.to_load if k not in unexpected],
            skipped=fitted.skipped,
            missing=list(incompatible.missing_keys),
            unexpected=sorted(unexpected),
        )

    def _log_incompatible_keys(self, incompatible: LoadReport) -> None:
        """Log the load table (fvcore calls this with what ``_load_model`` returned)."""
        summary = f"Checkpoint load summary:\n{incompatible.table()}"
        if incompatible.complete:
            self.logger.info(summary)
        else:
            self.logger.warning(summary)

    def save(self, name: str, **kwargs: Any) -> None:
        """Dump the model and checkpointables to ``{save_dir}/{name}.pth`` atomically, then tag it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        _check_finite_weights(data["model"], name)
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name, not a path")
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        tag_file = os.path.join(self.save_dir, LAST_CHECKPOINT_TAG)
        atomic_write(tag_file, lambda f: f.write(last_filename_basename.encode("utf-8")))
