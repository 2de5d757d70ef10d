"""Modulated deformable convolution (DCNv2) for the head towers (``MODEL.FCOS.USE_DCN_IN_TOWER``).

Built on ``torchvision.ops.deform_conv2d``, which has CPU and CUDA kernels: detectron2's own
``ModulatedDeformConv`` needs its C++ extension, which the patched detectron2 build here lacks.

The structure is the official FCOS ``DFConv2d`` (modulated): a plain conv ``offset`` predicts, per
output position, 2*k*k sampling offsets in pixels ((dy, dx) per kernel tap, the layout of both
torchvision and the official CUDA kernel) followed by k*k modulation logits. The deformable conv's
own ``weight``/``bias`` sit directly on the module, so its keys are those of the plain conv it
replaces (``head.cls_subnet.9.weight``) plus ``.offset.weight``/``.offset.bias``.

The modulation is ``2 * sigmoid(logit)`` instead of DCNv2's ``sigmoid(logit)``: with the offset conv
initialised to zero every offset is 0 and every mask exactly 1, so the layer starts as the plain
conv with the same weights (with a plain sigmoid it would start at half of it). Official
checkpoints are converted by halving the deformable ``weight`` (``fcos.checkpoint_layouts``), which
gives exactly the official function: W/2 * 2*sigmoid(m) = W * sigmoid(m).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

# ONNX DeformConv (which onnxruntime runs) exists from this opset on.
ONNX_DEFORM_CONV_OPSET = 19
# Official DFConv2d (sigmoid mask, weight W) = ours (2 * sigmoid mask) with weight W * this.
OFFICIAL_WEIGHT_FACTOR = 0.5


class ModulatedDeformConv2d(nn.Module):
    """k x k DCNv2 conv, stride 1, 'same' padding, one offset group; starts as the plain conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        taps = kernel_size * kernel_size
        self.offset = nn.Conv2d(in_channels, 3 * taps, kernel_size, 1, self.padding)
        # nn.Conv2d's default initialisation (FCOSHead re-initialises its convs anyway).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_offset()

    def reset_offset(self) -> None:
        """Zero offsets and unit masks everywhere: the layer computes the plain convolution."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def offsets_and_mask(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(N, 2*k*k, H, W) offsets in pixels and (N, k*k, H, W) modulation in (0, 2)."""
        offset_mask = self.offset(x)
        taps = self.kernel_size * self.kernel_size
        return offset_mask[:, : 2 * taps], 2.0 * offset_mask[:, 2 * taps :].sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offsets_and_mask(x)
        padding = (self.padding, self.padding)
        return deform_conv2d(x, offset, self.weight, self.bias, padding=padding, mask=mask)


def _onnx_deform_conv(
    g,
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    n_weight_grps,
    n_offset_grps,
    use_mask,
):
    """``torchvision::deform_conv2d`` as ONNX DeformConv (same offset/mask layout)."""
    inputs = (input, weight, offset, bias, mask) if use_mask else (input, weight, offset, bias)
    return g.op(
        "DeformConv",
        *inputs,
        strides_i=[stride_h, stride_w],
        pads_i=[pad_h, pad_w, pad_h, pad_w],
        dilations_i=[dil_h, dil_w],
        group_i=n_weight_grps,
        offset_group_i=n_offset_grps,
    )


def register_onnx_deform_conv() -> None:
    """Let the TorchScript-based ONNX exporter write torchvision's deform_conv2d as DeformConv."""
    from torch.onnx.symbolic_helper import parse_args

    arg_kinds = ("v",) * 5 + ("i",) * 8 + ("b",)
    symbolic = parse_args(*arg_kinds)(_onnx_deform_conv)
    torch.onnx.register_custom_op_symbolic(
        "torchvision::deform_conv2d", symbolic, ONNX_DEFORM_CONV_OPSET
    )
