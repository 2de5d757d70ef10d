"""INPUT.COLOR_JITTER: photometric training augmentation on top of detectron2's mapper."""

from __future__ import annotations

import numpy as np
from detectron2.data import transforms as T
from PIL import Image

from fcos.engine.augmentation import build_train_mapper, color_augmentations
from fcos.engine.config import get_fcos_cfg


def _record(image: np.ndarray, tmp_path) -> dict:
    path = tmp_path / "a.png"
    Image.fromarray(image).save(path)
    box = {"bbox": [4.0, 6.0, 20.0, 20.0], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}
    return {"file_name": str(path), "height": 32, "width": 48, "image_id": 1, "annotations": [box]}


def _cfg(enabled: bool):
    cfg = get_fcos_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.COLOR_JITTER.ENABLED = enabled
    cfg.INPUT.COLOR_JITTER.INTENSITY = 0.5
    return cfg


def test_disabled_adds_nothing() -> None:
    assert color_augmentations(_cfg(False)) == []


def test_enabled_factors_span_the_intensity() -> None:
    augs = color_augmentations(_cfg(True))
    assert [type(a) for a in augs] == [T.RandomBrightness, T.RandomContrast, T.RandomSaturation]
    assert all((a.intensity_min, a.intensity_max) == (0.5, 1.5) for a in augs)


def test_mapper_changes_colours_not_boxes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(32, 48, 3), dtype=np.uint8)
    record = _record(image, tmp_path)
    plain = build_train_mapper(_cfg(False))(dict(record))
    np.random.seed(1)  # detectron2's random augmentations draw from numpy's global generator
    jittered = build_train_mapper(_cfg(True))(dict(record))
    # Same geometry: the size-32 resize is the identity here, the box is the input box.
    assert plain["image"].shape == jittered["image"].shape == (3, 32, 48)
    for out in (plain, jittered):
        assert out["instances"].gt_boxes.tensor.tolist() == [[4.0, 6.0, 24.0, 26.0]]
    assert np.array_equal(plain["image"].numpy().transpose(1, 2, 0), image[:, :, ::-1])
    assert not np.array_equal(plain["image"].numpy(), jittered["image"].numpy())
