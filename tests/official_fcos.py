"""Official FCOS (tianzhi0549/FCOS, maskrcnn-benchmark) for tests: its checkpoint layout and its math.

Written from the official module structure, independently of ``fcos/``: key names and shapes of an
R-50-FPN "FCOS_imprv" checkpoint, and a functional forward pass + decoding with the official
conventions (FrozenBN without eps, stride in the 1x1 conv, P6 from P5, grid points at s*j + s//2,
threshold then top-k by prob * centerness, sqrt(prob * centerness) scores) and its post-processing
(``FCOSPostProcessor``: clip to the image with the last pixel index, ``remove_small_boxes(0)``, the
class-aware "+1" NMS of ``boxlist_ml_nms``, the ``kthvalue`` cut to ``DETECTIONS_PER_IMG``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms as torchvision_batched_nms

R50_BLOCKS = (3, 4, 6, 3)
STRIDES = (8, 16, 32, 64, 128)


def _bn(sd: Dict[str, Tensor], prefix: str, channels: int, g: torch.Generator) -> None:
    # Variances down to 2e-5: there detectron2's eps (1e-5) would shrink the scale by up to ~20%, so a
    # converter that forgets that the official FrozenBN has no eps gives visibly different outputs.
    # The weight follows sqrt(var) so that weight / sqrt(var) stays O(1) and activations stay finite.
    var = torch.exp(torch.empty(channels).uniform_(-10.8, 0.7, generator=g))
    sd[f"{prefix}.weight"] = var.sqrt() * (0.5 + torch.rand(channels, generator=g))
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=g)
    sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=g) * var.sqrt()
    sd[f"{prefix}.running_var"] = var


def _conv(
    sd: Dict[str, Tensor],
    prefix: str,
    out_c: int,
    in_c: int,
    k: int,
    g: torch.Generator,
    bias: bool,
) -> None:
    sd[f"{prefix}.weight"] = (
        torch.randn(out_c, in_c, k, k, generator=g) * (1.0 / (in_c * k * k)) ** 0.5
    )
    if bias:
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(out_c, generator=g)


def official_r50_fpn_state_dict(
    num_classes: int = 80, num_convs: int = 4, seed: int = 0
) -> "OrderedDict[str, Tensor]":
    """A ``{"model": ...}`` payload as the official repo saves it: every key prefixed ``module.``.

    ``num_classes`` excludes background (the official head has NUM_CLASSES - 1 = 80 outputs for COCO).
    """
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, Tensor] = OrderedDict()
    body = "backbone.body"
    _conv(sd, f"{body}.stem.conv1", 64, 3, 7, g, bias=False)
    _bn(sd, f"{body}.stem.bn1", 64, g)
    in_c = 64
    for layer, blocks in enumerate(R50_BLOCKS, start=1):
        mid = 64 * 2 ** (layer - 1)
        out = mid * 4
        for i in range(blocks):
            p = f"{body}.layer{layer}.{i}"
            _conv(sd, f"{p}.conv1", mid, in_c, 1, g, bias=False)
            _bn(sd, f"{p}.bn1", mid, g)
            _conv(sd, f"{p}.conv2", mid, mid, 3, g, bias=False)
            _bn(sd, f"{p}.bn2", mid, g)
            _conv(sd, f"{p}.conv3", out, mid, 1, g, bias=False)
            _bn(sd, f"{p}.bn3", out, g)
            if i == 0:
                _conv(sd, f"{p}.downsample.0", out, in_c, 1, g, bias=False)
                _bn(sd, f"{p}.downsample.1", out, g)
            in_c = out
    for level, c in ((2, 512), (3, 1024), (4, 2048)):
        _conv(sd, f"backbone.fpn.fpn_inner{level}", 256, c, 1, g, bias=True)
        _conv(sd, f"backbone.fpn.fpn_layer{level}", 256, 256, 3, g, bias=True)
    _conv(sd, "backbone.fpn.top_blocks.p6", 256, 256, 3, g, bias=True)
    _conv(sd, "backbone.fpn.top_blocks.p7", 256, 256, 3, g, bias=True)
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(num_convs):
            _conv(sd, f"rpn.head.{tower}.{3 * i}", 256, 256, 3, g, bias=True)
            sd[f"rpn.head.{tower}.{3 * i + 1}.weight"] = 0.5 + torch.rand(256, generator=g)
            sd[f"rpn.head.{tower}.{3 * i + 1}.bias"] = 0.1 * torch.randn(256, generator=g)
    _conv(sd, "rpn.head.cls_logits", num_classes, 256, 3, g, bias=True)
    # Class biases around logit(0.05) so that a good share of points passes the 0.05 test threshold.
    sd["rpn.head.cls_logits.bias"] = -3.0 + 0.5 * torch.randn(num_classes, generator=g)
    _conv(sd, "rpn.head.bbox_pred", 4, 256, 3, g, bias=True)
    # Distances of 1-4 strides: boxes of neighbouring points overlap, so NMS has work to do.
    sd["rpn.head.bbox_pred.bias"] = 2.0 + 0.5 * torch.randn(4, generator=g)
    _conv(sd, "rpn.head.centerness", 1, 256, 3, g, bias=True)
    for level in range(5):
        sd[f"rpn.head.scales.{level}.scale"] = 0.5 + torch.rand(1, generator=g)
    return OrderedDict((f"module.{k}", v) for k, v in sd.items())


def _frozen_bn(x: Tensor, sd: Dict[str, Tensor], p: str, eps: float) -> Tensor:
    scale = sd[f"{p}.weight"] / torch.sqrt(sd[f"{p}.running_var"] + eps)
    bias = sd[f"{p}.bias"] - sd[f"{p}.running_mean"] * scale
    return x * scale[None, :, None, None] + bias[None, :, None, None]


def _bottleneck(x: Tensor, sd: Dict[str, Tensor], p: str, stride: int, eps: float) -> Tensor:
    out = F.relu(
        _frozen_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride), sd, f"{p}.bn1", eps)
    )
    out = F.relu(_frozen_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2", eps))
    out = _frozen_bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3", eps)
    identity = x
    if f"{p}.downsample.0.weight" in sd:
        identity = _frozen_bn(
            F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1", eps
        )
    return F.relu(out + identity)


def _conv_b(x: Tensor, sd: Dict[str, Tensor], p: str, stride: int = 1, padding: int = 0) -> Tensor:
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding)


def official_features(sd: Dict[str, Tensor], x: Tensor, bn_eps: float = 0.0) -> List[Tensor]:
    """P3..P7 of the official R-50-FPN-RETINANET body with USE_C5 False (P6 from P5)."""
    b = "backbone.body"
    x = F.relu(
        _frozen_bn(
            F.conv2d(x, sd[f"{b}.stem.conv1.weight"], stride=2, padding=3),
            sd,
            f"{b}.stem.bn1",
            bn_eps,
        )
    )
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    stages = []
    for layer, blocks in enumerate(R50_BLOCKS, start=1):
        for i in range(blocks):
            x = _bottleneck(
                x, sd, f"{b}.layer{layer}.{i}", 2 if (i == 0 and layer > 1) else 1, bn_eps
            )
        stages.append(x)
    c3, c4, c5 = stages[1:]
    inner = _conv_b(c5, sd, "backbone.fpn.fpn_inner4")
    results = [_conv_b(inner, sd, "backbone.fpn.fpn_layer4", padding=1)]
    for c, level in ((c4, 3), (c3, 2)):
        inner = _conv_b(c, sd, f"backbone.fpn.fpn_inner{level}") + F.interpolate(
            inner, scale_factor=2, mode="nearest"
        )
        results.insert(0, _conv_b(inner, sd, f"backbone.fpn.fpn_layer{level}", padding=1))
    p6 = _conv_b(results[-1], sd, "backbone.fpn.top_blocks.p6", stride=2, padding=1)
    p7 = _conv_b(F.relu(p6), sd, "backbone.fpn.top_blocks.p7", stride=2, padding=1)
    return results + [p6, p7]


def _tower(x: Tensor, sd: Dict[str, Tensor], name: str, num_convs: int) -> Tensor:
    for i in range(num_convs):
        x = _conv_b(x, sd, f"rpn.head.{name}.{3 * i}", padding=1)
        x = F.group_norm(
            x,
            32,
            sd[f"rpn.head.{name}.{3 * i + 1}.weight"],
            sd[f"rpn.head.{name}.{3 * i + 1}.bias"],
        )
        x = F.relu(x)
    return x


def _ml_nms(boxes: Tensor, scores: Tensor, labels: Tensor, thresh: float) -> Tensor:
    """``boxlist_ml_nms``: per label, visit boxes by decreasing score; a kept box removes every
    later box of its label with "+1" IoU > thresh. Kept indices in ascending index order, as the
    kernel returns them."""
    removed = torch.zeros(len(boxes), dtype=torch.bool)
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1)
        members = members[scores[members].sort(descending=True).indices]
        for position, i in enumerate(members.tolist()):
            if removed[i]:
                continue
            rest = members[position + 1 :]
            a, b = boxes[i], boxes[rest]
            width = torch.clamp(torch.min(a[2], b[:, 2]) - torch.max(a[0], b[:, 0]) + 1, min=0)
            height = torch.clamp(torch.min(a[3], b[:, 3]) - torch.max(a[1], b[:, 1]) + 1, min=0)
            inter = width * height
            area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
            area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
            removed[rest[inter / (area_a + area_b - inter) > thresh]] = True
    return torch.nonzero(~removed).squeeze(1)


def _post_nms_cut(scores: Tensor, max_detections: int) -> Tensor:
    """``select_over_all_levels``: keep scores >= the max_detections-th largest (ties kept)."""
    if len(scores) > max_detections > 0:
        image_thresh, _ = torch.kthvalue(scores.cpu(), len(scores) - max_detections + 1)
        return torch.nonzero(scores >= image_thresh.item()).squeeze(1)
    return torch.arange(len(scores))


def official_detections(
    sd: Dict[str, Tensor],
    image: Tensor,
    *,
    pixel_mean: Tuple[float, float, float],
    num_convs: int = 4,
    score_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
    bn_eps: float = 0.0,
    grid_offset_half: bool = True,
    rank_by_centerness: bool = True,
    clip_before_nms: bool = True,
    plus_one_nms: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(boxes, scores, classes 0-based) of the official FCOS_imprv test path for one CHW BGR image.

    Preprocessing as maskrcnn-benchmark (subtract the pixel mean, std 1, zero-pad to a multiple of 32);
    decoding and post-processing as FCOSPostProcessor with centerness on the regression branch and
    NORM_REG_TARGETS. Boxes are in network-input pixels, in the order the official code returns
    them. ``bn_eps``, ``grid_offset_half``, ``rank_by_centerness``, ``clip_before_nms`` and
    ``plus_one_nms`` exist so that a test can show that the comparison is sensitive to each official
    convention
    (without clipping, boxes are clipped to [0, W] x [0, H] after NMS instead, as detectron2 does).
    """
    sd = {k[len("module.") :]: v for k, v in sd.items()}
    _, h, w = image.shape
    x = image - torch.tensor(pixel_mean)[:, None, None]
    x = F.pad(x, (0, (32 - w % 32) % 32, 0, (32 - h % 32) % 32))[None]
    boxes_all, scores_all, classes_all = [], [], []
    for level, feature in enumerate(official_features(sd, x, bn_eps)):
        stride = STRIDES[level]
        cls_t = _tower(feature, sd, "cls_tower", num_convs)
        box_t = _tower(feature, sd, "bbox_tower", num_convs)
        probs = _conv_b(cls_t, sd, "rpn.head.cls_logits", padding=1)[0].sigmoid()
        reg = (
            _conv_b(box_t, sd, "rpn.head.bbox_pred", padding=1)[0]
            * sd[f"rpn.head.scales.{level}.scale"]
        )
        reg = F.relu(reg) * stride
        ctr = _conv_b(box_t, sd, "rpn.head.centerness", padding=1)[0, 0].sigmoid()
        num_classes, fh, fw = probs.shape
        probs = probs.permute(1, 2, 0).reshape(-1, num_classes)
        reg = reg.permute(1, 2, 0).reshape(-1, 4)
        ctr = ctr.reshape(-1)
        offset = stride // 2 if grid_offset_half else 0
        ys, xs = torch.meshgrid(torch.arange(fh) * stride, torch.arange(fw) * stride, indexing="ij")
        locations = torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1).float() + offset

        candidates = probs > score_thresh
        point, cls = candidates.nonzero(as_tuple=True)
        score = probs[point, cls] * ctr[point]
        if len(score) > pre_nms_top_n:
            ranking = score if rank_by_centerness else probs[point, cls]
            keep = ranking.topk(pre_nms_top_n).indices
            score, point, cls = score[keep], point[keep], cls[keep]
        loc, d = locations[point], reg[point]
        level_boxes = torch.stack(
            (loc[:, 0] - d[:, 0], loc[:, 1] - d[:, 1], loc[:, 0] + d[:, 2], loc[:, 1] + d[:, 3]), 1
        )
        level_scores = torch.sqrt(score)
        if clip_before_nms:
            level_boxes[:, 0].clamp_(min=0, max=w - 1)
            level_boxes[:, 1].clamp_(min=0, max=h - 1)
            level_boxes[:, 2].clamp_(min=0, max=w - 1)
            level_boxes[:, 3].clamp_(min=0, max=h - 1)
            widths = level_boxes[:, 2] - level_boxes[:, 0] + 1
            heights = level_boxes[:, 3] - level_boxes[:, 1] + 1
            big_enough = torch.nonzero((widths >= 0) & (heights >= 0)).squeeze(1)
            level_boxes, level_scores = level_boxes[big_enough], level_scores[big_enough]
            cls = cls[big_enough]
        boxes_all.append(level_boxes)
        scores_all.append(level_scores)
        classes_all.append(cls)
    boxes, scores, classes = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(classes_all)
    if plus_one_nms:
        keep = _ml_nms(boxes, scores, classes, nms_thresh)
    else:
        keep = torchvision_batched_nms(boxes, scores, classes, nms_thresh)
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    keep = _post_nms_cut(scores, max_detections)
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    if not clip_before_nms:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes, scores, classes
