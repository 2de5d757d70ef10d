"""An official FCOS checkpoint in the official-flavour model gives the official detections.

The checkpoint is built in the test with the official names and shapes (random values), loaded through
FCOSCheckpointer into the model of configs/fcos_R_50_FPN_official.yaml, and compared with a functional
re-computation of the official math and post-processing (tests/official_fcos.py) on a 90x120 image.
The comparison is on the model's own detections in network-input pixels (``forward_inference``),
before detectron2's ``detector_postprocess`` rescales them to the requested output size.
"""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from model_utils import REPO
from official_fcos import official_detections, official_r50_fpn_state_dict
from torch import Tensor

from fcos import add_fcos_config
from fcos.checkpoint import FCOSCheckpointer

HEIGHT, WIDTH = 90, 120  # not a multiple of 32: padding is exercised too
PRE_NMS_TOP_N = 60
# Few classes put many candidates of one class on top of each other, so NMS decides often enough for
# its "+1" convention to change some of the decisions; the per-image cut still applies.
NUM_CLASSES = 5
DETECTIONS_PER_IMAGE = 80


def _sorted(boxes: Tensor, scores: Tensor, classes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    order = scores.argsort(descending=True)
    return boxes[order], scores[order], classes[order]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    cfg = get_cfg()
    add_fcos_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "fcos_R_50_FPN_official.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # Official PRE_NMS_TOP_N is 1000; on a 90x120 image a smaller cut is what makes the ranking matter.
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = PRE_NMS_TOP_N
    cfg.MODEL.FCOS.NUM_CLASSES = NUM_CLASSES
    cfg.TEST.DETECTIONS_PER_IMAGE = DETECTIONS_PER_IMAGE
    model = build_model(cfg).eval()
    official = official_r50_fpn_state_dict(num_classes=NUM_CLASSES, seed=11)
    path = tmp_path_factory.mktemp("official") / "FCOS_imprv_R_50_FPN_1x.pth"
    torch.save({"model": official, "iteration": 90000}, path)
    FCOSCheckpointer(model).load(str(path))
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(12)) * 255
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        features = [features[name] for name in model.head_in_features]
        out = model.forward_inference(images, features, model.head(features))[0]
    ours = _sorted(out.pred_boxes.tensor, out.scores, out.pred_classes)
    return cfg, official, image, ours


def _reference(cfg, official, image, **variant) -> Tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        return _sorted(
            *official_detections(
                official,
                image,
                pixel_mean=tuple(cfg.MODEL.PIXEL_MEAN),
                **{"pre_nms_top_n": PRE_NMS_TOP_N, "max_detections": DETECTIONS_PER_IMAGE}
                | variant,
            )
        )


def test_same_detections_as_official_math(setup) -> None:
    cfg, official, image, (boxes, scores, classes) = setup
    ref_boxes, ref_scores, ref_classes = _reference(cfg, official, image)

    # The example exercises every stage: top-k cuts candidates, clipping moves boxes onto the last
    # pixel row or column, NMS removes some, the per-image cap applies.
    assert len(ref_scores) == DETECTIONS_PER_IMAGE
    assert len(_reference(cfg, official, image, max_detections=10**6)[1]) > DETECTIONS_PER_IMAGE
    assert (ref_boxes[:, 2] == WIDTH - 1).any() and (ref_boxes[:, 3] == HEIGHT - 1).any()
    assert len(scores) == len(ref_scores)
    assert torch.equal(classes, ref_classes)
    assert torch.allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert torch.allclose(boxes, ref_boxes, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({"bn_eps": 1e-5}, id="FrozenBN-with-eps"),
        pytest.param({"grid_offset_half": False}, id="grid-offset-0"),
        pytest.param({"rank_by_centerness": False}, id="top-k-by-prob"),
        pytest.param({"pre_nms_top_n": 10**6}, id="no-top-k"),
        pytest.param({"clip_before_nms": False}, id="no-clipping-before-NMS"),
        pytest.param({"plus_one_nms": False}, id="NMS-without-plus-one"),
    ],
)
def test_comparison_is_sensitive_to_each_official_convention(setup, variant) -> None:
    """Each convention changes the detections of this example, so the equality above really checks it."""
    cfg, official, image, (boxes, scores, classes) = setup
    ref_boxes, ref_scores, ref_classes = _reference(cfg, official, image, **variant)
    same = (
        len(ref_scores) == len(scores)
        and torch.equal(classes, ref_classes)
        and torch.allclose(scores, ref_scores, rtol=0, atol=1e-5)
        and torch.allclose(boxes, ref_boxes, rtol=0, atol=1e-3)
    )
    assert not same
