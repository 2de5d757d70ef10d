"""fcos.precision: the dtype SOLVER.AMP / TEST.AMP give on which hardware; the config checks."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from fcos.config import FCOSConfigError
from fcos.engine.config import SetupError, get_fcos_cfg
from fcos.engine.defaults import check_precision_config
from fcos.precision import native_cpu_support, resolve_precision, upcast

AMX = {"amx_bf16": True, "avx512_bf16": True, "amx_fp16": False}
AVX512_BF16_ONLY = {"avx512_bf16": True}
NO_BF16 = {"avx2": True, "avx512_f": True}  # e.g. an AMD EPYC of the Zen 2/3 generations


@pytest.mark.parametrize("key", ["SOLVER.AMP", "TEST.AMP"])
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16(key: str) -> None:
    precision = resolve_precision(key, True, "auto", "cpu", capabilities=AMX)
    assert precision.dtype == torch.bfloat16 and not precision.needs_grad_scaler
    assert precision.description == f"{key}: bfloat16 on cpu (native AMX-BF16)"
    assert precision.warning is None
    other = resolve_precision(key, True, "auto", "cpu", capabilities=AVX512_BF16_ONLY)
    assert other.dtype == torch.bfloat16 and "native AVX512-BF16" in other.description


def test_auto_stays_fp32_on_a_cpu_without_native_bf16_and_says_so() -> None:
    precision = resolve_precision("SOLVER.AMP", True, "auto", "cpu", capabilities=NO_BF16)
    assert precision.dtype is None and not precision.enabled
    assert precision.description.startswith("SOLVER.AMP: fp32: this CPU has no native bf16")
    assert "SOLVER.AMP.PRECISION bfloat16" in precision.description


def test_explicit_precision_is_obeyed_with_a_warning_where_it_is_emulated() -> None:
    forced = resolve_precision("SOLVER.AMP", True, "bfloat16", "cpu", capabilities=NO_BF16)
    assert forced.dtype == torch.bfloat16 and "slower than fp32" in forced.warning
    half = resolve_precision("SOLVER.AMP", True, "float16", "cpu", capabilities=AMX)
    assert half.dtype == torch.float16 and half.needs_grad_scaler and half.warning is not None


def test_cuda_auto_is_float16_with_a_grad_scaler_and_bfloat16_needs_support() -> None:
    train = resolve_precision("SOLVER.AMP", True, "auto", "cuda", cuda_bf16_supported=lambda: True)
    assert train.dtype == torch.float16 and train.needs_grad_scaler
    assert train.description == "SOLVER.AMP: float16 on cuda with a GradScaler"
    test = resolve_precision("TEST.AMP", True, "auto", "cuda", cuda_bf16_supported=lambda: True)
    assert test.description == "TEST.AMP: float16 on cuda"
    bf16 = resolve_precision("TEST.AMP", True, "bfloat16", "cuda", cuda_bf16_supported=lambda: True)
    assert bf16.dtype == torch.bfloat16
    with pytest.raises(
        FCOSConfigError, match=r"^TEST.AMP.PRECISION: this GPU does not support bfloat16"
    ):
        resolve_precision("TEST.AMP", True, "bfloat16", "cuda", cuda_bf16_supported=lambda: False)


def test_disabled_is_fp32_and_a_plain_context() -> None:
    precision = resolve_precision("TEST.AMP", False, "bfloat16", "cpu", capabilities=AMX)
    assert precision.dtype is None
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), precision.autocast():
        # fp32 precision leaves a caller's own autocast in force.
        assert conv(torch.randn(1, 3, 5, 5)).dtype == torch.bfloat16
    enabled = resolve_precision("TEST.AMP", True, "bfloat16", "cpu", capabilities=AMX)
    with enabled.autocast():
        assert conv(torch.randn(1, 3, 5, 5)).dtype == torch.bfloat16


@pytest.mark.skipif(
    not Path("/proc/cpuinfo").exists() or platform.machine() not in ("x86_64", "AMD64"),
    reason="cross-checks against the x86 flags of /proc/cpuinfo (Linux)",
)
def test_native_bf16_detection_agrees_with_proc_cpuinfo() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    expected = (
        "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    )
    assert native_cpu_support(torch.bfloat16) == expected


def test_unknown_precision_is_a_setup_error_naming_the_key() -> None:
    cfg = get_fcos_cfg()
    cfg.MODEL.DEVICE = "cpu"
    check_precision_config(cfg)
    cfg.TEST.AMP.PRECISION = "fp8"
    with pytest.raises(
        SetupError, match=r"^TEST.AMP.PRECISION: unknown precision 'fp8'; choose one of"
    ):
        check_precision_config(cfg)
    cfg.TEST.AMP.PRECISION = "auto"
    cfg.SOLVER.AMP.PRECISION = "half"
    with pytest.raises(SetupError, match=r"^SOLVER.AMP.PRECISION: unknown precision 'half'"):
        check_precision_config(cfg)


def test_upcast_converts_nested_floating_tensors_only() -> None:
    half = torch.ones(2, dtype=torch.bfloat16)
    index = torch.arange(2)
    out = upcast([[half, index], [half]])
    assert out[0][0].dtype == torch.float32 and out[0][1].dtype == torch.int64
    assert out[1][0].dtype == torch.float32 and torch.equal(out[1][0], torch.ones(2))
