#!/usr/bin/env python
"""Check a COCO-format detection dataset before training on it.

    python dataset/check.py --ann_file X.json --image_dir DIR [--full] [--strict] [--config-file CFG]

It also prints the image and object sizes (percentiles) and the input sizes and
MODEL.FCOS.OBJECT_SIZES_OF_INTEREST that fit them for the FCOS levels of ``--config-file``.

Exit status 1 when the dataset has errors, 0 otherwise (warnings allowed), like a linter; 2 with one
line when it cannot be checked at all (the annotation file is missing, unreadable or not COCO JSON,
the image folder does not exist). What counts as an error or a warning is documented in
:mod:`fcos.data.check`, which ``train_net.py`` also runs before training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from fcos.data.check import check_coco_dataset
from fcos.data.common import DatasetError
from fcos.engine.cli import run
from fcos.engine.config import get_fcos_cfg, merge_config

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fcos_custom_scratch.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check",
        description="Check a COCO-format detection dataset (JSON + image folder) before training. "
        "Exit status 1 when it has errors, 0 otherwise (warnings allowed).",
    )
    parser.add_argument("--ann_file", required=True, help="COCO annotation JSON")
    parser.add_argument(
        "--image_dir", required=True, help="folder the images' file_name entries are relative to"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="decode every image completely (slow; also finds truncated files) instead of "
        "reading only the headers",
    )
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        help="config whose FCOS levels (MODEL.FCOS.FPN_STRIDES) the size "
        "suggestion is for (default: %(default)s)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="boxes with no area inside their image are errors (as with "
        "DATASETS.STRICT_BOXES True in training) instead of one warning (training "
        "drops them)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)

    def check() -> int:
        if not os.path.isdir(args.image_dir):
            raise DatasetError(f"{args.image_dir}: not a folder (--image_dir)")
        cfg = get_fcos_cfg()
        merge_config(cfg, args.config_file, [])
        strides = list(cfg.MODEL.FCOS.FPN_STRIDES)
        read_images = True if args.full else "header"
        report = check_coco_dataset(
            args.ann_file, args.image_dir, read_images, args.strict, strides=strides
        )
        if not report.readable:
            raise DatasetError(report.errors[0])
        print(report.format())
        return 0 if report.ok else 1

    return run("check", check)


if __name__ == "__main__":
    sys.exit(main())
