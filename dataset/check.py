#!/usr/bin/env python
"""Check a COCO-format detection dataset before training on it.

    python dataset/check.py --ann_file X.json --image_dir DIR [--full] [--config-file CFG]

It also prints the image and object sizes (percentiles) and the input sizes and
MODEL.FCOS.OBJECT_SIZES_OF_INTEREST that fit them for the FCOS levels of ``--config-file``.

Exit status 1 when the dataset has errors, 0 otherwise (warnings allowed). What counts as an error or a
warning is documented in :mod:`fcos.data.check`, which ``train_net.py`` also runs before training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fcos.data.check import check_coco_dataset
from fcos.engine.config import SetupError
from fcos.engine.defaults import load_config

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fcos_custom_scratch.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check",
        description="Check a COCO-format detection dataset (JSON + image folder) before training. "
        "Exit status 1 when it has errors, 0 otherwise (warnings allowed).",
    )
    parser.add_argument("--ann_file", required=True, help="COCO annotation JSON")
    parser.add_argument("--image_dir", required=True, help="folder the images' file_name entries are relative to")
    parser.add_argument("--full", action="store_true",
                        help="decode every image completely (slow; also finds truncated files) instead of "
                        "reading only the headers")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG,
                        help="config whose FCOS levels (MODEL.FCOS.FPN_STRIDES) the size "
                        "suggestion is for (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        strides = list(load_config(args.config_file, []).MODEL.FCOS.FPN_STRIDES)
    except SetupError as err:
        print(f"check: error: {err}", file=sys.stderr)
        return 2
    read_images = True if args.full else "header"
    report = check_coco_dataset(args.ann_file, args.image_dir, read_images=read_images,
                                strides=strides)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
