#!/usr/bin/env python
"""Generate the embedded synthetic shapes dataset (training generates it on first use by itself).

python dataset/shapes.py [--root DIR] [--num-train N] [--num-val N] [--size H W] [--seed S] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fcos.data.shapes import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    DEFAULT_ROOT,
    SPLITS,
)
from fcos.data.shapes import __doc__ as SHAPES_DOC
from fcos.data.shapes import ensure_shapes_dataset, generate_shapes_dataset


def main(argv: list[str] | None = None) -> int:
    """CLI: generate (or confirm up to date) the dataset and print its paths and counts."""
    parser = argparse.ArgumentParser(
        prog="dataset/shapes.py", description=SHAPES_DOC.splitlines()[0]
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=list(DEFAULT_IMAGE_SIZE)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if the manifest matches"
    )
    args = parser.parse_args(argv)
    build = generate_shapes_dataset if args.force else ensure_shapes_dataset
    start = time.perf_counter()
    try:
        paths = build(args.root, args.num_train, args.num_val, tuple(args.size), args.seed)
    except ValueError as err:
        parser.error(str(err))
    elapsed = time.perf_counter() - start
    for split in SPLITS:
        data = json.loads(paths[f"{split}_json"].read_text(encoding="utf-8"))
        print(
            f"{split}: {len(data['images'])} images, {len(data['annotations'])} boxes -> {paths[f'{split}_json']}"
        )
    print(f"root: {paths['root']} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
