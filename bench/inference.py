"""Inference time of ours vs detectron2's FCOS: R-50-FPN, batch 1, ``torch.inference_mode``, interleaved runs.

    python -m bench.inference [--threads 1] [--repeats 10] [--json out.json]
    python -m bench.inference --precision bfloat16    # ours under TEST.AMP bf16, the peer fp32
    python -m bench.inference --device cuda --precision float16

Random weights leave every class probability near PRIOR_PROB (0.01), so neither model would keep a
single candidate and decoding would cost nothing. To compare the models under the same, realistic
decoding load, each model's class-logit bias is shifted (one scalar for all classes) until the same
fraction of (point, class) pairs passes *that model's own* test threshold: ours keeps prob > 0.05
(then top 1000 per level), the peer keeps sqrt(prob * centerness) > 0.2 (then top 1000). The default
fraction, 1% (about 18,000 candidates over the five levels), makes the top-1000 cut bite on the large
levels for both, as a trained model does on a busy image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .common import (
    BENCH_PRECISIONS,
    FULL_SIZE,
    build_ours,
    build_peer,
    inference_call,
    interleaved_times,
    machine_info,
    random_image,
    set_threads,
    summarize,
    write_json,
)

Inputs = List[Dict[str, object]]


def head_outputs(model: nn.Module, inputs: Inputs) -> Tuple[List[Tensor], List[Tensor]]:
    """Class logits and centerness logits of every level, (N, K, H, W) and (N, 1, H, W)."""
    captured: Dict[str, Tuple[List[Tensor], List[Tensor]]] = {}

    def keep(_module: nn.Module, _inputs: object, output: Tuple[List[Tensor], ...]) -> None:
        # Copies: detectron2's FCOS applies sigmoid_ in place to views of these maps after the head.
        # fp32 copies: under TEST.AMP the maps are bf16/fp16, and decoding compares them in fp32.
        captured["out"] = ([x.float() for x in output[0]], [x.float() for x in output[2]])

    handle = model.head.register_forward_hook(keep)
    try:
        with torch.inference_mode():
            model(inputs)
    finally:
        handle.remove()
    return captured["out"]


def calibrate_class_bias(
    model: nn.Module, inputs: Inputs, passes: Callable[[Tensor, Tensor], Tensor], fraction: float
) -> float:
    """Set ``head.cls_score.bias`` to the value that makes ``fraction`` of (point, class) pairs pass.

    Args:
        passes: (logits, centerness logits) of one level -> boolean mask of the candidates the model keeps.
    Returns:
        the bias chosen (found by bisection; the pass count only grows with the bias).
    """
    logits, centerness = head_outputs(model, inputs)
    old_bias = model.head.cls_score.bias.detach()[None, :, None, None]
    logits = [x - old_bias for x in logits]
    total = sum(x.numel() for x in logits)

    def passing(bias: float) -> float:
        return sum(int(passes(x + bias, c).sum()) for x, c in zip(logits, centerness)) / total

    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if passing(mid) >= fraction else (mid, hi)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(hi)
    return hi


def ours_passes(score_thresh: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda logits, _centerness: logits.sigmoid() > score_thresh


def peer_passes(score_thresh: float) -> Callable[[Tensor, Tensor], Tensor]:
    return (
        lambda logits, centerness: torch.sqrt(logits.sigmoid() * centerness.sigmoid())
        > score_thresh
    )


def run(
    threads: int,
    size: Tuple[int, int],
    warmup: int,
    repeats: int,
    fraction: float,
    device: str = "cpu",
    precision: str = "fp32",
) -> Dict:
    set_threads(threads)
    height, width = size
    inputs: Inputs = [
        {"image": random_image(height, width, seed=0), "height": height, "width": width}
    ]
    models = {
        "ours": build_ours(device=device, precision=precision).eval(),
        "peer": build_peer(device=device).eval(),
    }
    biases = {
        "ours": calibrate_class_bias(
            models["ours"], inputs, ours_passes(models["ours"].score_thresh_test), fraction
        ),
        "peer": calibrate_class_bias(
            models["peer"], inputs, peer_passes(models["peer"].test_score_thresh), fraction
        ),
    }
    detections = {}
    for name, model in models.items():
        with torch.inference_mode():
            detections[name] = len(model(inputs)[0]["instances"])
    times = interleaved_times(
        {name: inference_call(m, inputs, device) for name, m in models.items()},
        warmup=warmup,
        repeats=repeats,
    )
    result = {
        "benchmark": "inference",
        "precision": precision,
        "size": list(size),
        "candidate_fraction": fraction,
        "class_bias": biases,
        "detections": detections,
        "wall": {name: summarize(t["wall"]) for name, t in times.items()},
        "cpu": {name: summarize(t["cpu"]) for name, t in times.items()},
        "machine": machine_info(threads, device),
    }
    for clock in ("wall", "cpu"):
        result[f"ratio_{clock}_median"] = (
            result[clock]["ours"]["median"] / result[clock]["peer"]["median"]
        )
    return result


def parse_size(text: str) -> Tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 800x1333") from None
    return height, width


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inference", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both models (default 1)"
    )
    parser.add_argument(
        "--size", type=parse_size, default=FULL_SIZE, help="HEIGHTxWIDTH (default 800x1333)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--candidate-fraction", type=float, default=0.01)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--precision",
        choices=BENCH_PRECISIONS,
        default="fp32",
        help="ours under TEST.AMP in this dtype; the peer runs fp32 (default fp32)",
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(
        args.threads,
        args.size,
        args.warmup,
        args.repeats,
        args.candidate_fraction,
        args.device,
        args.precision,
    )
    for clock in ("wall", "cpu"):
        stats = result[clock]
        print(
            f"{clock:4s}: ours ({args.precision}) "
            f"{stats['ours']['median']:.3f} s (min {stats['ours']['min']:.3f}), "
            f"peer {stats['peer']['median']:.3f} s (min {stats['peer']['min']:.3f}), "
            f"ratio {result[f'ratio_{clock}_median']:.3f}"
        )
    print(f"detections: {result['detections']}, class bias: {result['class_bias']}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
