"""Box AP of one trained embedded model in fp32 and under ``TEST.AMP``: what precision costs.

    bash scripts/run_embedded.sh                # trains output/fcos_shapes/model_final.pth
    python -m bench.amp_ap [--weights output/fcos_shapes/model_final.pth] [--precision bfloat16]

Same weights, same val images, same config (the ``config.yaml`` train_net.py wrote next to the
weights, i.e. the one the model was trained with; ``--config-file`` overrides), evaluated with
COCOEvaluator twice: once in fp32, once with ``TEST.AMP.ENABLED True`` (backbone and head under
autocast, decoding in fp32). Prints AP/AP50/AP75 of both, ``|dAP|`` and the two evaluation times.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fcos.engine.datasets import prepare_shapes
from fcos.engine.defaults import build_inference_model, load_config
from fcos.engine.trainer import FCOSTrainer

from .common import BENCH_PRECISIONS, REPO, machine_info, set_threads, write_json

DEFAULT_WEIGHTS = REPO / "output" / "fcos_shapes" / "model_final.pth"


def evaluate(config: Path, weights: Path, precision: str, device: str, opts: Sequence[str]) -> Dict:
    """COCO box metrics of ``weights`` on the config's test set in ``precision``, and the time."""
    mixed = precision != "fp32"
    with tempfile.TemporaryDirectory(prefix="fcos-amp-ap-") as out:
        cfg = load_config(
            str(config),
            [
                *opts,
                "MODEL.WEIGHTS",
                str(weights),
                "MODEL.DEVICE",
                device,
                "OUTPUT_DIR",
                out,
                "TEST.AMP.ENABLED",
                str(mixed),
                "TEST.AMP.PRECISION",
                precision if mixed else "auto",
            ],
        )
        prepare_shapes(cfg)
        model = build_inference_model(cfg)
        start = time.perf_counter()
        results = FCOSTrainer.test(cfg, model)
        seconds = time.perf_counter() - start
    bbox = results["bbox"] if "bbox" in results else next(iter(results.values()))["bbox"]
    return {"bbox": dict(bbox), "seconds": seconds}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.amp_ap", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--weights", type=Path, default=DEFAULT_WEIGHTS, help="default: %(default)s"
    )
    parser.add_argument("--config-file", type=Path, help="default: config.yaml beside --weights")
    parser.add_argument("--precision", choices=BENCH_PRECISIONS[1:], default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        parser.exit(
            2,
            f"bench.amp_ap: --weights {args.weights} not found; run scripts/run_embedded.sh "
            "first\n",
        )
    config = args.config_file or args.weights.parent / "config.yaml"
    if not config.is_file():
        parser.exit(2, f"bench.amp_ap: config {config} not found; give --config-file\n")
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    runs = {
        name: evaluate(config, args.weights, name, args.device, args.opts)
        for name in ("fp32", args.precision)
    }
    fp32, mixed = runs["fp32"]["bbox"], runs[args.precision]["bbox"]
    result = {
        "benchmark": "amp_ap",
        "weights": str(args.weights),
        "config": str(config),
        "precision": args.precision,
        "runs": runs,
        "delta_ap": mixed["AP"] - fp32["AP"],
        "machine": machine_info(args.threads, args.device),
    }
    rows: List[str] = [
        f"{name:8s} AP {r['bbox']['AP']:.2f}  AP50 {r['bbox']['AP50']:.2f}  "
        f"AP75 {r['bbox']['AP75']:.2f}  ({r['seconds']:.1f} s)"
        for name, r in runs.items()
    ]
    print("\n".join(rows))
    print(f"|dAP| ({args.precision} - fp32) = {abs(result['delta_ap']):.2f}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
