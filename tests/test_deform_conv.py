"""The deformable tower conv (MODEL.FCOS.USE_DCN_IN_TOWER) on hand-checked tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from fcos.deform_conv import ModulatedDeformConv2d
from fcos.head import FCOSHead

# Channels of the centre tap (index 4 of 3x3): dy at 2*4, dx at 2*4+1, mask logit at 18+4.
CENTRE_DY, CENTRE_DX, CENTRE_MASK = 8, 9, 22
IMAGE = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _centre_tap_conv() -> ModulatedDeformConv2d:
    """1 -> 1 channel conv, only the centre tap's weight non-zero (1): output = the sample at p."""
    conv = ModulatedDeformConv2d(1, 1, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
    return conv


def _with_offset_bias(
    conv: ModulatedDeformConv2d, channel: int, value: float
) -> ModulatedDeformConv2d:
    """Constant offset/mask logit on one channel (the offset conv's weights stay 0)."""
    with torch.no_grad():
        conv.offset.bias[channel] = value
    return conv


def test_starts_as_the_plain_conv_with_unit_masks() -> None:
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(4, 6, 3)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 7, 5)
    offset, mask = conv.offsets_and_mask(x)
    assert offset.shape == (2, 18, 7, 5) and mask.shape == (2, 9, 7, 5)
    assert torch.equal(offset, torch.zeros_like(offset))
    assert torch.equal(mask, torch.ones_like(mask))
    plain = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(conv(x), plain, atol=1e-6)


def test_integer_offset_of_one_pixel_samples_the_next_row_and_column() -> None:
    down = _with_offset_bias(_centre_tap_conv(), CENTRE_DY, 1.0)(IMAGE)
    # Each output reads the pixel one row below; below the last row is zero padding.
    assert down[0, 0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]
    right = _with_offset_bias(_centre_tap_conv(), CENTRE_DX, 1.0)(IMAGE)
    assert right[0, 0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]


def test_half_pixel_offset_interpolates_bilinearly() -> None:
    out = _with_offset_bias(_centre_tap_conv(), CENTRE_DX, 0.5)(IMAGE)
    # Halfway to the right neighbour: (x[i, j] + x[i, j+1]) / 2, with zero beyond the border.
    expected = torch.tensor([[1.5, 2.5, 1.5], [4.5, 5.5, 3.0], [7.5, 8.5, 4.5]])
    assert torch.allclose(out[0, 0], expected, atol=1e-6)
    # A quarter pixel down and half right: bilinear weights 0.75/0.25 rows x 0.5/0.5 columns.
    conv = _with_offset_bias(_with_offset_bias(_centre_tap_conv(), CENTRE_DX, 0.5), CENTRE_DY, 0.25)
    expected = 0.75 * (1 + 2) / 2 + 0.25 * (4 + 5) / 2
    assert conv(IMAGE)[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_mask_modulates_each_tap() -> None:
    # 2 * sigmoid(-log 3) = 2 * 0.25 = 0.5: the centre tap counts half.
    out = _with_offset_bias(_centre_tap_conv(), CENTRE_MASK, -math.log(3.0))(IMAGE)
    assert torch.allclose(out, IMAGE * 0.5, atol=1e-6)


def test_every_tap_shifts_like_a_shifted_input() -> None:
    """A general 3x3 weight with dy = +1 on all taps equals the plain conv of the image moved up."""
    torch.manual_seed(1)
    conv = ModulatedDeformConv2d(2, 3, 3)
    with torch.no_grad():
        conv.bias.normal_()
        conv.offset.bias[0:18:2] = 1.0
    x = torch.randn(1, 2, 5, 6)
    # No zero row on top, two below: output row i sees input rows i, i+1, i+2 (zero outside).
    moved_up = F.conv2d(F.pad(x, (1, 1, 0, 2)), conv.weight, conv.bias)
    assert torch.allclose(conv(x), moved_up, atol=1e-5)


def test_gradients_reach_the_offset_and_mask_predictor_at_zero_init() -> None:
    torch.manual_seed(2)
    conv = ModulatedDeformConv2d(2, 2, 3)
    x = torch.randn(1, 2, 6, 6)
    (conv(x) * torch.randn(1, 2, 6, 6)).sum().backward()
    grad = conv.offset.weight.grad
    assert grad is not None
    assert grad[:18].abs().sum() > 0, "offset rows"
    assert grad[18:].abs().sum() > 0, "mask rows"
    assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0


def test_channels_last_input_gives_the_same_result() -> None:
    """CPU inference runs NHWC (fcos/meta_arch.py); the deformable conv must not depend on it."""
    torch.manual_seed(3)
    conv = ModulatedDeformConv2d(2, 2, 3)
    with torch.no_grad():
        conv.offset.weight.normal_(0, 0.3)
    x = torch.randn(1, 2, 6, 7)
    assert torch.allclose(conv(x.contiguous(memory_format=torch.channels_last)), conv(x), atol=1e-6)


def _head(use_dcn: bool) -> FCOSHead:
    torch.manual_seed(0)
    return FCOSHead(
        [ShapeSpec(channels=32, stride=8)] * 2,
        num_classes=3,
        num_convs=2,
        prior_prob=0.01,
        fpn_strides=[8, 16],
        norm="GN",
        centerness_on_reg=True,
        norm_reg_targets=True,
        use_dcn_in_tower=use_dcn,
    )


def test_head_keys_and_initial_outputs_match_the_plain_head() -> None:
    plain, deformable = _head(False), _head(True)
    plain_keys, dcn_keys = set(plain.state_dict()), set(deformable.state_dict())
    # The deformable conv (index 3, the last of 2) keeps the plain conv's keys, adds its offset.
    towers, params = ("cls_subnet", "bbox_subnet"), ("weight", "bias")
    assert dcn_keys - plain_keys == {f"{t}.3.offset.{p}" for t in towers for p in params}
    assert plain_keys <= dcn_keys
    assert isinstance(deformable.cls_subnet[3], ModulatedDeformConv2d)
    assert not isinstance(deformable.cls_subnet[0], ModulatedDeformConv2d)
    # Same weights -> same outputs: the deformable tower starts as the plain one.
    deformable.load_state_dict(plain.state_dict(), strict=False)
    features = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    for ours, reference in zip(deformable(features), plain(features)):
        for a, b in zip(ours, reference):
            assert torch.allclose(a, b, atol=1e-5)
