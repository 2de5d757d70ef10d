"""Run an exported FCOS model (ONNX or TorchScript) without detectron2: pre-processing and decoding.

``tools/export.py`` writes the network (normalisation, backbone, FPN, head) as a graph whose outputs
are the raw per-level head maps, plus a JSON file with everything needed to turn them into boxes. This
module is that "everything": it needs only numpy and Pillow, so a deployment with onnxruntime alone can
use it (copy this one file).

Why decoding is not inside the graph: candidate selection (threshold, per-level top-k) and NMS have
data-dependent output sizes, which is where exporters and runtimes disagree (ONNX ``NonMaxSuppression``
variants, TorchScript tracing freezing ``nonzero`` sizes). A pure convolutional graph with dynamic height
and width runs the same in every runtime; the decoding below is ~100 lines of numpy that mirror the eager
model step by step (``fcos/inference.py`` and detectron2's ``detector_postprocess``), and the export test
checks that they agree to 1e-3 px.

Usage::

    import onnxruntime, numpy as np
    from PIL import Image
    from export_postprocess import load_metadata, preprocess, decode  # this file, copied beside your code

    meta = load_metadata("fcos.onnx.json")
    session = onnxruntime.InferenceSession("fcos.onnx")
    image = np.asarray(Image.open("a.jpg").convert("RGB"))[:, :, ::-1]   # BGR, as meta["input_format"]
    batch, resized_hw = preprocess(image, meta)
    outputs = session.run(None, {meta["input_name"]: batch})
    detections = decode(outputs, meta, resized_hw, image.shape[:2])
    # detections["boxes"] (N, 4) x0 y0 x1 y1 in original pixels, ["scores"] (N,), ["classes"] (N,)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

METADATA_FORMAT = "fcos-d2-export"
METADATA_VERSION = 1


def metadata_path(model_path: str | Path) -> Path:
    """The JSON written beside an exported model: ``fcos.onnx`` -> ``fcos.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def load_metadata(path: str | Path) -> Dict[str, Any]:
    """Read and check the export metadata (the JSON beside the model, or the model path itself)."""
    path = Path(path)
    if path.suffix != ".json":
        path = metadata_path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read export metadata ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise ValueError(
            f"{path}: field 'format' is not {METADATA_FORMAT!r}; not an fcos-d2 export metadata file"
        )
    if meta.get("version") != METADATA_VERSION:
        raise ValueError(
            f"{path}: field 'version' is {meta.get('version')!r}; this code reads version {METADATA_VERSION}"
        )
    return meta


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """Size after "shortest edge to ``short_edge``, longest edge at most ``max_size``" (keeps the aspect).

    The same arithmetic, in the same order, as detectron2's ``ResizeShortestEdge`` so that rounding at
    .5 lands on the same integer.
    """
    size = short_edge * 1.0
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def preprocess(image: np.ndarray, meta: Dict[str, Any]) -> Tuple[np.ndarray, Tuple[int, int]]:
    """HxWx3 uint8 image in ``meta["input_format"]`` channel order -> (1, 3, H', W') float32 batch.

    Resizes as the eager model's test-time pre-processing does (bilinear, shortest edge
    ``min_size_test``), then pads right and bottom to a multiple of ``size_divisibility`` with the pixel
    mean, which the graph's normalisation turns into the zeros the eager model pads with.

    Returns:
        the batch and the resized (height, width) before padding, which ``decode`` needs.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image: expected an HxWx3 uint8 array, got shape {image.shape} dtype {image.dtype}"
        )
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, meta["min_size_test"], meta["max_size_test"])
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    divisor = max(1, int(meta["size_divisibility"]))
    padded_h = -(-new_h // divisor) * divisor
    padded_w = -(-new_w // divisor) * divisor
    batch = np.empty((1, 3, padded_h, padded_w), dtype=np.float32)
    batch[0] = np.asarray(meta["pixel_mean"], dtype=np.float32)[:, None, None]
    batch[0, :, :new_h, :new_w] = image.transpose(2, 0, 1)
    return batch, (new_h, new_w)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def grid_points(height: int, width: int, stride: int, offset: float) -> np.ndarray:
    """(H*W, 2) input-pixel (x, y) of the feature-map cells, row-major (as ``fcos.targets.grid_points``)."""
    start = np.float32(offset * stride)
    xs = np.arange(width, dtype=np.float32) * np.float32(stride) + start
    ys = np.arange(height, dtype=np.float32) * np.float32(stride) + start
    y, x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack((x.reshape(-1), y.reshape(-1)), axis=1)


def _level_candidates(
    logits: np.ndarray,
    box_reg: np.ndarray,
    centerness: np.ndarray,
    points: np.ndarray,
    meta: Dict[str, Any],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level of one image: (K, H, W), (4, H, W), (1, H, W) maps -> boxes, scores, classes."""
    num_classes = logits.shape[0]
    probs = _sigmoid(logits.reshape(num_classes, -1).T)
    point_idx, class_idx = np.nonzero(probs > meta["score_thresh_test"])
    prob = probs[point_idx, class_idx]
    ctr = _sigmoid(centerness.reshape(-1))[point_idx]
    ranking = prob if meta["inference_topk_first"] else prob * ctr
    topk = meta["topk_candidates_test"]
    if meta["inference_topk_first"]:
        topk = min(topk, len(probs))  # the seed caps a level at its number of points
    if len(ranking) > topk:
        keep = np.argpartition(-ranking, topk - 1)[:topk]
        point_idx, class_idx, prob, ctr = point_idx[keep], class_idx[keep], prob[keep], ctr[keep]
    deltas = box_reg.reshape(4, -1).T[point_idx] / np.asarray(
        meta["box_reg_weights"], dtype=np.float32
    )
    centres = points[point_idx]
    boxes = np.concatenate((centres - deltas[:, :2], centres + deltas[:, 2:]), axis=1)
    return boxes, np.sqrt(prob * ctr), class_idx


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, plus_one: bool = False
) -> np.ndarray:
    """Greedy NMS; indices of the kept boxes by decreasing score (suppresses IoU > threshold).

    ``plus_one``: maskrcnn-benchmark's inclusive pixel counting, sides x1 - x0 + 1 (official
    flavour); otherwise torchvision's.
    """
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    one = np.float32(1 if plus_one else 0)
    areas = (x1 - x0 + one) * (y1 - y0 + one)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep: List[int] = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[position + 1 :]
        inter_w = np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + one
        inter_h = np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + one
        inter_w, inter_h = np.maximum(np.float32(0), inter_w), np.maximum(np.float32(0), inter_h)
        inter = inter_w * inter_h
        # Two empty boxes give 0 / 0 = NaN, which suppresses nothing, as in torchvision's kernel.
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > iou_threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
    plus_one: bool = False,
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other; kept indices by score."""
    keep = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        keep.append(members[nms(boxes[members], scores[members], iou_threshold, plus_one)])
    kept = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    return kept[np.argsort(-scores[kept], kind="stable")]


def decode(
    outputs: Sequence[np.ndarray],
    meta: Dict[str, Any],
    resized_hw: Tuple[int, int],
    original_hw: Tuple[int, int],
) -> Dict[str, np.ndarray]:
    """Raw graph outputs of one image -> detections in the original image's pixels.

    Args:
        outputs: the graph's outputs in ``meta["output_names"]`` order (per level: class logits
            (1, K, H, W), box distances (1, 4, H, W), centerness logits (1, 1, H, W)); numpy arrays or
            anything ``np.asarray`` accepts (e.g. CPU torch tensors from the TorchScript model).
        resized_hw: the second value returned by ``preprocess``.
        original_hw: (height, width) of the image given to ``preprocess``.
    Returns:
        ``boxes`` (N, 4) float32 x0, y0, x1, y1; ``scores`` (N,) float32; ``classes`` (N,) int64
        (0-based, ``meta["class_names"]`` order); sorted by decreasing score.
    """
    outputs = [np.asarray(o, dtype=np.float32) for o in outputs]
    num_levels = len(meta["strides"])
    if len(outputs) != 3 * num_levels:
        raise ValueError(
            f"outputs: expected {3 * num_levels} arrays (3 per level), got {len(outputs)}"
        )
    if outputs[0].shape[0] != 1:
        raise ValueError(
            f"outputs: decode takes one image at a time, got a batch of {outputs[0].shape[0]}"
        )
    boxes_all, scores_all, classes_all = [], [], []
    for level, stride in enumerate(meta["strides"]):
        logits, box_reg, centerness = (o[0] for o in outputs[3 * level : 3 * level + 3])
        points = grid_points(logits.shape[1], logits.shape[2], stride, meta["grid_offset"])
        boxes, scores, classes = _level_candidates(logits, box_reg, centerness, points, meta)
        boxes_all.append(boxes)
        scores_all.append(scores)
        classes_all.append(classes)
    boxes = np.concatenate(boxes_all).astype(np.float32)
    scores = np.concatenate(scores_all).astype(np.float32)
    classes = np.concatenate(classes_all).astype(np.int64)
    official = meta.get("postprocess", "seed") == "official"
    max_detections = meta["detections_per_image"]
    if official:
        # Clip to the network input's last pixel index; drop "+1" sizes < 0 (remove_small_boxes(0)).
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, resized_hw[1] - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, resized_hw[0] - 1)
        big_enough = (boxes[:, 2] - boxes[:, 0] + 1 >= 0) & (boxes[:, 3] - boxes[:, 1] + 1 >= 0)
        boxes, scores, classes = boxes[big_enough], scores[big_enough], classes[big_enough]
    keep = batched_nms(boxes, scores, classes, meta["nms_thresh_test"], plus_one=official)
    if not official:
        keep = keep[:max_detections]
    elif 0 < max_detections < len(keep):
        # The official cut keeps every score reaching the max_detections-th largest (ties included).
        keep = keep[scores[keep] >= np.sort(scores[keep])[-max_detections]]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    height, width = original_hw
    boxes[:, 0::2] *= width / resized_hw[1]
    boxes[:, 1::2] *= height / resized_hw[0]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[nonempty], "scores": scores[nonempty], "classes": classes[nonempty]}
