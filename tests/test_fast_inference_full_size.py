"""The CPU fast path (channels-last + folded frozen BN) at full size, with realistic weights.

R-50-FPN of configs/fcos_R_50_FPN.yaml on one 800x1333 input. Weights: every convolution random
with fan-in scaling; each FrozenBN is given the per-channel mean and variance of its own input on
this image (what a trained network's running statistics are) and a non-trivial affine map; the
class bias is set so that 1 % of (point, class) pairs pass the 0.05 score threshold, the regression
bias so that boxes span about three strides. The detections with the fast path on and off are
matched one to one and their largest differences checked against the bound docs/MODEL.md states.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from model_utils import REPO
from torch import nn

from fcos import add_fcos_config

HEIGHT, WIDTH = 800, 1333
# The bound claimed in docs/MODEL.md, README and fcos/fast_inference.py: about twice the worst
# difference measured (0.0117 px, 5.4e-5) over three weight / image seeds of this construction and
# repeated runs on a 2-core Xeon (the exact figures vary with the CPU's kernels and thread count).
BOX_BOUND_PX = 0.025
SCORE_BOUND = 1e-4


def _cfg(fast: bool, detections: int):
    cfg = get_cfg()
    add_fcos_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "fcos_R_50_FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.FCOS.FAST_CPU_INFERENCE = fast
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    return cfg


def _realistic_weights(model: nn.Module, image: torch.Tensor, seed: int) -> Dict[str, torch.Tensor]:
    """A state dict with calibrated FrozenBN statistics and a head that produces detections."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            weight = torch.randn(module.weight.shape, generator=generator)
            module.weight.data = weight * math.sqrt(2.0 / fan_in)
            if module.bias is not None:
                module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.numel()
            module.weight.copy_(0.2 + 0.8 * torch.rand(channels, generator=generator))
            module.bias.copy_(0.3 * torch.randn(channels, generator=generator))

    def calibrate(norm: FrozenBatchNorm2d, inputs: Tuple[torch.Tensor]) -> None:
        x = inputs[0]
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)))

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    head = model.head
    with torch.no_grad():
        torch.nn.init.normal_(head.bbox_pred.weight, std=0.01, generator=generator)
        torch.nn.init.constant_(head.bbox_pred.bias, 1.5)
        torch.nn.init.normal_(head.centerness.weight, std=0.02, generator=generator)
        torch.nn.init.normal_(head.cls_score.weight, std=0.03, generator=generator)
        torch.nn.init.zeros_(head.cls_score.bias)
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor.contiguous())
        logits = model.head([features[f] for f in model.head_in_features])[0]
        flat = torch.cat([x.flatten() for x in logits])
        top = flat.kthvalue(int(len(flat) * 0.99)).values
        head.cls_score.bias.fill_(math.log(0.05 / 0.95) - float(top))
    for hook in hooks:
        hook.remove()
    return model.state_dict()


def _detect(fast: bool, state: Dict[str, torch.Tensor], image: torch.Tensor, detections: int):
    model = build_model(_cfg(fast, detections)).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"]


def _matched_differences(a, b, above: float) -> Tuple[float, float, int]:
    """Largest box and score difference over a one-to-one matching (same class, nearest box) of
    ``a``'s detections scoring above ``above``, and how many were matched.

    Near the top-k cut, scores within the score bound of the last kept one can swap in or out of
    the list on another CPU's rounding, so only detections clearly inside the cut must have a twin.
    """
    free = list(range(len(b)))
    box_diff, score_diff, matched = 0.0, 0.0, 0
    for i in range(len(a)):
        if float(a.scores[i]) <= above:
            continue
        same_class = [j for j in free if b.pred_classes[j] == a.pred_classes[i]]
        box = a.pred_boxes.tensor[i]
        diffs = [float((box - b.pred_boxes.tensor[j]).abs().max()) for j in same_class]
        j = same_class[min(range(len(diffs)), key=diffs.__getitem__)]
        free.remove(j)
        box_diff = max(box_diff, min(diffs))
        score_diff = max(score_diff, float((a.scores[i] - b.scores[j]).abs()))
        matched += 1
    return box_diff, score_diff, matched


@pytest.mark.slow
def test_fast_path_stays_within_the_stated_bound_at_full_size() -> None:
    """At 1000 detections per image; the first 100 are what DETECTIONS_PER_IMAGE 100 returns."""
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3)) * 255
    torch.manual_seed(0)
    reference = build_model(_cfg(False, 1000)).eval()
    state = _realistic_weights(reference, image, seed=1)
    exact = _detect(False, state, image, 1000)
    fast = _detect(True, state, image, 1000)
    assert len(exact) == 1000  # the cap applies: many candidates, NMS and top-k all at work
    for count in (100, 1000):
        cut = float(exact.scores[count - 1]) + SCORE_BOUND
        box_diff, score_diff, matched = _matched_differences(fast[:count], exact[:count], cut)
        print(
            f"fast vs exact, top {count}: {matched} clearly inside the cut, "
            f"max box {box_diff:.3g} px, max score {score_diff:.3g}"
        )
        assert matched >= 0.9 * count
        assert 0 < box_diff <= BOX_BOUND_PX
        assert score_diff <= SCORE_BOUND
