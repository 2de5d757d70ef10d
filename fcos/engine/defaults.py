"""Config and model set-up shared by the applications (training, the demo, export).

What detectron2's ``engine.defaults`` does for its tools, for FCOS: the config of a run is the
project's full schema merged with a file and ``KEY VALUE`` overrides; ``MODEL.FCOS.NUM_CLASSES``
follows the data unless the user set it; a CUDA ``MODEL.DEVICE`` on a machine without CUDA falls
back to the CPU; and an inference model loads every tensor of ``MODEL.WEIGHTS`` through
``FCOSCheckpointer``, with one clear error when the file is missing or does not hold a complete
model (the checkpoint errors are mapped to one line by ``fcos.engine.cli``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from torch import nn

from fcos.checkpoint import FCOSCheckpointer, LoadReport, check_weights_file
from fcos.config import FCOSConfigError
from fcos.data import shapes
from fcos.data.common import coco_category_names
from fcos.precision import resolve_precision

from .config import SetupError, get_fcos_cfg, merge_config
from .datasets import num_classes_set_explicitly

logger = logging.getLogger(__name__)

WEIGHTS_HELP = "pretrained_weights/README.md"


def resolve_device(cfg: CfgNode) -> None:
    """A CUDA ``MODEL.DEVICE`` on a machine without CUDA becomes the CPU, with a warning (cfg unfrozen)."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU"
        )
        cfg.MODEL.DEVICE = "cpu"


def check_precision_config(cfg: CfgNode) -> None:
    """``SOLVER.AMP``/``TEST.AMP`` must name a precision ``MODEL.DEVICE`` runs (else SetupError)."""
    device_type = torch.device(cfg.MODEL.DEVICE).type
    for key, node in (("SOLVER.AMP", cfg.SOLVER.AMP), ("TEST.AMP", cfg.TEST.AMP)):
        try:
            resolve_precision(key, node.ENABLED, node.PRECISION, device_type)
        except FCOSConfigError as err:
            raise SetupError(str(err)) from None


def load_config(config_file: str, opts: Sequence[str], ann_file: Optional[str] = None) -> CfgNode:
    """The project's full config schema, merged with ``config_file`` and ``KEY VALUE`` overrides, frozen.

    As in ``train_net.py``: ``MODEL.FCOS.NUM_CLASSES`` follows the classes of the config's datasets (or
    of ``ann_file``) unless the config file or ``opts`` set it, so the config a model was trained with
    also builds it for inference; and a CUDA ``MODEL.DEVICE`` without CUDA falls back to the CPU.
    """
    cfg = get_fcos_cfg()
    merge_config(cfg, config_file, opts)
    names, source = _find_class_names(cfg, ann_file)
    if names is not None and not num_classes_set_explicitly(cfg, opts):
        if cfg.MODEL.FCOS.NUM_CLASSES != len(names):
            logger.info(f"MODEL.FCOS.NUM_CLASSES = {len(names)}, from the categories of {source}")
        cfg.MODEL.FCOS.NUM_CLASSES = len(names)
    resolve_device(cfg)
    check_precision_config(cfg)
    cfg.freeze()
    return cfg


def _find_class_names(cfg: CfgNode, ann_file: Optional[str]) -> Tuple[Optional[List[str]], str]:
    """Class names and where they came from: ``ann_file`` (custom datasets, which are registered only
    while training), the embedded shapes dataset (known without generating it), or the metadata of the
    config's datasets (detectron2 registers COCO's names at import)."""
    if ann_file:
        return coco_category_names(ann_file), ann_file
    shapes_names = {f"shapes_{split}" for split in shapes.SPLITS}
    for dataset in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        names = None
        if dataset in shapes_names:
            names = shapes.CLASS_NAMES
        elif dataset in MetadataCatalog.list():
            names = MetadataCatalog.get(dataset).get("thing_classes")
        if names is not None:
            return list(names), f"dataset {dataset!r}"
    return None, ""


def class_names(cfg: CfgNode, ann_file: Optional[str] = None) -> Optional[List[str]]:
    """The model's class names (see ``_find_class_names``), or None when nothing says them.

    A count that disagrees with ``MODEL.FCOS.NUM_CLASSES`` is an error: boxes would get wrong names.
    """
    names, source = _find_class_names(cfg, ann_file)
    num_classes = cfg.MODEL.FCOS.NUM_CLASSES
    if names is not None and len(names) != num_classes:
        raise SetupError(
            f"{source} has {len(names)} classes but MODEL.FCOS.NUM_CLASSES is {num_classes}; "
            "give the annotation file the model was trained on (--ann_file)"
        )
    return names


class _InferenceCheckpointer(FCOSCheckpointer):
    """Loading for inference: every model tensor must come from the checkpoint.

    Training may start from a partial checkpoint (a class head of another class count is skipped for
    fine-tuning, an ImageNet file has no head); a model used for predictions may not, or it would
    predict from random weights without saying so.
    """

    def _load_model(self, checkpoint: Dict[str, Any]) -> LoadReport:
        report = super()._load_model(checkpoint)
        if report.skipped or report.missing:
            reasons = [f"{key}: {why}" for key, why in report.skipped.items()]
            missing = report.missing[:5] + (["..."] if len(report.missing) > 5 else [])
            if report.missing:
                reasons.append(f"missing from the checkpoint: {', '.join(missing)}")
            raise SetupError(
                "MODEL.WEIGHTS does not hold a complete model for this config ("
                + "; ".join(reasons)
                + "). "
                "Use the config the model was trained with (OUTPUT_DIR/config.yaml), or set "
                "MODEL.FCOS.NUM_CLASSES to the checkpoint's class count"
            )
        return report


def check_weights(cfg: CfgNode) -> None:
    """``MODEL.WEIGHTS`` must name an existing file: inference with random weights is never what is meant."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise SetupError(
            "MODEL.WEIGHTS is empty: give the trained model, e.g. --opts MODEL.WEIGHTS output/<run>/model_final.pth "
            f"(pretrained files: see {WEIGHTS_HELP})"
        )
    try:
        check_weights_file(weights, "A model you trained yourself is OUTPUT_DIR/model_final.pth.")
    except FileNotFoundError as err:
        raise SetupError(str(err)) from None


def build_inference_model(cfg: CfgNode) -> nn.Module:
    """The config's model with all of ``MODEL.WEIGHTS`` loaded, in eval mode (no TTA wrapper)."""
    check_weights(cfg)
    model = build_model(cfg)
    checkpointer = _InferenceCheckpointer(
        model, allow_unsafe_pickle=cfg.CHECKPOINT.ALLOW_UNSAFE_PICKLE
    )
    checkpointer.load(cfg.MODEL.WEIGHTS)
    return model.eval()
