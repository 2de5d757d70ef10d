"""Mixed precision on the CPU: the AMP training step, its GradScaler handling, TEST.AMP inference.

The bf16 tests need a CPU that runs bf16 at all (every x86-64 torch build does, natively or
emulated); the float16 GradScaler paths run on the CPU too (autocast("cpu", float16) +
GradScaler("cpu")), on a linear model: float16 convolutions on a CPU are ~100x slower than fp32.
CUDA-only variants are at the end and skip on machines without a GPU.
"""

from __future__ import annotations

import itertools
from typing import Dict, List

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from model_utils import REPO
from torch import nn

from fcos.data import shapes
from fcos.engine.config import get_fcos_cfg
from fcos.engine.hooks import FiniteLossAMPTrainer, NonFiniteLossError
from fcos.head import FCOSHead
from fcos.precision import Precision, resolve_precision

SIZE = 96
STEPS = 30
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"
)


def embedded_cfg(*opts: str) -> CfgNode:
    """The embedded config with a 32-channel FPN and one head conv: seconds per dozen steps."""
    cfg = get_fcos_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "fcos_shapes.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.FCOS.NUM_CLASSES",
            "4",
            "MODEL.FPN.OUT_CHANNELS",
            "32",
            "MODEL.FCOS.NUM_CONVS",
            "1",
            "INPUT.MIN_SIZE_TEST",
            str(SIZE),
            "INPUT.MAX_SIZE_TEST",
            str(SIZE),
            *opts,
        ]
    )
    return cfg


def shapes_batch(count: int = 4) -> List[Dict]:
    """Generated shapes images (the embedded dataset's renderer) with their GT boxes and classes."""
    batch = []
    for index in range(count):
        background, placed = shapes.sample_image(0, "train", index, (SIZE, SIZE), empty=False)
        image = shapes.compose(background, placed)
        inst = Instances((SIZE, SIZE))
        xywh = torch.tensor([p.shape.tight_box() for p in placed], dtype=torch.float32)
        inst.gt_boxes = Boxes(torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1))
        inst.gt_classes = torch.tensor([p.shape.category_id - 1 for p in placed])
        batch.append(
            {
                "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "instances": inst,
            }
        )
    return batch


def bf16_cpu() -> Precision:
    return resolve_precision("SOLVER.AMP", True, "bfloat16", "cpu")


class _DtypeRecorder:
    """Forward hook keeping the dtype of a module's output (to see that autocast really ran)."""

    def __init__(self, module: nn.Module) -> None:
        self.dtypes: List[torch.dtype] = []
        module.register_forward_hook(lambda _m, _i, out: self.dtypes.append(out.dtype))


@pytest.fixture(scope="module")
def trained() -> Dict:
    """A small FCOS trained for STEPS bf16 AMP steps (AdamW) on one fixed batch of shapes images."""
    torch.manual_seed(0)
    model = build_model(embedded_cfg())
    batch = shapes_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    trainer = FiniteLossAMPTrainer(model, itertools.repeat(batch), optimizer, bf16_cpu())
    conv_dtypes = _DtypeRecorder(model.head.cls_score)
    losses = []
    with EventStorage(0) as storage:
        for trainer.iter in range(STEPS):
            storage.iter = trainer.iter
            trainer.run_step()
            losses.append(storage.history("total_loss").latest())
    return {
        "model": model.eval(),
        "batch": batch,
        "losses": losses,
        "conv_dtypes": conv_dtypes.dtypes,
    }


def test_bf16_amp_steps_are_finite_lower_the_loss_and_run_in_bf16(trained: Dict) -> None:
    losses = trained["losses"]
    assert all(np.isfinite(losses))
    assert set(trained["conv_dtypes"]) == {torch.bfloat16}  # autocast was on for every step
    # Overfitting one batch: the last 5 steps average well under the first step (measured: < 0.6x).
    assert np.mean(losses[-5:]) < 0.75 * losses[0]


def _with_test_amp(model: nn.Module, precision: str) -> nn.Module:
    """The same weights in a model built with ``TEST.AMP.ENABLED True``, ``PRECISION precision``."""
    amp_model = build_model(
        embedded_cfg("TEST.AMP.ENABLED", "True", "TEST.AMP.PRECISION", precision)
    )
    amp_model.load_state_dict(model.state_dict())
    return amp_model.to(model.device).eval()


def _detections(model: nn.Module, batch: List[Dict]) -> List[Instances]:
    with torch.no_grad():
        return [out["instances"] for out in model([{"image": b["image"]} for b in batch])]


def test_test_amp_bf16_detections_match_fp32(trained: Dict) -> None:
    """Bound tested: every fp32 detection with score >= 0.3 has a bf16 detection of the same class with
    IoU >= 0.9 and |score difference| <= 0.05, and the bf16 outputs are float32 (decoding in fp32).
    """
    model, batch = trained["model"], trained["batch"]
    amp_model = _with_test_amp(model, "bfloat16")
    recorder = _DtypeRecorder(amp_model.head.cls_score)
    reference, mixed = _detections(model, batch), _detections(amp_model, batch)
    assert set(recorder.dtypes) == {torch.bfloat16}  # the head ran under autocast
    confident = 0
    for ref, amp in zip(reference, mixed):
        assert amp.scores.dtype == torch.float32 and amp.pred_boxes.tensor.dtype == torch.float32
        ref = ref[ref.scores >= 0.3]
        confident += len(ref)
        iou = pairwise_iou(ref.pred_boxes, amp.pred_boxes)
        same_class = ref.pred_classes[:, None] == amp.pred_classes[None, :]
        close_score = (ref.scores[:, None] - amp.scores[None, :]).abs() <= 0.05
        assert ((iou >= 0.9) & same_class & close_score).any(dim=1).all()
    assert confident >= 4  # the trained model finds the objects, so the comparison means something


def test_test_amp_off_leaves_the_model_in_fp32(trained: Dict) -> None:
    model = trained["model"]
    recorder = _DtypeRecorder(model.head.cls_score)
    _detections(model, trained["batch"][:1])
    assert recorder.dtypes == [torch.float32] * len(model.head_in_features)  # one call per level


class _Quadratic(nn.Module):
    """loss = (w . x)^2, gradient 2 (w . x) x, returned as a detectron2 model's loss dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1, bias=False)
        nn.init.constant_(self.linear.weight, 1.0)

    def forward(self, data: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss": (self.linear(data).float() ** 2).sum()}


def _quadratic_trainer(
    clip_value: float | None = None, lr: float = 1.0, data: float = 1.0, init_scale: float = 256.0
) -> FiniteLossAMPTrainer:
    """float16 on the CPU; the scale is small enough that the float16 output gradient (8 x scale at
    the initial weights) stays finite."""
    cfg = get_fcos_cfg()
    optimizer_type = torch.optim.SGD
    if clip_value is not None:
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = clip_value
        optimizer_type = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    model = _Quadratic()
    optimizer = optimizer_type(model.parameters(), lr=lr)
    fp16 = resolve_precision("SOLVER.AMP", True, "float16", "cpu")
    trainer = FiniteLossAMPTrainer(
        model, itertools.repeat(torch.full((1, 4), data)), optimizer, fp16
    )
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def _steps(trainer: FiniteLossAMPTrainer, count: int) -> None:
    with EventStorage(0):
        for trainer.iter in range(count):
            trainer.run_step()


@pytest.mark.parametrize("clip_value, expected", [(20.0, 0.92), (0.5, 0.9975)])
def test_float16_gradient_clipping_sees_unscaled_gradients(
    clip_value: float, expected: float
) -> None:
    """Gradient 2 * (w . x) * x = 8 per weight, norm 16, lr 0.01. Clip 20: no clipping, each weight
    moves by 0.08 (clipping the x256-scaled gradient instead would move it by 0.1). Clip 0.5: moves by
    0.01 * 0.5 / 16 * 8 = 0.0025 (clipping before unscaling would give 0.0025 / 256)."""
    trainer = _quadratic_trainer(clip_value=clip_value, lr=0.01)
    assert trainer.grad_scaler.is_enabled()
    _steps(trainer, 1)
    weight = trainer.model.linear.weight.detach()
    assert torch.allclose(weight, torch.full_like(weight, expected), atol=1e-5)
    assert trainer.grad_scaler.get_scale() == 256.0


def test_float16_overflow_skips_the_step_and_backs_off_the_scale() -> None:
    trainer = _quadratic_trainer(init_scale=2.0**127)  # the scaled loss and gradients overflow
    before = trainer.model.linear.weight.detach().clone()
    _steps(trainer, 1)
    assert torch.equal(trainer.model.linear.weight.detach(), before)
    assert trainer.grad_scaler.get_scale() == 2.0**126


def test_grad_scaler_state_round_trips_through_the_trainer_state() -> None:
    trainer = _quadratic_trainer(lr=1e-3)
    _steps(trainer, 3)
    state = trainer.state_dict()
    assert state["grad_scaler"]["_growth_tracker"] == 3 and state["grad_scaler"]["scale"] == 256.0
    fresh = _quadratic_trainer(lr=1e-3, init_scale=8.0)
    fresh.load_state_dict(state)
    assert fresh.grad_scaler.state_dict() == state["grad_scaler"]
    assert (
        fresh.optimizer.state_dict()["param_groups"]
        == trainer.optimizer.state_dict()["param_groups"]
    )


def test_a_bf16_trainer_loads_an_fp32_checkpoint_state_and_vice_versa() -> None:
    """No scaler in bf16: its (empty) state loads anywhere; fp16 then keeps its initial scale."""
    model = _Quadratic()
    bf16 = FiniteLossAMPTrainer(
        model, iter([]), torch.optim.SGD(model.parameters(), lr=1.0), bf16_cpu()
    )
    assert not bf16.grad_scaler.is_enabled() and bf16.state_dict()["grad_scaler"] == {}
    fp16 = _quadratic_trainer()
    fp16.load_state_dict(bf16.state_dict())
    assert fp16.grad_scaler.get_scale() == 256.0


def test_a_non_finite_loss_stops_before_the_step() -> None:
    trainer = _quadratic_trainer(data=float("nan"))
    before = trainer.model.linear.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="at iteration 0"):
        _steps(trainer, 1)
    assert torch.equal(trainer.model.linear.weight.detach(), before)


def test_exp_box_regression_does_not_overflow_in_float16() -> None:
    """NORM_REG_TARGETS False: distances exp(x); x = 12 is inf in float16 (max 65504 = e^11.09)."""
    head = FCOSHead(
        [ShapeSpec(channels=32)],
        num_classes=2,
        num_convs=1,
        prior_prob=0.01,
        fpn_strides=[8],
        norm="GN",
        centerness_on_reg=False,
        norm_reg_targets=False,
    )
    nn.init.zeros_(head.bbox_pred.weight)
    nn.init.constant_(head.bbox_pred.bias, 12.0)
    with torch.autocast("cpu", dtype=torch.float16):
        _, box_reg, _ = head([torch.randn(1, 32, 4, 4)])
    assert box_reg[0].dtype == torch.float32
    assert torch.allclose(box_reg[0], torch.full_like(box_reg[0], float(np.exp(12.0))), rtol=1e-2)


@CUDA
def test_cuda_float16_amp_step_is_finite_and_the_scaler_steps() -> None:
    torch.manual_seed(0)
    model = build_model(embedded_cfg("MODEL.DEVICE", "cuda"))
    batch = shapes_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = resolve_precision("SOLVER.AMP", True, "auto", "cuda")
    assert precision.dtype == torch.float16
    trainer = FiniteLossAMPTrainer(model, itertools.repeat(batch), optimizer, precision)
    with EventStorage(0) as storage:
        for trainer.iter in range(3):
            storage.iter = trainer.iter
            trainer.run_step()
            assert np.isfinite(storage.history("total_loss").latest())
    state = trainer.grad_scaler.state_dict()
    # Every step either applied (tracker + 1) or overflowed (scale halved, tracker reset).
    assert state["_growth_tracker"] + round(np.log2(65536.0 / state["scale"])) >= 1


@CUDA
def test_cuda_test_amp_float16_detections_match_fp32(trained: Dict) -> None:
    model = trained["model"].cuda()
    batch = [{"image": b["image"].cuda()} for b in trained["batch"]]
    reference, mixed = _detections(model, batch), _detections(
        _with_test_amp(model, "float16"), batch
    )
    for ref, amp in zip(reference, mixed):
        ref = ref[ref.scores >= 0.3]
        iou = pairwise_iou(ref.pred_boxes, amp.pred_boxes)
        same = (ref.pred_classes[:, None] == amp.pred_classes[None, :]) & (iou >= 0.95)
        assert same.any(dim=1).all() and amp.scores.dtype == torch.float32
    trained["model"].cpu()
