"""Mixed precision: which autocast dtype a run gets on its device, and why.

``SOLVER.AMP`` (training) and ``TEST.AMP`` (inference) both have ``ENABLED`` and ``PRECISION``:

* ``"auto"``: float16 on CUDA (training adds a GradScaler: float16 gradients underflow without
  one), bfloat16 on a CPU with native bf16 instructions (AMX-BF16, AVX512-BF16, Arm BF16). A CPU
  without them runs bf16 through oneDNN's emulation, which is slower than fp32, so "auto" stays in
  fp32 there and says so.
* ``"float16"`` / ``"bfloat16"``: that dtype on any device that can run it, with a warning where it
  is emulated (slow) rather than native.

Autocast covers the network (convolutions, matmuls); FCOS computes its losses and its decoding in
fp32 from upcast predictions (``fcos.losses``, ``fcos.meta_arch``), so only the network loses
precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Mapping, Optional, Sequence, TypeVar

import torch

from .config import FCOSConfigError

PRECISIONS = ("auto", "float16", "bfloat16")
DTYPES: Dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Capability flag -> name, most capable first (torch.cpu.get_capabilities keys).
_NATIVE_CPU = {
    torch.bfloat16: (
        ("amx_bf16", "AMX-BF16"),
        ("avx512_bf16", "AVX512-BF16"),
        ("sve_bf16", "SVE-BF16"),
        ("bf16", "Arm BF16"),
    ),
    torch.float16: (("amx_fp16", "AMX-FP16"), ("fp16_arith", "Arm FP16")),
}
# Older torch without get_capabilities: its private probes (present since torch 2.1).
_PROBES = {
    "amx_bf16": "_is_amx_tile_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}

T = TypeVar("T")


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one run on one device type.

    Attributes:
        device_type: "cpu", "cuda", ...; what ``torch.autocast`` takes.
        dtype: the autocast dtype, or None for plain fp32 (no autocast).
        description: one log line saying which path runs and why.
        warning: set when the choice is legal but likely slow; log it as a warning.
    """

    device_type: str
    dtype: Optional[torch.dtype]
    description: str
    warning: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_grad_scaler(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has fp32's exponent range."""
        return self.dtype == torch.float16

    def autocast(self) -> ContextManager:
        """``torch.autocast`` for this precision; for fp32 a no-op (a caller's autocast stays)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def cpu_capabilities() -> Mapping[str, object]:
    """This CPU's instruction-set flags (``torch.cpu.get_capabilities`` or older torch's probes)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return get()
    return {
        flag: bool(getattr(torch.cpu, probe, lambda: False)()) for flag, probe in _PROBES.items()
    }


def native_cpu_support(
    dtype: torch.dtype, capabilities: Optional[Mapping[str, object]] = None
) -> Optional[str]:
    """Name of the CPU feature that runs ``dtype`` matmuls natively (e.g. "AMX-BF16"), or None."""
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    for flag, name in _NATIVE_CPU.get(dtype, ()):
        if capabilities.get(flag):
            return name
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _resolve_cpu(key: str, precision: str, capabilities: Mapping[str, object]) -> Precision:
    if precision == "auto":
        native = native_cpu_support(torch.bfloat16, capabilities)
        if native is None:
            return Precision(
                "cpu",
                None,
                f"{key}: fp32: this CPU has no native bf16 (AMX-BF16/AVX512-BF16), where bfloat16 "
                f"is slower than fp32; set {key}.PRECISION bfloat16 to force it",
            )
        return Precision("cpu", torch.bfloat16, f"{key}: bfloat16 on cpu (native {native})")
    dtype = DTYPES[precision]
    native = native_cpu_support(dtype, capabilities)
    if native is not None:
        return Precision("cpu", dtype, f"{key}: {precision} on cpu (native {native})")
    return Precision(
        "cpu",
        dtype,
        f"{key}: {precision} on cpu (emulated)",
        warning=f"{key}.PRECISION {precision}: this CPU has no native {precision} instructions; "
        "expect it to be slower than fp32 (float16 convolutions: ~100x, torch 2.14 reference "
        "kernels)",
    )


def _resolve_cuda(key: str, precision: str, bf16_supported: Callable[[], bool]) -> Precision:
    dtype = torch.float16 if precision == "auto" else DTYPES[precision]
    if dtype == torch.bfloat16 and not bf16_supported():
        raise FCOSConfigError(
            f"{key}.PRECISION: this GPU does not support bfloat16; use float16 or auto"
        )
    scaler = " with a GradScaler" if key.startswith("SOLVER") and dtype == torch.float16 else ""
    return Precision("cuda", dtype, f"{key}: {_name(dtype)} on cuda{scaler}")


def check_precision(key: str, precision: str) -> None:
    """Reject a ``PRECISION`` value outside ``PRECISIONS`` (``key`` is e.g. "SOLVER.AMP")."""
    if precision not in PRECISIONS:
        raise FCOSConfigError(
            f"{key}.PRECISION: unknown precision {precision!r}; choose one of {list(PRECISIONS)}"
        )


def resolve_precision(
    key: str,
    enabled: bool,
    precision: str,
    device_type: str,
    *,
    capabilities: Optional[Mapping[str, object]] = None,
    cuda_bf16_supported: Optional[Callable[[], bool]] = None,
) -> Precision:
    """The precision ``key`` ("SOLVER.AMP" or "TEST.AMP") asks for on ``device_type``.

    Args:
        capabilities, cuda_bf16_supported: the hardware probes (default: this machine's); tests
            pass others.
    Raises:
        FCOSConfigError: an unknown ``precision``, bfloat16 on a GPU without it, or a device type
            without autocast.
    """
    check_precision(key, precision)
    if not enabled:
        return Precision(device_type, None, f"{key}: fp32 ({key}.ENABLED is off)")
    if device_type == "cpu":
        found = cpu_capabilities() if capabilities is None else capabilities
        return _resolve_cpu(key, precision, found)
    if device_type == "cuda":
        return _resolve_cuda(key, precision, cuda_bf16_supported or torch.cuda.is_bf16_supported)
    raise FCOSConfigError(
        f"{key}.ENABLED: mixed precision is supported on cpu and cuda, not {device_type}"
    )


def upcast(tensors: Sequence[T]) -> list:
    """Nested lists of tensors with every floating tensor in float32 (others untouched)."""
    out = []
    for item in tensors:
        if isinstance(item, torch.Tensor):
            out.append(item.float() if item.is_floating_point() else item)
        else:
            out.append(upcast(item))
    return out
