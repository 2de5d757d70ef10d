"""Time and peak memory of FCOS target assignment for 10 / 100 / 1,000 / 5,000 GT boxes on 800x1333.

    python -m bench.assign [--counts 10,100,1000,5000] [--repeats 3] [--json out.json]

Each case runs in a fresh process, because a process's peak resident memory (ru_maxrss) only ever
grows; the figure reported is that peak minus the peak reached before assignment (imports, grid, one
warm-up call with a single box). The assigner is the default config's (center sampling 1.5, P3-P7),
once with its bounded chunks and once "unchunked" (every GT box in one chunk, the dense points x GT
memory of the reference implementation) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import (
    FULL_SIZE,
    REPO,
    machine_info,
    ours_cfg,
    peak_rss_mib,
    random_instances,
    set_threads,
    summarize,
    write_json,
)

DEFAULT_COUNTS = (10, 100, 1000, 5000)
MODES = {"chunked": None, "unchunked": 1 << 62}
SIZE_DIVISIBILITY = 32


def level_sizes(image_size: Tuple[int, int], strides: Sequence[int]) -> List[Tuple[int, int]]:
    """Feature-map sizes of the padded image at each stride (stride-2 convs with padding round up)."""
    height, width = (math.ceil(v / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for v in image_size)
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def measure_case(num_boxes: int, mode: str, repeats: int) -> Dict:
    """One case in this process: peak-memory growth of the first call, then timed repeats."""
    from fcos.targets import FCOSTargetAssigner, grid_points

    fc = ours_cfg().MODEL.FCOS
    chunk = MODES[mode] if MODES[mode] is not None else fc.ASSIGNMENT_CHUNK_ELEMENTS
    assigner = FCOSTargetAssigner(
        num_classes=fc.NUM_CLASSES,
        strides=fc.FPN_STRIDES,
        sizes_of_interest=fc.OBJECT_SIZES_OF_INTEREST,
        center_sampling_radius=fc.CENTER_SAMPLING_RADIUS,
        chunk_elements=chunk,
    )
    points = grid_points(
        level_sizes(FULL_SIZE, fc.FPN_STRIDES), fc.FPN_STRIDES, fc.GRID_OFFSET, torch.device("cpu")
    )
    instances = [random_instances(FULL_SIZE, num_boxes, seed=num_boxes)]
    assigner(points, [random_instances(FULL_SIZE, 1, seed=1)])
    before = peak_rss_mib()
    targets = assigner(points, instances)
    peak = peak_rss_mib() - before
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        assigner(points, instances)
        seconds.append(time.perf_counter() - start)
    return {
        "boxes": num_boxes,
        "mode": mode,
        "points": sum(len(p) for p in points),
        "foreground": int((targets.classes != fc.NUM_CLASSES).sum()),
        "seconds": summarize(seconds),
        "peak_mib": peak,
    }


def run_in_subprocess(num_boxes: int, mode: str, repeats: int, threads: int) -> Dict:
    command = [
        sys.executable,
        "-m",
        "bench.assign",
        "--case",
        str(num_boxes),
        "--mode",
        mode,
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"bench.assign case {num_boxes} boxes ({mode}) failed:\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.assign", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--counts", type=lambda t: [int(v) for v in t.split(",")], default=list(DEFAULT_COUNTS)
    )
    parser.add_argument(
        "--modes", type=lambda t: t.split(","), default=list(MODES), help="chunked,unchunked"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), default="chunked", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.case is not None:
        print(json.dumps(measure_case(args.case, args.mode, args.repeats)))
        return {}
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    cases = [
        run_in_subprocess(n, mode, args.repeats, args.threads)
        for mode in args.modes
        for n in args.counts
    ]
    for case in cases:
        print(
            f"{case['mode']:9s} {case['boxes']:5d} boxes: {case['seconds']['median'] * 1000:8.1f} ms "
            f"(min {case['seconds']['min'] * 1000:.1f}), peak +{case['peak_mib']:.0f} MiB, "
            f"{case['foreground']} foreground points"
        )
    result = {
        "benchmark": "assign",
        "image_size": list(FULL_SIZE),
        "cases": cases,
        "machine": machine_info(args.threads),
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
