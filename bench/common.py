"""What the benchmarks share: the two models, synthetic inputs, interleaved timing, result files.

"Ours" is ``configs/fcos_R_50_FPN.yaml`` (the project default); the peer is detectron2 0.6's own FCOS
from its model zoo LazyConfig ``COCO-Detection/fcos_R_50_FPN_1x.py`` (R-50-FPN, P3-P7, GN head with 4
convs, 80 classes). Both start from random weights: no checkpoint can be downloaded here, and speed does
not depend on the weight values except through how many candidates survive decoding, which the
inference benchmark equalises explicitly (see ``bench/inference.py``).

``--precision`` runs ours under mixed precision (``TEST.AMP`` / ``SOLVER.AMP``'s autocast) while
the peer stays in fp32, the comparison a user choosing between the two makes; ``--device cuda`` runs
both on the GPU, with ``torch.cuda.synchronize()`` closing every timed call.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, instantiate
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from fcos.engine.config import get_fcos_cfg

try:  # POSIX; Windows has no `resource` module and answers through its process API instead.
    import resource
except ModuleNotFoundError:
    resource = None

REPO = Path(__file__).resolve().parents[1]
OURS_CONFIG = REPO / "configs" / "fcos_R_50_FPN.yaml"
PEER_CONFIG = "COCO-Detection/fcos_R_50_FPN_1x.py"
# The peer's LazyConfig freezes the stem and res2 (FREEZE_AT 2); ours is given the same so that a
# training step updates the same layers in both (the seed config's FREEZE_AT 3 would flatter ours).
PEER_FREEZE_AT = 2
FULL_SIZE = (800, 1333)
# --precision values: fp32 (no autocast) or an autocast dtype of fcos.precision.
BENCH_PRECISIONS = ("fp32", "float16", "bfloat16")


def ours_cfg(opts: Sequence[str] = (), device: str = "cpu", precision: str = "fp32") -> CfgNode:
    """The project's default R-50 config on ``device``, no weights file, the peer's FREEZE_AT,
    inference in ``precision`` (``TEST.AMP``); ``opts`` last."""
    cfg = get_fcos_cfg()
    cfg.merge_from_file(str(OURS_CONFIG))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.TEST.AMP.ENABLED = precision != "fp32"
    cfg.TEST.AMP.PRECISION = precision if precision != "fp32" else "auto"
    cfg.MODEL.BACKBONE.FREEZE_AT = PEER_FREEZE_AT
    cfg.merge_from_list(list(opts))
    return cfg


def build_ours(
    opts: Sequence[str] = (), seed: int = 0, device: str = "cpu", precision: str = "fp32"
) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ours_cfg(opts, device, precision))


def build_peer(seed: int = 0, device: str = "cpu") -> nn.Module:
    """detectron2's FCOS exactly as its model-zoo LazyConfig defines it (fp32)."""
    torch.manual_seed(seed)
    return instantiate(model_zoo.get_config(PEER_CONFIG).model).to(device)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timing covers it (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A (3, H, W) float image in [0, 255], the format detectron2's mappers produce."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def random_instances(
    image_size: Tuple[int, int], num_boxes: int, seed: int, num_classes: int = 80
) -> Instances:
    """GT boxes with uniform centres and log-uniform sides (8 px to half the short image side)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    centers = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([width, height])
    log_lo, log_hi = torch.log(torch.tensor(8.0)), torch.log(torch.tensor(min(image_size) / 2))
    sides = torch.exp(log_lo + torch.rand(num_boxes, 2, generator=generator) * (log_hi - log_lo))
    boxes = torch.cat((centers - sides / 2, centers + sides / 2), dim=1)
    boxes = Boxes(boxes)
    boxes.clip(image_size)
    instances = Instances(image_size)
    instances.gt_boxes = boxes
    instances.gt_classes = torch.randint(num_classes, (num_boxes,), generator=generator)
    return instances


def inference_call(
    model: nn.Module, inputs: List[Dict[str, Any]], device: str = "cpu"
) -> Callable[[], None]:
    """A no-argument callable running ``model(inputs)`` under ``torch.inference_mode`` (for timing)."""

    def call() -> None:
        with torch.inference_mode():
            model(inputs)
        synchronize(device)

    return call


def interleaved_times(
    runs: Dict[str, Callable[[], Any]], *, warmup: int, repeats: int
) -> Dict[str, Dict[str, List[float]]]:
    """Wall and CPU seconds per call of each function, calls interleaved (A B A B ...).

    Interleaving makes load drift hit every function alike. CPU time (this process's) is reported next
    to wall time because on a shared host it leaves out the time spent waiting for a core.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: Dict[str, Dict[str, List[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def summarize(seconds: Sequence[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "runs": len(seconds),
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    ``ru_maxrss`` where ``resource`` exists (Linux reports KiB, macOS bytes); on Windows the peak
    working set, which is the same quantity (the most physical memory the process ever held).
    """
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return _windows_peak_working_set() / (1024 * 1024)


def _windows_peak_working_set() -> int:
    """``PeakWorkingSetSize`` in bytes from ``K32GetProcessMemoryInfo`` (kernel32, Windows 7+)."""
    import ctypes
    from ctypes import wintypes

    class ProcessMemoryCounters(ctypes.Structure):
        # PROCESS_MEMORY_COUNTERS from psapi.h, in its declared order.
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t)
            for name in (
                "PeakWorkingSetSize",
                "WorkingSetSize",
                "QuotaPeakPagedPoolUsage",
                "QuotaPagedPoolUsage",
                "QuotaPeakNonPagedPoolUsage",
                "QuotaNonPagedPoolUsage",
                "PagefileUsage",
                "PeakPagefileUsage",
            )
        ]

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    query = kernel32.K32GetProcessMemoryInfo
    query.argtypes = [wintypes.HANDLE, ctypes.POINTER(ProcessMemoryCounters), wintypes.DWORD]
    query.restype = wintypes.BOOL
    counters = ProcessMemoryCounters(cb=ctypes.sizeof(ProcessMemoryCounters))
    if not query(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        raise ctypes.WinError(ctypes.get_last_error())
    return counters.PeakWorkingSetSize


def gpu_name(device: str) -> str | None:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None


def machine_info(threads: int, device: str = "cpu") -> Dict[str, Any]:
    """What a reader needs to compare these numbers with theirs; load average shows how busy the host was."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
        "gpu": gpu_name(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit or "unknown",
    }


def set_threads(threads: int) -> None:
    """Same intra-op thread count for every model in a benchmark (a fair race, and less noise on a shared host)."""
    if threads < 1:
        raise ValueError(f"--threads: {threads} must be >= 1")
    torch.set_num_threads(threads)


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a result behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
