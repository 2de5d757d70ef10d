"""FCOS test-time augmentation (fcos/tta.py): flips undone exactly, merging + class-aware NMS, top-k."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from fvcore.transforms import NoOpTransform, TransformList
from inference_helpers import boxes_close, random_fcos, tiny_cfg

from fcos.inference import select_detections
from fcos.tta import FCOSWithTTA


@pytest.fixture(scope="module")
def model():
    return random_fcos(tiny_cfg())


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=generator) * 255).to(torch.uint8)


def _aug_cfg(min_sizes, flip: bool, max_size: int = 160, *opts: str):
    return tiny_cfg(
        "TEST.AUG.ENABLED",
        "True",
        "TEST.AUG.MIN_SIZES",
        str(tuple(min_sizes)),
        "TEST.AUG.MAX_SIZE",
        str(max_size),
        "TEST.AUG.FLIP",
        str(flip),
        *opts,
    )


def _run(module, image: torch.Tensor, **extra):
    with torch.no_grad():
        return module([{"image": image, **extra}])[0]["instances"]


def test_single_identity_augmentation_reproduces_plain_inference(model):
    """One scale equal to the input size, no flip: exactly the model's own detections."""
    image = _image(128, 160)
    plain = _run(model, image)
    tta = _run(FCOSWithTTA(_aug_cfg([128], False), model), image)
    assert len(plain) > 0
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(tta.scores, plain.scores) and torch.equal(
        tta.pred_classes, plain.pred_classes
    )


def test_official_postprocessing_is_shared_with_plain_inference():
    """With MODEL.FCOS.POSTPROCESS official, one identity augmentation still gives exactly the
    model's detections: TTA runs the model's own clipping, "+1" NMS and per-image cut. At NMS
    threshold 0.3 the "+1" NMS keeps fewer of this image's candidates than detectron2's would."""
    opts = ("MODEL.FCOS.POSTPROCESS", "official", "MODEL.FCOS.NMS_THRESH_TEST", "0.3")
    official = random_fcos(tiny_cfg(*opts))
    image = _image(128, 160)
    plain = _run(official, image)
    tta = _run(FCOSWithTTA(_aug_cfg([128], False, 160, *opts), official), image)
    candidates = official.candidates(*_network_outputs(official, image))[0]
    seed_nms = select_detections(*candidates, (128, 160), nms_thresh=0.3, max_detections=100)
    assert len(plain) < len(seed_nms)
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(tta.scores, plain.scores)
    assert torch.equal(tta.pred_classes, plain.pred_classes)


def _network_outputs(model, image: torch.Tensor):
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        features = [features[name] for name in model.head_in_features]
        return images, features, model.head(features)


def test_single_rescaled_augmentation_matches_plain_inference_in_original_pixels(model):
    """A 96x128 image at MIN_SIZE_TEST 128 (-> 120x160): TTA maps candidates back before NMS, the plain
    path after; IoU is invariant to the axis-aligned rescale, so the detections agree."""
    image_96 = _image(96, 128, seed=3)
    resized = torch.nn.functional.interpolate(
        image_96[None].float(), size=(120, 160), mode="bilinear"
    )[0]
    resized = resized.round().to(torch.uint8)
    plain = _run(model, resized, height=96, width=128)
    tta = _run(FCOSWithTTA(_aug_cfg([128], False), model), resized, height=96, width=128)
    assert tta.image_size == (96, 128) and len(plain) > 0
    assert tta.pred_classes.tolist() == plain.pred_classes.tolist()
    assert boxes_close(tta.pred_boxes.tensor, plain.pred_boxes.tensor, atol=1e-3)


def test_flip_of_a_symmetric_image_gives_the_mirrored_candidates(model):
    """On a horizontally symmetric image the flipped copy equals the original, so the flip branch's
    candidates, mapped back, must be the plain candidates mirrored: x0' = W - x1, x1' = W - x0."""
    left = _image(128, 80, seed=5)
    image = torch.cat([left, left.flip(-1)], dim=-1)
    assert torch.equal(image, image.flip(-1))
    tta = FCOSWithTTA(_aug_cfg([128], True), model)
    plain_input, flipped_input = tta.tta_mapper({"image": image, "height": 128, "width": 160})
    with torch.no_grad():
        plain_boxes, plain_scores, plain_classes = tta.augmented_candidates(plain_input)
        flip_boxes, flip_scores, flip_classes = tta.augmented_candidates(flipped_input)
    assert len(plain_boxes) > 10
    mirrored = torch.stack(
        [160 - plain_boxes[:, 2], plain_boxes[:, 1], 160 - plain_boxes[:, 0], plain_boxes[:, 3]], 1
    )
    assert boxes_close(flip_boxes, mirrored, atol=1e-4)
    assert torch.equal(flip_scores, plain_scores) and torch.equal(flip_classes, plain_classes)


def test_duplicate_augmentations_are_merged_by_class_aware_nms(model):
    """Two identical identity copies: every candidate twice; NMS must leave the single-copy result."""
    image = _image(128, 160, seed=7)
    cfg = _aug_cfg([128], False)

    def two_copies(inputs):
        return [dict(inputs, transforms=TransformList([NoOpTransform()])) for _ in range(2)]

    single = _run(FCOSWithTTA(cfg, model), image)
    doubled = _run(FCOSWithTTA(cfg, model, tta_mapper=two_copies), image)
    assert torch.equal(doubled.pred_boxes.tensor, single.pred_boxes.tensor)
    assert torch.equal(doubled.pred_classes, single.pred_classes)


def test_nms_does_not_merge_across_classes(model):
    """Class-aware: identical boxes of different classes both survive."""
    tta = FCOSWithTTA(_aug_cfg([128], False), model)
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    candidates = [
        (box, torch.tensor([0.9]), torch.tensor([0])),
        (box, torch.tensor([0.8]), torch.tensor([2])),
    ]
    tta.augmented_candidates = lambda augmented: candidates.pop(0)
    tta.tta_mapper = lambda inputs: [inputs, inputs]
    result = _run(tta, _image(64, 64))
    assert result.pred_classes.tolist() == [0, 2]
    assert result.scores.tolist() == pytest.approx([0.9, 0.8])


def test_multi_scale_flip_output_is_capped_sorted_and_clipped():
    cfg = _aug_cfg([96, 128, 160], True, 4000, "TEST.DETECTIONS_PER_IMAGE", "7")
    tta = FCOSWithTTA(cfg, random_fcos(cfg))
    assert len(tta.tta_mapper({"image": _image(96, 128), "height": 96, "width": 128})) == 6
    result = _run(tta, _image(96, 128, seed=9), height=192, width=256)
    assert result.image_size == (192, 256)
    assert len(result) == 7
    scores = result.scores.tolist()
    assert scores == sorted(scores, reverse=True)
    boxes = result.pred_boxes.tensor
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 256).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 192).all()


def test_default_mapper_follows_the_config(model):
    tta = FCOSWithTTA(_aug_cfg([64, 128], True, 100), model)
    assert isinstance(tta.tta_mapper, DatasetMapperTTA)
    shapes = [
        tuple(d["image"].shape[1:])
        for d in tta.tta_mapper({"image": _image(96, 128), "height": 96, "width": 128})
    ]
    # Short edge 64 -> 64x85; short edge 128 -> 128x171, capped at long edge 100 -> 75x100; each also flipped.
    assert shapes == [(64, 85), (64, 85), (75, 100), (75, 100)]


def test_rejects_a_model_that_is_not_fcos():
    with pytest.raises(TypeError, match="needs an FCOS model"):
        FCOSWithTTA(tiny_cfg(), torch.nn.Linear(2, 2))
