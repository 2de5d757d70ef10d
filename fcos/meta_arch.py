"""The FCOS meta-architecture, registered as ``MODEL.META_ARCHITECTURE: "FCOS"``.

Built on detectron2's ``DenseDetector`` (pre-processing, backbone -> head plumbing, post-processing to
the requested output size); this class adds FCOS's grid points, target assignment, losses and decoding.

With ``MODEL.FCOS.FAST_CPU_INFERENCE`` (default), CPU inference runs in channels-last (NHWC)
memory format, with the backbone's frozen BatchNorms folded into their convolutions
(``FoldedFrozenBNConv2d``); that changes results by float rounding only (measured bound in
docs/MODEL.md, "Fast CPU path").
Training, other devices and ``FAST_CPU_INFERENCE False`` keep detectron2's NCHW arithmetic exactly.
Module and parameter names are untouched (checkpoint contract).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import ImageList, Instances
from torch import Tensor

from .config import validate_fcos_config
from .fast_inference import fold_frozen_batchnorms
from .head import FCOSHead
from .inference import image_candidates, select_detections
from .losses import fcos_losses
from .precision import Precision, check_precision, resolve_precision, upcast
from .targets import FCOSTargetAssigner, grid_points

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class FCOS(DenseDetector):
    """FCOS: Fully Convolutional One-Stage Object Detection (Tian et al., 2019)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: FCOSHead,
        head_in_features: Sequence[str],
        num_classes: int,
        fpn_strides: Sequence[int],
        grid_offset: float,
        assigner: FCOSTargetAssigner,
        box_reg_weights: Sequence[float],
        focal_loss_alpha: float,
        focal_loss_gamma: float,
        iou_loss_type: str,
        norm_sync: bool,
        score_thresh_test: float,
        topk_candidates_test: int,
        inference_topk_first: bool,
        postprocess: str,
        nms_thresh_test: float,
        max_detections_per_image: int,
        fast_cpu_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        box_quality: str = "ctrness",
        test_amp: Tuple[bool, str] = (False, "auto"),
    ) -> None:
        super().__init__(
            backbone, head, list(head_in_features), pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.fast_cpu_inference = fast_cpu_inference
        if fast_cpu_inference:
            fold_frozen_batchnorms(self.backbone)
        self.num_classes = num_classes
        self.fpn_strides = list(fpn_strides)
        self.grid_offset = grid_offset
        self.assigner = assigner
        self.box_reg_weights = tuple(box_reg_weights)
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.iou_loss_type = iou_loss_type
        self.norm_sync = norm_sync
        self.score_thresh_test = score_thresh_test
        self.topk_candidates_test = topk_candidates_test
        self.inference_topk_first = inference_topk_first
        self.postprocess = postprocess
        self.nms_thresh_test = nms_thresh_test
        self.max_detections_per_image = max_detections_per_image
        # Only training differs: at test time the branch's output (centerness or IoU) scores alike.
        self.box_quality = box_quality
        # (TEST.AMP.ENABLED, TEST.AMP.PRECISION), resolved per device type at the first forward.
        check_precision("TEST.AMP", test_amp[1])
        self.test_amp = (bool(test_amp[0]), str(test_amp[1]))
        self._inference_precisions: Dict[str, Precision] = {}

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        validate_fcos_config(cfg, shapes)
        fc = cfg.MODEL.FCOS
        head = FCOSHead(
            [shapes[f] for f in fc.IN_FEATURES],
            num_classes=fc.NUM_CLASSES,
            num_convs=fc.NUM_CONVS,
            prior_prob=fc.PRIOR_PROB,
            fpn_strides=fc.FPN_STRIDES,
            norm=fc.HEAD_NORM,
            centerness_on_reg=fc.CENTERNESS_ON_REG,
            norm_reg_targets=fc.NORM_REG_TARGETS,
            use_dcn_in_tower=fc.USE_DCN_IN_TOWER,
        )
        assigner = FCOSTargetAssigner(
            num_classes=fc.NUM_CLASSES,
            strides=fc.FPN_STRIDES,
            sizes_of_interest=fc.OBJECT_SIZES_OF_INTEREST,
            center_sampling_radius=fc.CENTER_SAMPLING_RADIUS,
            chunk_elements=fc.ASSIGNMENT_CHUNK_ELEMENTS,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": fc.IN_FEATURES,
            "num_classes": fc.NUM_CLASSES,
            "fpn_strides": fc.FPN_STRIDES,
            "grid_offset": fc.GRID_OFFSET,
            "assigner": assigner,
            "box_reg_weights": fc.BBOX_REG_WEIGHTS,
            "focal_loss_alpha": fc.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": fc.FOCAL_LOSS_GAMMA,
            "iou_loss_type": fc.IOU_LOSS_TYPE,
            "norm_sync": fc.NORM_SYNC,
            "score_thresh_test": fc.SCORE_THRESH_TEST,
            "topk_candidates_test": fc.TOPK_CANDIDATES_TEST,
            "inference_topk_first": fc.INFERENCE_TOPK_FIRST,
            "postprocess": fc.POSTPROCESS,
            "nms_thresh_test": fc.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "fast_cpu_inference": fc.FAST_CPU_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "box_quality": fc.BOX_QUALITY,
            "test_amp": (cfg.TEST.AMP.ENABLED, cfg.TEST.AMP.PRECISION),
        }

    def inference_precision(self) -> Precision:
        """``TEST.AMP`` resolved for the model's current device (logged once per device type)."""
        device_type = self.device.type
        if device_type not in self._inference_precisions:
            precision = resolve_precision("TEST.AMP", *self.test_amp, device_type)
            if precision.warning:
                logger.warning(precision.warning)
            logger.info(precision.description)
            self._inference_precisions[device_type] = precision
        return self._inference_precisions[device_type]

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):  # type: ignore[override]
        """DenseDetector's forward; in eval mode under ``TEST.AMP``'s autocast.

        So every caller (evaluator, ``--eval-only``, demo, predictor, bench) gets mixed precision
        from the config alone. Decoding stays fp32: ``candidates`` upcasts the head's maps, and
        nothing after it is an op that autocast lowers (it has no matmul or convolution).
        """
        if self.training:
            return super().forward(batched_inputs)
        with self.inference_precision().autocast():
            return super().forward(batched_inputs)

    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        """detectron2's normalise-pad-batch; channels-last for CPU inference on the fast path.

        oneDNN runs NHWC convolutions, pooling and GroupNorm without reordering the maps, and the head's
        (N, C, H, W) -> (N, H*W, C) transposes become free views. Training stays NCHW: on this CPU
        stack the NHWC convolution backward is slower.
        """
        images = super().preprocess_image(batched_inputs)
        if self.training or not self.fast_cpu_inference or images.tensor.device.type != "cpu":
            return images
        return ImageList(
            images.tensor.contiguous(memory_format=torch.channels_last), images.image_sizes
        )

    def _points(self, features: Sequence[Tensor]) -> List[Tensor]:
        return grid_points(
            [f.shape[-2:] for f in features], self.fpn_strides, self.grid_offset, features[0].device
        )

    def _flat_predictions(
        self, predictions: Tuple[List[Tensor], List[Tensor], List[Tensor]]
    ) -> List[List[Tensor]]:
        """Per level (N, H*W, K), (N, H*W, 4), (N, H*W, 1): the order targets are built in."""
        return self._transpose_dense_predictions(list(predictions), [self.num_classes, 4, 1])

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor], List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        logits, deltas, centerness = (
            torch.cat(p, dim=1) for p in self._flat_predictions(predictions)
        )
        targets = self.assigner(self._points(features), gt_instances)
        gt_deltas = targets.deltas * targets.deltas.new_tensor(self.box_reg_weights)
        return fcos_losses(
            pred_logits=logits.reshape(-1, self.num_classes),
            pred_deltas=deltas.reshape(-1, 4),
            pred_centerness=centerness.reshape(-1),
            gt_classes=targets.classes.reshape(-1),
            gt_deltas=gt_deltas.reshape(-1, 4),
            gt_centerness=targets.centerness.reshape(-1),
            num_classes=self.num_classes,
            focal_alpha=self.focal_loss_alpha,
            focal_gamma=self.focal_loss_gamma,
            iou_loss_type=self.iou_loss_type,
            norm_sync=self.norm_sync,
            box_quality=self.box_quality,
            box_reg_weights=self.box_reg_weights,
        )

    def candidates(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor], List[Tensor]],
    ) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Pre-NMS (boxes, scores, classes) per image, boxes in network-input pixels.

        With the official post-processing the boxes are already clipped to the network input.
        Public so that test-time augmentation can merge the candidates of several inputs before one
        NMS.
        """
        points = self._points(features)
        logits, deltas, centerness = upcast(self._flat_predictions(predictions))
        return [
            image_candidates(
                [x[i] for x in logits],
                [x[i] for x in deltas],
                [x[i].reshape(-1) for x in centerness],
                points,
                score_thresh=self.score_thresh_test,
                topk=self.topk_candidates_test,
                topk_first=self.inference_topk_first,
                box_weights=self.box_reg_weights,
                postprocess=self.postprocess,
                image_size=tuple(images.image_sizes[i]),
            )
            for i in range(len(images))
        ]

    def forward_inference(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor], List[Tensor]],
    ) -> List[Instances]:
        return [
            select_detections(
                *candidates,
                tuple(image_size),
                nms_thresh=self.nms_thresh_test,
                max_detections=self.max_detections_per_image,
                postprocess=self.postprocess,
            )
            for candidates, image_size in zip(
                self.candidates(images, features, predictions), images.image_sizes
            )
        ]
