"""Training-step time of ours vs detectron2's FCOS: forward + backward + SGD step, batch 2, interleaved runs.

    python -m bench.train_step [--threads 1] [--sizes 800x1333,512x853] [--repeats 5] [--json out.json]
    python -m bench.train_step --precision bfloat16    # ours in SOLVER.AMP's bf16 step, peer fp32
    python -m bench.train_step --device cuda --precision float16

Both models train the same layers (stem and res2 frozen, FrozenBN backbone, GN head) on the same two
synthetic images with the same random GT boxes. The learning rate is tiny so that the weights, and with
them the work per step, stay the same across the timed steps. With ``--precision`` ours steps as the
project's AMP trainer does (autocast, fp32 losses, GradScaler for float16); the peer stays in fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.utils.events import EventStorage
from torch import nn

from fcos.precision import resolve_precision

from .common import (
    BENCH_PRECISIONS,
    FULL_SIZE,
    build_ours,
    build_peer,
    interleaved_times,
    machine_info,
    random_image,
    random_instances,
    set_threads,
    summarize,
    synchronize,
    write_json,
)
from .inference import parse_size

SMALL_SIZE = (512, 853)
BATCH_SIZE = 2


def train_step(
    model: nn.Module, batch: List[Dict], device: str = "cpu", precision: str = "fp32"
) -> Callable[[], None]:
    """One SGD step (momentum 0.9, weight decay 1e-4, lr 1e-6) of ``model`` on ``batch``, under
    ``SOLVER.AMP``'s autocast and GradScaler for ``precision`` (the AMP trainer's step)."""
    model.train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9, weight_decay=1e-4
    )
    mixed = precision != "fp32"
    device_type = torch.device(device).type
    amp = resolve_precision("SOLVER.AMP", mixed, precision if mixed else "auto", device_type)
    scaler = torch.amp.GradScaler(amp.device_type, enabled=amp.needs_grad_scaler)

    def step() -> None:
        # detectron2's FCOS logs to the event storage inside its loss; ours does not need one.
        with EventStorage(0), amp.autocast():
            losses = sum(model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)

    return step


def run_size(
    size: Tuple[int, int],
    boxes: int,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> Dict:
    batch = [
        {"image": random_image(*size, seed=i), "instances": random_instances(size, boxes, seed=i)}
        for i in range(BATCH_SIZE)
    ]
    steps = {
        "ours": train_step(build_ours(device=device), batch, device, precision),
        "peer": train_step(build_peer(device=device), batch, device),
    }
    times = interleaved_times(steps, warmup=warmup, repeats=repeats)
    result = {
        "size": list(size),
        "wall": {name: summarize(t["wall"]) for name, t in times.items()},
        "cpu": {name: summarize(t["cpu"]) for name, t in times.items()},
    }
    for clock in ("wall", "cpu"):
        result[f"ratio_{clock}_median"] = (
            result[clock]["ours"]["median"] / result[clock]["peer"]["median"]
        )
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_step", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both models (default 1)"
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(s) for s in text.split(",")],
        default=[FULL_SIZE, SMALL_SIZE],
        help="comma-separated HEIGHTxWIDTH list (default 800x1333,512x853)",
    )
    parser.add_argument("--boxes", type=int, default=20, help="GT boxes per image (default 20)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--precision",
        choices=BENCH_PRECISIONS,
        default="fp32",
        help="ours in SOLVER.AMP's dtype; the peer runs fp32 (default fp32)",
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    result = {
        "benchmark": "train_step",
        "precision": args.precision,
        "batch_size": BATCH_SIZE,
        "boxes_per_image": args.boxes,
        "sizes": [
            run_size(size, args.boxes, args.warmup, args.repeats, args.device, args.precision)
            for size in args.sizes
        ],
        "machine": machine_info(args.threads, args.device),
    }
    for entry in result["sizes"]:
        for clock in ("wall", "cpu"):
            stats = entry[clock]
            print(
                f"{entry['size'][0]}x{entry['size'][1]} {clock:4s}: ours ({args.precision}) "
                f"{stats['ours']['median']:.2f} s "
                f"(min {stats['ours']['min']:.2f}), peer {stats['peer']['median']:.2f} s "
                f"(min {stats['peer']['min']:.2f}), ratio {entry[f'ratio_{clock}_median']:.3f}"
            )
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
