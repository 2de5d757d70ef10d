"""Build a trained FCOS for inference and run it on single images (used by the demo and the exporter).

Like detectron2's ``DefaultPredictor``, but: the weights go through ``FCOSCheckpointer`` (the project's
checkpoint loader), a missing weights file is one clear error instead of an assertion deep inside fvcore,
a CUDA ``MODEL.DEVICE`` on a machine without CUDA falls back to the CPU (as in ``train_net.py``), and
``TEST.AUG.ENABLED`` switches on FCOS test-time augmentation.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn

from dataset import shapes
from dataset.common import DatasetError, coco_category_names

from .checkpoint import CheckpointMismatchError, FCOSCheckpointer, LoadReport, missing_weights_message
from .checkpoint_layouts import UnknownLayoutError
from .safe_pickle import UnsafeCheckpointError
from .tta import FCOSWithTTA

logger = logging.getLogger(__name__)

WEIGHTS_HELP = "pretrained_weights/README.md"


class InferenceSetupError(ValueError):
    """The config cannot give a usable inference model; the message names the key and the fix."""


def load_config(config_file: str, opts: Sequence[str], ann_file: Optional[str] = None) -> CfgNode:
    """The project's full config schema, merged with ``config_file`` and ``KEY VALUE`` overrides, frozen.

    As in ``train_net.py``: ``MODEL.FCOS.NUM_CLASSES`` follows the classes of the config's datasets (or
    of ``ann_file``) unless the config file or ``opts`` set it, so the config a model was trained with
    also builds it for inference; and a CUDA ``MODEL.DEVICE`` without CUDA falls back to the CPU.
    ``training`` is imported here, not at module level, because it imports this package.
    """
    from training.config import get_fcos_cfg
    from training.datasets import num_classes_set_explicitly

    if not os.path.isfile(config_file):
        raise InferenceSetupError(f"--config-file: {config_file} does not exist")
    if len(opts) % 2:
        raise InferenceSetupError(f"--opts: needs KEY VALUE pairs, got an odd number of items {list(opts)}")
    cfg = get_fcos_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    names, source = _find_class_names(cfg, ann_file)
    if names is not None and not num_classes_set_explicitly(cfg, opts):
        if cfg.MODEL.FCOS.NUM_CLASSES != len(names):
            logger.info(f"MODEL.FCOS.NUM_CLASSES = {len(names)}, from the categories of {source}")
        cfg.MODEL.FCOS.NUM_CLASSES = len(names)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _coco_category_names(ann_file: str) -> List[str]:
    """Category names in id order, or an InferenceSetupError naming the file."""
    try:
        return coco_category_names(ann_file)
    except DatasetError as err:
        raise InferenceSetupError(str(err)) from err


def _find_class_names(cfg: CfgNode, ann_file: Optional[str]) -> Tuple[Optional[List[str]], str]:
    """Class names and where they came from: ``ann_file`` (custom datasets, which are registered only
    while training), the embedded shapes dataset (known without generating it), or the metadata of the
    config's datasets (detectron2 registers COCO's names at import)."""
    if ann_file:
        return _coco_category_names(ann_file), ann_file
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
        raise InferenceSetupError(
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
            raise InferenceSetupError(
                "MODEL.WEIGHTS does not hold a complete model for this config (" + "; ".join(reasons) + "). "
                "Use the config the model was trained with (OUTPUT_DIR/config.yaml), or set "
                "MODEL.FCOS.NUM_CLASSES to the checkpoint's class count"
            )
        return report


def check_weights(cfg: CfgNode) -> None:
    """``MODEL.WEIGHTS`` must name an existing file: inference with random weights is never what is meant."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise InferenceSetupError(
            "MODEL.WEIGHTS is empty: give the trained model, e.g. --opts MODEL.WEIGHTS output/<run>/model_final.pth "
            f"(pretrained files: see {WEIGHTS_HELP})"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise InferenceSetupError(
            f"{missing_weights_message(weights)} A model you trained yourself is OUTPUT_DIR/model_final.pth."
        )


def build_inference_model(cfg: CfgNode) -> nn.Module:
    """The config's model with all of ``MODEL.WEIGHTS`` loaded, in eval mode (no TTA wrapper)."""
    check_weights(cfg)
    model = build_model(cfg)
    checkpointer = _InferenceCheckpointer(model, allow_unsafe_pickle=cfg.MODEL.FCOS.ALLOW_UNSAFE_PICKLE)
    try:
        checkpointer.load(cfg.MODEL.WEIGHTS)
    except (CheckpointMismatchError, UnknownLayoutError, UnsafeCheckpointError) as err:
        raise InferenceSetupError(str(err)) from None
    return model.eval()


class FCOSPredictor:
    """One image (HxWxC uint8 in ``INPUT.FORMAT`` channel order) in, ``Instances`` in its pixels out.

    Resizes as the test loader does (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``), or, with
    ``TEST.AUG.ENABLED``, lets ``FCOSWithTTA`` run its scales and flips on the original image.
    """

    def __init__(self, cfg: CfgNode) -> None:
        self.cfg = cfg.clone()
        self.model = build_inference_model(self.cfg)
        self.tta = FCOSWithTTA(self.cfg, self.model) if self.cfg.TEST.AUG.ENABLED else None
        self.resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT

    def model_input(self, image: np.ndarray) -> Dict[str, Any]:
        """The detectron2 input dict for ``image``: resized CHW tensor plus the original size.

        The tensor stays uint8, as the test loader gives it: TTA's resizing then takes the same
        (Pillow) path as the loader's, and the model converts to float when it normalises.
        """
        height, width = image.shape[:2]
        resized = image if self.tta is not None else self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Instances:
        inputs = [self.model_input(image)]
        outputs = self.tta(inputs) if self.tta is not None else self.model(inputs)
        return outputs[0]["instances"]
