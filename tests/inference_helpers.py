"""Small models and data shared by the inference tests (demo, TTA, export, scripts).

The models have random weights (no test may depend on the main job's trained model), with the output
convolutions of the head re-drawn: the default init puts every class probability near PRIOR_PROB, below
the score threshold and nearly tied, so nothing would be detected and any ranking would hinge on
rounding. Re-drawn, a few dozen detections per image come out, well separated in score.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from fcos.data import shapes
from fcos.engine.defaults import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO_ROOT / "configs" / "fcos_shapes.yaml"
# The embedded config at a small test size on the CPU.
TINY_OPTS: Tuple[str, ...] = (
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "160",
)
VAL_IMAGE_SIZE = (96, 128)


def tiny_cfg(*opts: str) -> CfgNode:
    """The embedded config with ``TINY_OPTS`` and then ``opts`` applied (frozen)."""
    return load_config(str(SHAPES_CONFIG), [*TINY_OPTS, *opts])


def random_fcos(cfg: CfgNode, seed: int = 0) -> torch.nn.Module:
    """An eval-mode FCOS of ``cfg`` with seeded random weights and a head that produces detections."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    head = model.head
    for conv, std in ((head.cls_score, 0.03), (head.centerness, 0.2), (head.bbox_pred, 0.01)):
        torch.nn.init.normal_(conv.weight, std=std)
    # Measured on the generated 96x128 images: 14-26 detections each, adjacent scores >= 1e-4 apart.
    torch.nn.init.constant_(head.cls_score.bias, -4.0)
    # Box distances of about one stride (relu(1 + noise) * stride), never all zero: degenerate boxes
    # would make IoU 0 / 0 and NMS meaningless.
    torch.nn.init.constant_(head.bbox_pred.bias, 1.0)
    return model


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """Save as a detectron2 checkpoint (``{"model": state_dict}``), the format train_net writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def shapes_val(root: Path, num_val: int = 3) -> Tuple[List[Path], Path]:
    """A small generated shapes dataset under ``root``: (val image paths, val COCO JSON)."""
    paths = shapes.ensure_shapes_dataset(
        root, num_train=1, num_val=num_val, image_size=VAL_IMAGE_SIZE
    )
    images = sorted(paths["val_images"].glob("*.jpg"))
    return images, paths["val_json"]


def same_detections(
    boxes_a, scores_a, classes_a, boxes_b, scores_b, classes_b, box_atol: float, score_atol: float
) -> bool:
    """One-to-one match: every detection of ``a`` has its own detection in ``b`` with the same class,
    every coordinate within ``box_atol`` and the score within ``score_atol``.

    Order is not compared: two detections whose scores differ by less than the runtimes' rounding
    (seen: 5e-7) may come out in either order.
    """
    boxes_a, boxes_b = np.asarray(boxes_a, dtype=np.float64), np.asarray(boxes_b, dtype=np.float64)
    scores_a, scores_b = np.asarray(scores_a, dtype=np.float64), np.asarray(
        scores_b, dtype=np.float64
    )
    classes_a, classes_b = np.asarray(classes_a), np.asarray(classes_b)
    if len(boxes_a) != len(boxes_b):
        return False
    unmatched = set(range(len(boxes_b)))
    for box, score, cls in zip(boxes_a, scores_a, classes_a):
        match = next(
            (
                j
                for j in sorted(unmatched)
                if classes_b[j] == cls
                and np.abs(boxes_b[j] - box).max() <= box_atol
                and abs(scores_b[j] - score) <= score_atol
            ),
            None,
        )
        if match is None:
            return False
        unmatched.remove(match)
    return True


def boxes_close(a: Sequence, b: Sequence, atol: float) -> bool:
    """Same length and every coordinate within ``atol``."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(((a - b).abs() <= atol).all())
