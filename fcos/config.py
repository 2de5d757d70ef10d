"""All config keys of the FCOS library (``MODEL.FCOS.*``, ``CHECKPOINT.*``) and their validation.

``add_fcos_config`` is the one entry point: it adds the model keys and the checkpoint-loading policy.
The training application's own keys (optimizer, embedded dataset) are added by ``fcos.engine.config``.

The key names and defaults are the seed project's, so its YAML files keep working; the four
flavour switches (``TOP_BLOCK_IN_FEATURE``, ``GRID_OFFSET``, ``INFERENCE_TOPK_FIRST``,
``POSTPROCESS``) are new and default to the seed/cvpods behaviour that its pretrained checkpoint was
trained with. Every key is described in docs/MODEL.md.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec

from .losses import BOX_QUALITIES

HEAD_NORMS = ("GN", "BN", "SyncBN", "")
IOU_LOSS_TYPES = ("iou", "linear_iou", "giou")
TOP_BLOCK_IN_FEATURES = ("res5", "p5")
POSTPROCESS_STYLES = ("seed", "official")
_P2_HINT = "; P2 needs res2 in MODEL.RESNETS.OUT_FEATURES and MODEL.FPN.IN_FEATURES"


class FCOSConfigError(ValueError):
    """A ``MODEL.FCOS`` value that cannot build a working model; the message names the key."""


def add_fcos_config(cfg: CN) -> None:
    """Add the ``MODEL.FCOS`` keys (seed defaults) and ``CHECKPOINT.*`` to a detectron2 config, in place."""
    _C = cfg
    _C.MODEL.FCOS = CN()
    _C.MODEL.FCOS.NUM_CLASSES = 80
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.FCOS.NUM_CONVS = 4
    _C.MODEL.FCOS.FPN_STRIDES = [8, 16, 32, 64, 128]
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    _C.MODEL.FCOS.CENTERNESS_ON_REG = False
    _C.MODEL.FCOS.NORM_REG_TARGETS = False
    _C.MODEL.FCOS.HEAD_NORM = "GN"
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.05
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6
    _C.MODEL.FCOS.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.IOU_LOSS_TYPE = "iou"
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 0.0
    _C.MODEL.FCOS.OBJECT_SIZES_OF_INTEREST = [
        [-1, 64],
        [64, 128],
        [128, 256],
        [256, 512],
        [512, float("inf")],
    ]
    # All-reduce the loss normalizers over processes (a no-op in one process).
    _C.MODEL.FCOS.NORM_SYNC = False
    # Flavour switches: seed/cvpods (default) vs. official FCOS (p5, 0.5, False, official).
    _C.MODEL.FCOS.TOP_BLOCK_IN_FEATURE = "res5"
    _C.MODEL.FCOS.GRID_OFFSET = 0.0
    _C.MODEL.FCOS.INFERENCE_TOPK_FIRST = True
    # "seed": detectron2's NMS; "official": clip to the input, "+1" IoU NMS, the official cut.
    _C.MODEL.FCOS.POSTPROCESS = "seed"
    # CPU inference in channels-last with frozen BN folded into the convolutions (float rounding
    # differences only); False computes exactly as detectron2 does.
    _C.MODEL.FCOS.FAST_CPU_INFERENCE = True
    # Bounds the (points x GT boxes) work of target assignment; results do not depend on it.
    _C.MODEL.FCOS.ASSIGNMENT_CHUNK_ELEMENTS = 1 << 21
    # Inference under autocast ("auto" | "float16" | "bfloat16", see fcos.precision): backbone and
    # head in the reduced dtype, decoding in fp32. detectron2 itself has only SOLVER.AMP.
    _C.TEST.AMP = CN({"ENABLED": False, "PRECISION": "auto"})
    # How checkpoints are read, a loading policy rather than a model parameter. Off: files are read
    # without executing pickled code (``fcos.safe_pickle``) and one that needs more is refused with a
    # message naming this key; turn it on only for files from a trusted source.
    _C.CHECKPOINT = CN()
    _C.CHECKPOINT.ALLOW_UNSAFE_PICKLE = False
    _C.register_renamed_key(
        "MODEL.FCOS.ALLOW_UNSAFE_PICKLE",
        "CHECKPOINT.ALLOW_UNSAFE_PICKLE",
        message="a checkpoint-loading policy, not a model parameter",
    )
    # Options beyond the reference models (docs/MODEL.md); the defaults build the reference model.
    # Quality branch target: "ctrness" (FCOS) or "iou" (AdelaiDet: IoU of the predicted box).
    _C.MODEL.FCOS.BOX_QUALITY = "ctrness"
    # Official FCOS key: the last conv of each tower is a modulated deformable conv (DCNv2).
    _C.MODEL.FCOS.USE_DCN_IN_TOWER = False


def _fail(key: str, message: str) -> FCOSConfigError:
    return FCOSConfigError(f"MODEL.FCOS.{key}: {message}")


def validate_fcos_config(cfg: CN, backbone_shapes: Dict[str, ShapeSpec]) -> None:
    """Reject settings that would otherwise surface as a shape error deep inside training.

    Args:
        cfg: the full config.
        backbone_shapes: ``backbone.output_shape()``; used to check features and strides.
    """
    fc = cfg.MODEL.FCOS
    in_features: Sequence[str] = fc.IN_FEATURES
    if len(in_features) == 0:
        raise _fail(
            "IN_FEATURES", "is empty; list the FPN levels to predict on, e.g. [p3, p4, p5, p6, p7]"
        )
    missing = [f for f in in_features if f not in backbone_shapes]
    if missing:
        raise _fail(
            "IN_FEATURES",
            f"{missing} not produced by the backbone {cfg.MODEL.BACKBONE.NAME} "
            f"(it produces {sorted(backbone_shapes)})" + (_P2_HINT if "p2" in missing else ""),
        )
    strides = [backbone_shapes[f].stride for f in in_features]
    if list(fc.FPN_STRIDES) != strides:
        raise _fail(
            "FPN_STRIDES",
            f"{list(fc.FPN_STRIDES)} does not match the backbone strides {strides} of IN_FEATURES {list(in_features)}",
        )
    channels = {backbone_shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise _fail(
            "IN_FEATURES",
            f"levels {list(in_features)} have different channel counts {sorted(channels)}",
        )
    sizes = fc.OBJECT_SIZES_OF_INTEREST
    if len(sizes) != len(in_features):
        raise _fail(
            "OBJECT_SIZES_OF_INTEREST",
            f"has {len(sizes)} rows but IN_FEATURES has {len(in_features)} levels; give one [lo, hi] row per level",
        )
    for i, row in enumerate(sizes):
        if len(row) != 2 or not (row[0] < row[1]):
            raise _fail(
                "OBJECT_SIZES_OF_INTEREST", f"row {i} = {list(row)} must be [lo, hi] with lo < hi"
            )
    _check_sizes_follow_strides(sizes, strides, in_features)
    if fc.HEAD_NORM not in HEAD_NORMS:
        raise _fail("HEAD_NORM", f"unknown norm {fc.HEAD_NORM!r}; choose one of {list(HEAD_NORMS)}")
    if fc.IOU_LOSS_TYPE not in IOU_LOSS_TYPES:
        raise _fail(
            "IOU_LOSS_TYPE",
            f"unknown loss {fc.IOU_LOSS_TYPE!r}; choose one of {list(IOU_LOSS_TYPES)}",
        )
    if fc.TOP_BLOCK_IN_FEATURE not in TOP_BLOCK_IN_FEATURES:
        raise _fail(
            "TOP_BLOCK_IN_FEATURE",
            f"{fc.TOP_BLOCK_IN_FEATURE!r}; choose 'res5' (seed/cvpods) or 'p5' (official FCOS)",
        )
    if fc.POSTPROCESS not in POSTPROCESS_STYLES:
        raise _fail(
            "POSTPROCESS",
            f"{fc.POSTPROCESS!r}; choose 'seed' (seed/cvpods) or 'official' (official FCOS)",
        )
    if not isinstance(fc.FAST_CPU_INFERENCE, bool):
        raise _fail("FAST_CPU_INFERENCE", f"{fc.FAST_CPU_INFERENCE!r} must be True or False")
    if fc.TOPK_CANDIDATES_TEST < 1:
        raise _fail("TOPK_CANDIDATES_TEST", f"{fc.TOPK_CANDIDATES_TEST} must be >= 1")
    if fc.NUM_CLASSES < 1:
        raise _fail("NUM_CLASSES", f"{fc.NUM_CLASSES} must be >= 1 (FCOS has no background class)")
    if fc.NUM_CONVS < 0:
        raise _fail("NUM_CONVS", f"{fc.NUM_CONVS} must be >= 0")
    if not 0.0 < fc.PRIOR_PROB < 1.0:
        raise _fail("PRIOR_PROB", f"{fc.PRIOR_PROB} must be in (0, 1)")
    if not 0.0 <= fc.GRID_OFFSET < 1.0:
        raise _fail("GRID_OFFSET", f"{fc.GRID_OFFSET} must be a fraction of the stride in [0, 1)")
    if fc.CENTER_SAMPLING_RADIUS < 0:
        raise _fail(
            "CENTER_SAMPLING_RADIUS", f"{fc.CENTER_SAMPLING_RADIUS} must be >= 0 (0 disables it)"
        )
    weights = list(fc.BBOX_REG_WEIGHTS)
    if len(weights) != 4 or any(not math.isfinite(w) or w <= 0 for w in weights):
        raise _fail("BBOX_REG_WEIGHTS", f"{weights} must be four positive numbers")
    if fc.ASSIGNMENT_CHUNK_ELEMENTS < 1:
        raise _fail("ASSIGNMENT_CHUNK_ELEMENTS", f"{fc.ASSIGNMENT_CHUNK_ELEMENTS} must be >= 1")
    if fc.BOX_QUALITY not in BOX_QUALITIES:
        raise _fail(
            "BOX_QUALITY",
            f"unknown quality {fc.BOX_QUALITY!r}; choose one of {list(BOX_QUALITIES)}",
        )
    if fc.USE_DCN_IN_TOWER and fc.NUM_CONVS < 1:
        raise _fail("USE_DCN_IN_TOWER", "makes the last tower conv deformable, but NUM_CONVS is 0")


def _check_sizes_follow_strides(
    sizes: Sequence[Sequence[float]], strides: Sequence[int], in_features: Sequence[str]
) -> None:
    """A finer level must take smaller objects: catches a row added at the wrong end (e.g. P2's)."""
    for i in range(len(strides) - 1):
        fine, coarse = (i, i + 1) if strides[i] < strides[i + 1] else (i + 1, i)
        if sizes[fine][0] > sizes[coarse][0] or sizes[fine][1] > sizes[coarse][1]:
            raise _fail(
                "OBJECT_SIZES_OF_INTEREST",
                f"row {fine} {list(sizes[fine])} ({in_features[fine]}, stride {strides[fine]}) "
                f"takes larger objects than row {coarse} {list(sizes[coarse])} "
                f"({in_features[coarse]}, stride {strides[coarse]}); "
                "one row per IN_FEATURES level in the same order, "
                "the smallest objects on the finest level",
            )
