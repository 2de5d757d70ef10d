"""Model GFLOPs (fvcore) and the fraction of this machine's measured float32 matmul peak that inference reaches.

    python -m bench.flops [--threads 1] [--json out.json]

fvcore's ``FlopCountAnalysis`` counts one fused multiply-add as one flop; the figures here are those
counts (GMACs) of the dense part -- backbone, FPN and head on the padded 800x1344 batch -- which is where
all but a few milliseconds of inference go (decoding and NMS are not counted). The peak is the best of
several 2048x2048 float32 matmuls with the same thread count; "achieved" divides 2 x MACs by the best
inference time of each model (full ``model(inputs)`` under ``inference_mode``, the two models' runs
interleaved). Times are CPU time of this process, which on a shared host leaves out the time other jobs
held the core.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from .common import (
    FULL_SIZE,
    build_ours,
    build_peer,
    inference_call,
    interleaved_times,
    machine_info,
    random_image,
    set_threads,
    write_json,
)

MATMUL_SIZE = 2048


class DenseForward(nn.Module):
    """Backbone + head of a detectron2 dense detector on an already normalised, padded batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tuple[List[Tensor], ...]:
        features = self.model.backbone(images)
        return self.model.head([features[name] for name in self.model.head_in_features])


def dense_gmacs(model: nn.Module, images: Tensor) -> float:
    counter = FlopCountAnalysis(DenseForward(model), (images,))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    return counter.total() / 1e9


def matmul_peak_gflops(repeats: int) -> float:
    """Best float32 GFLOP/s of a square matmul (2 n^3 flops), a practical ceiling for convolutions."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    seconds = interleaved_times({"matmul": lambda: a @ b}, warmup=1, repeats=repeats)["matmul"][
        "cpu"
    ]
    return 2 * MATMUL_SIZE**3 / min(seconds) / 1e9


def run(threads: int, repeats: int) -> Dict:
    set_threads(threads)
    height, width = FULL_SIZE
    inputs = [{"image": random_image(height, width, seed=0), "height": height, "width": width}]
    peak = matmul_peak_gflops(repeats=10)
    models = {"ours": build_ours().eval(), "peer": build_peer().eval()}
    result: Dict = {
        "benchmark": "flops",
        "size": list(FULL_SIZE),
        "matmul_peak_gflops": peak,
        "models": {},
    }
    runs = {name: inference_call(model, inputs) for name, model in models.items()}
    times = interleaved_times(runs, warmup=1, repeats=repeats)
    for name, model in models.items():
        gmacs = dense_gmacs(model, model.preprocess_image(inputs).tensor)
        seconds = min(times[name]["cpu"])
        achieved = 2 * gmacs / seconds
        result["models"][name] = {
            "gmacs": gmacs,
            "best_cpu_seconds": seconds,
            "achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak,
        }
    result["machine"] = machine_info(threads)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flops", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed inferences per model (best is used)"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.threads, args.repeats)
    print(f"float32 matmul peak: {result['matmul_peak_gflops']:.1f} GFLOP/s")
    for name, entry in result["models"].items():
        print(
            f"{name}: {entry['gmacs']:.1f} GMACs, best {entry['best_cpu_seconds']:.2f} s, "
            f"{entry['achieved_gflops']:.1f} GFLOP/s = {100 * entry['fraction_of_peak']:.0f}% of peak"
        )
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
