"""COCO box evaluation time on a COCO-val-sized synthetic case: pycocotools vs faster-coco-eval.

    python -m bench.coco_eval [--repeats 3] [--json out.json]

The case (``bench/coco_data.py``) has COCO val2017's shape: 5,000 images, ~37,000 boxes over 80
categories with its small/medium/large mix and ~1 % crowd regions, 100 detections per image.
Timed is what ``COCOEvaluator`` runs once the results are loaded: ``COCOeval(gt, dt, "bbox")``,
``evaluate``, ``accumulate``, ``summarize``, on the same pycocotools ``COCO`` objects for both
(the project's evaluator keeps pycocotools' ``COCO`` and swaps only the ``COCOeval`` class). Runs
alternate (A B A B ...); the 12 summary numbers of every run must be identical between the two, or
the benchmark fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fcos.engine.coco_backend import faster_cocoeval_class

from .coco_data import SyntheticCase, generate
from .common import interleaved_times, machine_info, set_threads, summarize, write_json


def load(case: SyntheticCase) -> Tuple[COCO, COCO]:
    """(ground truth COCO, detections COCO) of ``case``, as COCOEvaluator builds them."""
    gt, detections = generate(case)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
    return coco_gt, coco_dt


def evaluation(cocoeval_class: type, coco_gt: COCO, coco_dt: COCO, out: List) -> Callable[[], None]:
    """One full box evaluation, appending its summary numbers to ``out`` (timing drops returns)."""

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = cocoeval_class(coco_gt, coco_dt, "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        out.append([float(v) for v in coco_eval.stats])

    return run


def case_summary(coco_gt: COCO, coco_dt: COCO, seed: int) -> Dict[str, int]:
    return {
        "images": len(coco_gt.imgs),
        "gt_boxes": len(coco_gt.anns),
        "crowd_boxes": sum(a["iscrowd"] for a in coco_gt.anns.values()),
        "categories": len(coco_gt.cats),
        "detections": len(coco_dt.anns),
        "seed": seed,
    }


def markdown_row(result: Dict) -> str:
    case, wall = result["case"], result["wall"]
    cells = [
        f"{case['images']:,} images, {case['gt_boxes']:,} GT, {case['detections']:,} detections",
        *(
            f"{wall[name]['median']:.1f} ({wall[name]['min']:.1f}–{wall[name]['max']:.1f})"
            for name in ("pycocotools", "faster_coco_eval")
        ),
        f"**{result['speedup_wall_median']:.1f}×**",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.coco_eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, for bench.run_all's command line (neither evaluator uses torch)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    faster = faster_cocoeval_class()
    if faster is None:
        raise SystemExit(
            "bench.coco_eval: faster-coco-eval is not installed (pip install -r requirements.txt)"
        )

    case = SyntheticCase()
    started = time.perf_counter()
    coco_gt, coco_dt = load(case)
    summary = case_summary(coco_gt, coco_dt, case.seed)
    print(f"case: {summary} (generated and loaded in {time.perf_counter() - started:.1f} s)")
    stats: Dict[str, List] = {"pycocotools": [], "faster_coco_eval": []}
    runs = {
        "pycocotools": evaluation(COCOeval, coco_gt, coco_dt, stats["pycocotools"]),
        "faster_coco_eval": evaluation(faster, coco_gt, coco_dt, stats["faster_coco_eval"]),
    }
    times = interleaved_times(runs, warmup=0, repeats=args.repeats)
    reference = stats["pycocotools"][0]
    for name, results in stats.items():
        for run_stats in results:
            if run_stats != reference:
                raise SystemExit(
                    f"bench.coco_eval: {name} gave {run_stats}, pycocotools {reference}"
                )

    wall = {name: summarize(t["wall"]) for name, t in times.items()}
    result = {
        "machine": machine_info(args.threads),
        "case": summary,
        "faster_coco_eval_class": f"{faster.__module__}.{faster.__qualname__}",
        "wall": wall,
        "cpu": {name: summarize(t["cpu"]) for name, t in times.items()},
        "speedup_wall_median": wall["pycocotools"]["median"] / wall["faster_coco_eval"]["median"],
        "stats": reference,
    }
    print(
        "| COCO box evaluation | pycocotools s, median (min–max) | faster-coco-eval s "
        "| speed-up |"
    )
    print("|---|---|---|---|")
    print(markdown_row(result))
    print(f"AP {100 * reference[0]:.2f}; the same 12 summary numbers in all {args.repeats} runs")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
