"""FCOS test-time augmentation in the style of the official FCOS ``BBOX_AUG`` (``fcos_core/engine/bbox_aug.py``).

detectron2's ``GeneralizedRCNNWithTTA`` only accepts R-CNN models. The official FCOS recipe, kept
here:

* run the detector on several resized copies of the image (``TEST.AUG.MIN_SIZES`` shortest edges, longest
  edge at most ``TEST.AUG.MAX_SIZE``) and, with ``TEST.AUG.FLIP``, on their horizontal flips;
* from every copy take the *candidates* of the normal decoding (per level: threshold, top-k, score
  sqrt(prob * centerness)) **before** NMS, and map their boxes back to the original image;
* merge the candidates of all copies and run the model's own NMS and per-image cut
  (``fcos.inference.select_detections`` with ``MODEL.FCOS.POSTPROCESS``, ``NMS_THRESH_TEST`` and
  ``TEST.DETECTIONS_PER_IMAGE``).

The official config lists the test size separately (identity, its flip, then ``SCALES`` with
``SCALE_H_FLIP``); detectron2's keys fold that into ``MIN_SIZES`` x ``FLIP`` (put ``INPUT.MIN_SIZE_TEST`` in
``MIN_SIZES`` to include the identity scale, as detectron2's default list does with 800).
Boxes are clipped to the image after NMS, as in the non-TTA path (``detector_postprocess``), so that a
single identity augmentation gives exactly the model's normal output.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Instances
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .inference import select_detections
from .meta_arch import FCOS


class FCOSWithTTA(nn.Module):
    """An FCOS model with test-time augmentation; called like the model in inference mode.

    ``train_net.py --eval-only`` wraps the model in it when ``TEST.AUG.ENABLED`` is set.
    """

    def __init__(
        self,
        cfg: CfgNode,
        model: nn.Module,
        tta_mapper: Optional[Callable[[Dict], List[Dict]]] = None,
    ) -> None:
        """
        Args:
            cfg: the config; ``TEST.AUG.MIN_SIZES``, ``MAX_SIZE`` and ``FLIP`` choose the augmentations.
            model: an ``FCOS`` (possibly inside ``DistributedDataParallel``).
            tta_mapper: input dict -> augmented input dicts, each with a ``"transforms"`` entry mapping the
                original image to the augmented one; defaults to detectron2's ``DatasetMapperTTA(cfg)``.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, FCOS):
            raise TypeError(
                f"FCOSWithTTA needs an FCOS model (MODEL.META_ARCHITECTURE: FCOS), got {type(model).__name__}"
            )
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Same input and output as ``FCOS`` in eval mode: ``[{"instances": Instances}]`` per image,
        boxes in the pixels of ``"height"`` x ``"width"`` (default: the input image's size)."""
        return [{"instances": self._inference_single(inputs)} for inputs in batched_inputs]

    def _inference_single(self, inputs: Dict) -> Instances:
        inputs = dict(inputs)
        inputs.setdefault("height", inputs["image"].shape[1])
        inputs.setdefault("width", inputs["image"].shape[2])
        merged = [self.augmented_candidates(augmented) for augmented in self.tta_mapper(inputs)]
        boxes = torch.cat([m[0] for m in merged])
        scores = torch.cat([m[1] for m in merged])
        classes = torch.cat([m[2] for m in merged])
        image_size = (inputs["height"], inputs["width"])
        result = select_detections(
            boxes,
            scores,
            classes,
            image_size,
            nms_thresh=self.model.nms_thresh_test,
            max_detections=self.model.max_detections_per_image,
            postprocess=self.model.postprocess,
        )
        result.pred_boxes.clip(image_size)
        return result[result.pred_boxes.nonempty()]

    def augmented_candidates(self, augmented: Dict) -> Tuple[Tensor, Tensor, Tensor]:
        """Pre-NMS candidates of one augmented input, boxes mapped back to the original image.

        Each image runs alone: batching copies of different sizes would pad them, and GroupNorm
        statistics over the padded maps would change the predictions.

        Returns:
            boxes (N, 4) in original-image pixels, scores (N,), classes (N,).
        """
        model = self.model
        images = model.preprocess_image([augmented])
        with model.inference_precision().autocast():  # TEST.AMP, as in the model's own forward
            features = model.backbone(images.tensor)
            features = [features[name] for name in model.head_in_features]
            predictions = model.head(features)
        boxes, scores, classes = model.candidates(images, features, predictions)[0]
        original = augmented["transforms"].inverse().apply_box(boxes.cpu().numpy())
        return torch.as_tensor(original, dtype=boxes.dtype, device=boxes.device), scores, classes
