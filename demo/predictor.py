"""FCOSPredictor: one image in, its detections out (what the demo runs on every image).

Like detectron2's ``DefaultPredictor``, but the model comes from ``fcos.engine.defaults.
build_inference_model`` (complete, shape-checked weights, clear errors), and ``TEST.AUG.ENABLED``
switches on FCOS test-time augmentation.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.structures import Instances

from fcos import FCOSWithTTA
from fcos.engine.defaults import build_inference_model


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
        resized = (
            image if self.tta is not None else self.resize.get_transform(image).apply_image(image)
        )
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Instances:
        inputs = [self.model_input(image)]
        outputs = self.tta(inputs) if self.tta is not None else self.model(inputs)
        return outputs[0]["instances"]
