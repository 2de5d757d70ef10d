"""Run every benchmark (each in its own process) and write ``bench/RESULTS.md``.

    .venv/bin/python -m bench.run_all [--threads 1] [--quick] [--device cpu] [--output RESULTS.md]

Takes about 32 minutes with one thread on an idle 2-core machine (the 800x1333 training steps dominate);
``--quick`` runs fewer repetitions and only the small training size (a smoke run, not for the README).
Inference and the training step also run with ours in mixed precision (bf16 on a CPU, fp16 and
bf16 on a GPU) against the fp32 peer; with a trained embedded model (``scripts/run_embedded.sh``)
its val AP in fp32 and bf16 is compared too (``bench.amp_ap``). ``--device cuda`` runs everything
that has a model on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .amp_ap import DEFAULT_WEIGHTS
from .common import REPO, machine_info

# Run after inference, which runs once per thread count (NHWC's gain differs with the thread count).
OTHER_BENCHMARKS = ("train_step", "assign", "flops", "coco_eval")
# Mixed-precision variants of ours per device type (the peer stays fp32).
MIXED_PRECISIONS = {"cpu": ("bfloat16",), "cuda": ("float16", "bfloat16")}


def bench_args(name: str, quick: bool) -> List[str]:
    """Per-benchmark repetitions: enough for a stable median on a shared host, or a smoke run."""
    if name == "inference":
        return (
            ["--warmup", "1", "--repeats", "3"] if quick else ["--warmup", "2", "--repeats", "10"]
        )
    if name == "train_step":
        return ["--sizes", "512x853", "--repeats", "2"] if quick else ["--repeats", "5"]
    if name == "assign":
        return ["--repeats", "1"] if quick else ["--repeats", "3"]
    if name == "amp_ap":
        return []
    return ["--repeats", "1"] if quick else ["--repeats", "3"]


def run_benchmark(
    name: str, threads: int, quick: bool, out_dir: Path, extra: Sequence[str] = (), tag: str = ""
) -> Dict:
    path = out_dir / f"{name}-{threads}{tag}.json"
    command = [
        sys.executable,
        "-m",
        f"bench.{name}",
        "--threads",
        str(threads),
        "--json",
        str(path),
    ]
    command += extra
    print(f"==> {' '.join(command[1:] + bench_args(name, quick))}", flush=True)
    done = subprocess.run(command + bench_args(name, quick), cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench.run_all: bench.{name} failed with exit code {done.returncode}")
    return json.loads(path.read_text())


def _spread(stats: Dict) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def inference_table(results: Sequence[Dict]) -> List[str]:
    lines = [
        "| threads | model | wall s, median (min–max) | CPU s, median (min–max) |",
        "|---|---|---|---|",
    ]
    for result in results:
        wall, cpu, threads = result["wall"], result["cpu"], result["machine"]["torch_threads"]
        precision = result.get("precision", "fp32")
        lines += [
            f"| {threads} | ours (`configs/fcos_R_50_FPN.yaml`, **{precision}**) | "
            f"{_spread(wall['ours'])} | {_spread(cpu['ours'])} |",
            f"| {threads} | detectron2 0.6 FCOS | {_spread(wall['peer'])} | {_spread(cpu['peer'])} |",
            f"| {threads} | **ours / detectron2 (medians)** | **{result['ratio_wall_median']:.3f}** | "
            f"**{result['ratio_cpu_median']:.3f}** |",
        ]
    return lines


def train_table(results: Sequence[Dict]) -> List[str]:
    lines = [
        "| input | ours precision | ours wall s | detectron2 (fp32) wall s | ours CPU s "
        "| detectron2 CPU s | ratio wall | ratio CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result, entry in ((r, e) for r in results for e in r["sizes"]):
        wall, cpu = entry["wall"], entry["cpu"]
        lines.append(
            f"| {entry['size'][0]}×{entry['size'][1]} | {result.get('precision', 'fp32')} | "
            f"{_spread(wall['ours'])} | {_spread(wall['peer'])} | "
            f"{_spread(cpu['ours'])} | {_spread(cpu['peer'])} | **{entry['ratio_wall_median']:.3f}** | "
            f"**{entry['ratio_cpu_median']:.3f}** |"
        )
    return lines


def assign_table(result: Dict) -> List[str]:
    by_mode: Dict[str, Dict[int, Dict]] = {}
    for case in result["cases"]:
        by_mode.setdefault(case["mode"], {})[case["boxes"]] = case
    chunked, unchunked = by_mode.get("chunked", {}), by_mode.get("unchunked", {})
    lines = [
        "| GT boxes | foreground points | time ms, median (min) | peak memory MiB | unchunked time ms "
        "| unchunked peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for boxes in sorted(chunked):
        case, dense = chunked[boxes], unchunked.get(boxes)
        dense_cells = (
            f"{dense['seconds']['median'] * 1000:.0f} | {dense['peak_mib']:.0f}"
            if dense
            else "– | –"
        )
        lines.append(
            f"| {boxes} | {case['foreground']} | {case['seconds']['median'] * 1000:.1f} "
            f"({case['seconds']['min'] * 1000:.1f}) | {case['peak_mib']:.0f} | {dense_cells} |"
        )
    return lines


def flops_table(result: Dict) -> List[str]:
    peak = result["matmul_peak_gflops"]
    names = {"ours": "ours", "peer": "detectron2 0.6 FCOS"}
    lines = [
        "| model | GMACs (fvcore) | best inference CPU s | achieved GFLOP/s | of fp32 matmul peak |",
        "|---|---|---|---|---|",
    ]
    for key, entry in result["models"].items():
        lines.append(
            f"| {names[key]} | {entry['gmacs']:.1f} | {entry['best_cpu_seconds']:.2f} | "
            f"{entry['achieved_gflops']:.1f} | {100 * entry['fraction_of_peak']:.0f}% of {peak:.1f} GFLOP/s |"
        )
    return lines


def coco_eval_table(result: Dict) -> List[str]:
    case, wall, cpu = result["case"], result["wall"], result["cpu"]
    lines = [
        "| COCOeval | wall s, median (min–max) | CPU s, median (min–max) |",
        "|---|---|---|",
        f"| pycocotools | {_spread(wall['pycocotools'])} | {_spread(cpu['pycocotools'])} |",
        f"| faster-coco-eval | {_spread(wall['faster_coco_eval'])} "
        f"| {_spread(cpu['faster_coco_eval'])} |",
        f"| **speed-up (wall medians)** | **{result['speedup_wall_median']:.1f}×** | |",
    ]
    return [
        f"{case['images']:,} images, {case['gt_boxes']:,} GT boxes ({case['crowd_boxes']} crowd) "
        f"over {case['categories']} categories, {case['detections']:,} detections; "
        f"{wall['pycocotools']['runs']} runs each, the same 12 summary numbers in every run.",
        "",
        *lines,
    ]


def amp_ap_lines(result: Optional[Dict]) -> List[str]:
    if result is None:
        return [
            "Not run: no trained embedded model (`bash scripts/run_embedded.sh` writes "
            "`output/fcos_shapes/model_final.pth`)."
        ]
    lines = ["| evaluation | AP | AP50 | AP75 | seconds |", "|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        box = run["bbox"]
        lines.append(
            f"| {name} | {box['AP']:.2f} | {box['AP50']:.2f} | {box['AP75']:.2f} "
            f"| {run['seconds']:.1f} |"
        )
    lines += ["", f"**|ΔAP| = {abs(result['delta_ap']):.2f}** (`{result['weights']}`)"]
    return lines


def report(
    results: Dict[str, Dict],
    threads: int,
    load_before: Optional[float],
    quick: bool,
    device: str = "cpu",
) -> str:
    machine = machine_info(threads, device)
    load = (
        f"{load_before:.2f} → {machine['load_average_1min']:.2f}"
        if load_before is not None
        else "n/a"
    )
    inference = results["inference"]
    runs = inference[0]["wall"]["ours"]["runs"]
    train_runs = results["train_step"][0]["sizes"][0]["wall"]["ours"]["runs"]
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    other_threads = [
        r["machine"]["torch_threads"] for r in inference if r["machine"]["torch_threads"] != threads
    ]
    also = f" (inference also with {', '.join(map(str, other_threads))})" if other_threads else ""
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python -m bench.run_all{' --quick' if quick else ''}` on "
        f"{datetime.date.today().isoformat()}, commit `{machine['commit']}`.",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs{gpu}; "
        f"Python {machine['python']}, "
        f"torch {machine['torch']}; **{threads} torch thread(s) for every model**{also}; 1-minute load average "
        f"{load} (other jobs shared the host). Wall time is what a user waits; CPU time (this process only) "
        "leaves out time the host gave the core to other jobs, so it is the steadier comparison here. Runs "
        "of the two models alternate (A B A B …) after warm-up. Both models use random weights (no "
        "download possible); see `bench/inference.py` for how the decoding load is equalised.",
        "",
        f"## Inference: R-50-FPN, 800×1333, batch 1, `torch.inference_mode` ({runs} runs each)",
        "",
        "With more than one thread on a busy host, a thread that loses its core stalls the other one, so "
        "wall times spread widely; the 1-thread rows are the reference. CPU time includes system time, "
        "mostly page faults on freshly allocated feature maps with glibc's default allocator, so it depends "
        "on the allocator as well as on the kernels.",
        "",
        *inference_table(inference),
        "",
        f"## Training step: batch 2, forward + backward + SGD step ({train_runs} runs each)",
        "",
        *train_table(results["train_step"]),
        "",
        "## Embedded model: val AP in fp32 and under TEST.AMP (`bench.amp_ap`)",
        "",
        *amp_ap_lines(results.get("amp_ap")),
        "",
        "## Target assignment: one 800×1333 image, default config (center sampling 1.5)",
        "",
        "Peak memory is the growth of the process's peak resident memory during the first assignment, one "
        "fresh process per case; *unchunked* puts every GT box in one chunk (the reference's dense "
        "points × GT tensors).",
        "",
        *assign_table(results["assign"]),
        "",
        "## Model FLOPs and achieved throughput (800×1344 padded input)",
        "",
        *flops_table(results["flops"]),
        "",
        "## COCO box evaluation without detectron2's C++ extension (`bench/coco_eval.py`)",
        "",
        "`COCOeval` construction + evaluate + accumulate + summarize on a synthetic case of COCO "
        "val2017's shape, pycocotools' pure-Python COCOeval against faster-coco-eval's (what the "
        "project's evaluator uses when detectron2 has no compiled COCOeval).",
        "",
        *coco_eval_table(results["coco_eval"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for every benchmark (default 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions, small training size only"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    inference_threads = sorted({args.threads, os.cpu_count() or args.threads})
    device = ["--device", args.device]
    precisions = ("fp32", *MIXED_PRECISIONS["cuda" if args.device.startswith("cuda") else "cpu"])
    with tempfile.TemporaryDirectory(prefix="fcos-bench-") as tmp:
        results: Dict = {
            "inference": [
                run_benchmark(
                    "inference", n, args.quick, Path(tmp), [*device, "--precision", p], f"-{p}"
                )
                for p in precisions
                for n in inference_threads
            ],
            "train_step": [
                run_benchmark(
                    "train_step",
                    args.threads,
                    args.quick,
                    Path(tmp),
                    [*device, "--precision", p],
                    f"-{p}",
                )
                for p in precisions
            ],
        }
        results.update(
            {
                name: run_benchmark(name, args.threads, args.quick, Path(tmp))
                for name in OTHER_BENCHMARKS
                if name != "train_step"
            }
        )
        if DEFAULT_WEIGHTS.is_file():
            mixed = ["--precision", precisions[-1]]
            results["amp_ap"] = run_benchmark(
                "amp_ap", args.threads, args.quick, Path(tmp), [*device, *mixed]
            )
    text = report(results, args.threads, load_before, args.quick, args.device)
    tmp_output = args.output.with_name(args.output.name + ".tmp")
    tmp_output.write_text(text, encoding="utf-8")
    os.replace(tmp_output, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
