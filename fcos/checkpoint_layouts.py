"""Recognise a checkpoint's key layout and rename it to this project's (detectron2) parameter names.

Published FCOS weights come in several layouts (docs/MODEL.md, "Checkpoint layouts"). The layout is
told apart by the keys, not by the file name, because the seed's cvpods file and the official
maskrcnn-benchmark file are both called ``FCOS_imprv_R_50_FPN_1x.pth``. Everything here is a pure
function of the file's content, shared by ``FCOSCheckpointer`` and the ``tools/convert.py`` CLI.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .deform_conv import OFFICIAL_WEIGHT_FACTOR
from .safe_pickle import load_pickle, load_torch

# detectron2's FrozenBatchNorm2d (and nn.BatchNorm2d) divide by sqrt(running_var + eps) with this eps.
DETECTRON2_BN_EPS = 1e-5
BACKBONE_PREFIX = "backbone.bottom_up."
_MODULE_PREFIX = "module."
# Entries that describe a file rather than training state.
_FILE_METADATA = ("__author__", "matching_heuristics")


class Layout(str, Enum):
    """Key layouts this project loads; the value is what logs and errors call it."""

    DETECTRON2 = "detectron2/cvpods/seed (backbone.*, head.*)"
    OFFICIAL = "official FCOS / maskrcnn-benchmark (backbone.body.*, rpn.head.*)"
    TORCHVISION = "torchvision ResNet (conv1.weight, layer1.0.*)"
    DETECTRON2_RESNET = "detectron2 ResNet backbone (stem.*, res2.*)"
    CAFFE2 = "detectron2/Caffe2 ImageNet .pkl (conv1_w, res2_0_branch2a_w)"


class UnknownLayoutError(ValueError):
    """The file holds no state dict, or its keys match none of the layouts in :class:`Layout`."""


@dataclass
class ConvertedCheckpoint:
    """A checkpoint file's weights in detectron2 names, and what was dropped on the way."""

    state_dict: Dict[str, Tensor]
    layout: Layout
    # Non-weight entries (optimizer, trainer state, iteration) kept for resuming; only for DETECTRON2,
    # since another code base's optimizer or scheduler state cannot be restored into this one.
    extras: Dict[str, Any] = field(default_factory=dict)
    # Keys deliberately not converted (ImageNet classifier, BN counters, Caffe2 momenta), for the log.
    dropped: List[str] = field(default_factory=list)
    ignored_extras: List[str] = field(default_factory=list)


def _split_container(data: Any, path: str) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
    """(weights, other entries) of a raw state dict, ``{"model": ...}``, ``{"state_dict": ...}`` or Caffe2 ``{"blobs": ...}``."""
    if not isinstance(data, Mapping):
        raise UnknownLayoutError(
            f"{path}: expected a dict of tensors or {{'model': state_dict, ...}}, "
            f"got {type(data).__name__}"
        )
    for container in ("model", "state_dict", "blobs"):
        if isinstance(data.get(container), Mapping):
            return data[container], {k: v for k, v in data.items() if k != container}
    return data, {}


def _as_tensors(weights: Mapping[str, Any], path: str) -> Dict[str, Tensor]:
    tensors: Dict[str, Tensor] = {}
    for key, value in weights.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, Tensor):
            raise UnknownLayoutError(
                f"{path}: weight {key!r} is a {type(value).__name__}, not a tensor or numpy array"
            )
        tensors[key] = value
    return tensors


def _strip_module_prefix(weights: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Remove the ``module.`` that (Distributed)DataParallel adds to every key (only if all have it)."""
    if weights and all(k.startswith(_MODULE_PREFIX) for k in weights):
        stripped = OrderedDict(weights)
        consume_prefix_in_state_dict_if_present(stripped, _MODULE_PREFIX)
        return dict(stripped)
    return weights


def detect_layout(keys: List[str], path: str, model_keys: Collection[str] = ()) -> Layout:
    """The layout of a state dict's keys (``module.`` already stripped).

    Keys that are already names of the model being loaded (``model_keys``; e.g. resuming any model from
    its own checkpoint) need no conversion and count as detectron2 layout.

    Raises:
        UnknownLayoutError: naming the file and a few of its keys.
    """
    if any(k.startswith(("backbone.body.", "rpn.head.")) for k in keys):
        return Layout.OFFICIAL
    if any(k.startswith(("backbone.", "head.")) or k in model_keys for k in keys):
        return Layout.DETECTRON2
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return Layout.TORCHVISION
    if any(re.match(r"(stem|res[2-5])\.", k) for k in keys):
        return Layout.DETECTRON2_RESNET
    if "conv1_w" in keys or any(re.match(r"res\d+_\d+_branch", k) for k in keys):
        return Layout.CAFFE2
    sample = sorted(keys)[:5]
    raise UnknownLayoutError(
        f"{path}: unrecognised checkpoint layout (keys such as {sample}); supported: "
        + "; ".join(layout.value for layout in Layout)
        + ". See pretrained_weights/README.md"
    )


def _rename_resnet_body(key: str) -> str:
    """torchvision / maskrcnn-benchmark ResNet names -> detectron2 ResNet names (no prefix).

    ``stem.bn1`` and the bare torchvision ``bn1`` both become ``stem.conv1.norm``; ``layer{n}`` becomes
    ``res{n+1}``; ``bn{k}`` -> ``conv{k}.norm``; ``downsample.0`` / ``downsample.1`` -> ``shortcut`` /
    ``shortcut.norm``.
    """
    key = re.sub(r"^(stem\.)?conv1\.", "stem.conv1.", key)
    key = re.sub(r"^(stem\.)?bn1\.", "stem.conv1.norm.", key)
    key = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.")
    return key.replace(".downsample.1.", ".shortcut.norm.")


# Official FCOS (maskrcnn-benchmark) module paths outside the ResNet body -> detectron2 FCOS paths.
_OFFICIAL_RENAMES: Tuple[Tuple[str, Callable[[re.Match], str]], ...] = (
    (r"^backbone\.fpn\.fpn_inner(\d)\.", lambda m: f"backbone.fpn_lateral{int(m.group(1)) + 1}."),
    (r"^backbone\.fpn\.fpn_layer(\d)\.", lambda m: f"backbone.fpn_output{int(m.group(1)) + 1}."),
    (r"^backbone\.fpn\.top_blocks\.", lambda m: "backbone.top_block."),
    (r"^rpn\.head\.cls_tower\.", lambda m: "head.cls_subnet."),
    (r"^rpn\.head\.bbox_tower\.", lambda m: "head.bbox_subnet."),
    (r"^rpn\.head\.cls_logits\.", lambda m: "head.cls_score."),
    (r"^rpn\.head\.", lambda m: "head."),
)
# An official DCN tower conv (USE_DCN_IN_TOWER, DFConv2d) keeps its deformable conv in ``.conv``.
_OFFICIAL_DCN_TOWER = re.compile(r"^(head\.(?:cls|bbox)_subnet\.\d+)\.conv\.(weight|bias)$")


def _official_deformable_tower(key: str, value: Tensor) -> Tuple[str, Tensor]:
    """DFConv2d ``.conv.weight``/``.conv.bias`` -> the tower conv's own keys (``fcos.deform_conv``).

    The weight is scaled by ``OFFICIAL_WEIGHT_FACTOR`` because our modulation is 2 * sigmoid where
    DFConv2d's is sigmoid; the ``.offset`` conv keeps its name and values.
    """
    match = _OFFICIAL_DCN_TOWER.match(key)
    if match is None:
        return key, value
    if match.group(2) == "weight":
        value = value * OFFICIAL_WEIGHT_FACTOR
    return f"{match.group(1)}.{match.group(2)}", value


def official_to_detectron2(weights: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Rename an official FCOS state dict (``module.`` stripped); returns (state dict, dropped keys).

    maskrcnn-benchmark's FrozenBatchNorm2d computes ``x * w / sqrt(running_var) + ...`` with no eps,
    detectron2's adds ``DETECTRON2_BN_EPS`` under the square root. Storing ``running_var - eps`` makes the
    detectron2 layer compute exactly the official function. (detectron2 0.6's FrozenBatchNorm2d only
    looks at the state-dict version to fill in missing running stats; it does no eps correction itself,
    and a renamed dict carries no version metadata anyway.)
    """
    converted: Dict[str, Tensor] = {}
    dropped: List[str] = []
    for key, value in weights.items():
        if key.endswith(".num_batches_tracked"):
            dropped.append(key)
            continue
        if key.startswith("backbone.body."):
            new_key = BACKBONE_PREFIX + _rename_resnet_body(key[len("backbone.body.") :])
            if new_key.endswith(".running_var"):
                value = value - DETECTRON2_BN_EPS
        else:
            new_key = key
            for pattern, replacement in _OFFICIAL_RENAMES:
                new_key, count = re.subn(pattern, replacement, new_key)
                if count:
                    break
            new_key, value = _official_deformable_tower(new_key, value)
        converted[new_key] = value
    return converted, dropped


def torchvision_to_detectron2(weights: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """torchvision ResNet state dict -> ``backbone.bottom_up.*``; the ImageNet ``fc`` and BN counters are dropped.

    torchvision's BatchNorm eps is detectron2's (1e-5), so values are copied unchanged. Note that
    torchvision ResNets put the stride in the 3x3 conv: such weights need ``MODEL.RESNETS.STRIDE_IN_1X1
    False`` and RGB input normalised like torchvision (see pretrained_weights/README.md).
    """
    converted: Dict[str, Tensor] = {}
    dropped: List[str] = []
    for key, value in weights.items():
        if key.startswith("fc.") or key.endswith(".num_batches_tracked"):
            dropped.append(key)
            continue
        converted[BACKBONE_PREFIX + _rename_resnet_body(key)] = value
    return converted, dropped


def _prefix_resnet(weights: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Bare detectron2 ResNet names -> ``backbone.bottom_up.*``; ImageNet classifiers are dropped."""
    converted: Dict[str, Tensor] = {}
    dropped: List[str] = []
    for key, value in weights.items():
        if key.startswith(("linear.", "fc1000.")) or key.endswith(".num_batches_tracked"):
            dropped.append(key)
        elif re.match(r"(stem|res\d)\.", key):
            converted[BACKBONE_PREFIX + key] = value
        else:
            converted[key] = value
    return converted, dropped


def caffe2_to_detectron2(weights: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Caffe2/MSRA ImageNet blobs -> ``backbone.bottom_up.*`` through detectron2's own name conversion."""
    momenta = [k for k in weights if k.endswith("_momentum")]
    renamed, _ = convert_c2_detectron_names({k: v for k, v in weights.items() if k not in momenta})
    converted, dropped = _prefix_resnet(renamed)
    return converted, momenta + dropped


def convert_to_detectron2(
    weights: Dict[str, Tensor], layout: Layout
) -> Tuple[Dict[str, Tensor], List[str]]:
    """Detectron2-named state dict of ``weights`` in ``layout``; returns (state dict, dropped keys)."""
    if layout == Layout.DETECTRON2:
        return dict(weights), []
    if layout == Layout.OFFICIAL:
        return official_to_detectron2(weights)
    if layout == Layout.TORCHVISION:
        return torchvision_to_detectron2(weights)
    if layout == Layout.DETECTRON2_RESNET:
        return _prefix_resnet(weights)
    return caffe2_to_detectron2(weights)


def read_checkpoint(
    path: str, *, allow_unsafe_pickle: bool = False, model_keys: Collection[str] = ()
) -> ConvertedCheckpoint:
    """Load ``path`` safely (``.pkl``: arrays-only unpickler; else ``torch.load(weights_only=True)``),
    recognise its layout (see ``detect_layout`` for ``model_keys``) and convert it to detectron2 names.
    """
    loader = load_pickle if path.endswith(".pkl") else load_torch
    weights, extras = _split_container(loader(path, allow_unsafe=allow_unsafe_pickle), path)
    tensors = _strip_module_prefix(_as_tensors(weights, path))
    layout = detect_layout(list(tensors), path, model_keys)
    state_dict, dropped = convert_to_detectron2(tensors, layout)
    extras = {k: v for k, v in extras.items() if k not in _FILE_METADATA}
    ignored: List[str] = []
    if layout != Layout.DETECTRON2:
        ignored, extras = sorted(extras), {}
    return ConvertedCheckpoint(state_dict, layout, extras, dropped, ignored)


def describe(checkpoint: ConvertedCheckpoint, path: Optional[str] = None) -> str:
    """One log line: which layout was recognised and what was converted or dropped."""
    parts = [
        f"{path + ': ' if path else ''}{checkpoint.layout.value} layout, {len(checkpoint.state_dict)} tensors"
    ]
    if checkpoint.layout == Layout.OFFICIAL:
        parts.append(
            f"renamed to detectron2 names, FrozenBN running_var reduced by eps={DETECTRON2_BN_EPS:g}"
        )
    elif checkpoint.layout != Layout.DETECTRON2:
        parts.append(f"renamed to {BACKBONE_PREFIX}*")
    if checkpoint.dropped:
        shown = sorted(checkpoint.dropped)
        more = f", ... ({len(shown)} in all)" if len(shown) > 4 else ""
        parts.append(f"dropped unused tensors {', '.join(shown[:4])}{more}")
    if checkpoint.ignored_extras:
        parts.append(
            f"ignored non-weight entries {checkpoint.ignored_extras} (another code base's training state)"
        )
    return "; ".join(parts)
