"""Small models and data shared by the inference tests (demo, TTA, export, scripts).

The models have random weights (no test may depend on the main job's trained model), with the output
convolutions of the head re-drawn at a larger scale: the default init puts every class probability near
PRIOR_PROB, below the score threshold, and nearly tied, so nothing would be detected and any ranking
would hinge on rounding. With spread-out logits the detections are many and well separated in score.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from dataset import shapes
from fcos.predictor import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO_ROOT / "configs" / "fcos_shapes.yaml"
# The embedded config at a small test size on the CPU.
TINY_OPTS: Tuple[str, ...] = ("MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160")
VAL_IMAGE_SIZE = (96, 128)


def tiny_cfg(*opts: str) -> CfgNode:
    """The embedded config with ``TINY_OPTS`` and then ``opts`` applied (frozen)."""
    return load_config(str(SHAPES_CONFIG), [*TINY_OPTS, *opts])


def random_fcos(cfg: CfgNode, seed: int = 0) -> torch.nn.Module:
    """An eval-mode FCOS of ``cfg`` with seeded random weights and a head that produces detections."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    head = model.head
    for conv, std in ((head.cls_score, 0.2), (head.centerness, 0.2), (head.bbox_pred, 0.05)):
        torch.nn.init.normal_(conv.weight, std=std)
    torch.nn.init.constant_(head.cls_score.bias, -2.0)
    return model


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """Save as a detectron2 checkpoint (``{"model": state_dict}``), the format train_net writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def shapes_val(root: Path, num_val: int = 3) -> Tuple[List[Path], Path]:
    """A small generated shapes dataset under ``root``: (val image paths, val COCO JSON)."""
    paths = shapes.ensure_shapes_dataset(root, num_train=1, num_val=num_val, image_size=VAL_IMAGE_SIZE)
    images = sorted(paths["val_images"].glob("*.jpg"))
    return images, paths["val_json"]


def boxes_close(a: Sequence, b: Sequence, atol: float) -> bool:
    """Same length and every coordinate within ``atol``."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(((a - b).abs() <= atol).all())
