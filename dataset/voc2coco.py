#!/usr/bin/env python
"""Convert Pascal-VOC XML annotations into one COCO-format JSON file (the seed's command line).

    python dataset/voc2coco.py --ann_dir Annotations --labels labels.txt --output train.json

``--help`` lists the options; what the conversion does to boxes, ids and difficult objects is
documented in :mod:`fcos.data.voc`. Problems are one line naming the file and field; the JSON (and the
inferred labels file) is written atomically, so it is either complete or absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fcos.data.common import DatasetError
from fcos.data.voc import DIFFICULT_POLICIES, convert, read_labels, read_lines, summary_table
from fcos.engine.cli import run
from fcos.file_io import write_json_atomic, write_text_atomic


def annotation_paths(args: argparse.Namespace) -> list[str]:
    """The annotation files named by the command line, in the order that fixes the image ids."""
    ext = args.ext.lstrip(".")
    if args.voc_root is not None:
        root = Path(args.voc_root)
        ids = [
            line.split()[0]
            for line in read_lines(root / "ImageSets" / "Main" / f"{args.split}.txt", "split file")
        ]
        paths = [str(root / "Annotations" / f"{i}.{ext or 'xml'}") for i in ids]
    elif args.ann_paths_list is not None:
        paths = read_lines(args.ann_paths_list, "annotation paths list")
    elif args.ann_ids is not None:
        suffix = f".{ext}" if ext else ""
        ids = [line.split()[0] for line in read_lines(args.ann_ids, "ids list")]
        paths = [str(Path(args.ann_dir) / f"{i}{suffix}") for i in ids]
    else:
        ann_dir = Path(args.ann_dir)
        if not ann_dir.is_dir():
            raise DatasetError(f"{ann_dir}: not a directory (--ann_dir)")
        paths = sorted(str(p) for p in ann_dir.glob(f"*.{ext or 'xml'}"))
        if not paths:
            raise DatasetError(f"{ann_dir}: no *.{ext or 'xml'} annotation file (--ann_dir)")
    if not paths:
        raise DatasetError("the annotation list is empty")
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voc2coco",
        description="Convert Pascal-VOC XML annotations into one COCO-format JSON file. Give the annotations "
        "as --voc_root [--split], as --ann_dir [--ann_ids], or as --ann_paths_list.",
    )
    parser.add_argument(
        "--voc_root",
        help="VOC-style root: reads ImageSets/Main/<split>.txt, Annotations/ and "
        "(for image sizes) JPEGImages/",
    )
    parser.add_argument(
        "--split", help="split name under ImageSets/Main with --voc_root (default: trainval)"
    )
    parser.add_argument(
        "--ann_dir",
        help="directory of annotation files; alone, all its *.xml (or *.<ext>) files "
        "in sorted order are converted",
    )
    parser.add_argument(
        "--ann_ids",
        help="text file of annotation ids, one per line, looked up as "
        "<ann_dir>/<id>[.<ext>] (needs --ann_dir)",
    )
    parser.add_argument("--ann_paths_list", help="text file of annotation file paths, one per line")
    parser.add_argument(
        "--labels",
        help="labels file, one class name per line; category ids are 1..K in this "
        "order (default: the sorted unique names found, written to <output stem>_labels.txt)",
    )
    parser.add_argument(
        "--output", default="output.json", help="output JSON path (default: %(default)s)"
    )
    parser.add_argument(
        "--ext",
        default="",
        help="extension added to the ids of --ann_ids (e.g. xml); with "
        "--ann_dir alone or --voc_root it selects the annotation files (default: xml there)",
    )
    parser.add_argument(
        "--extract_num_from_imgid",
        action="store_true",
        help="ignored, accepted for compatibility with the seed: image ids are now 1..N in input "
        "order, because numbers taken from file names collide",
    )
    parser.add_argument(
        "--difficult",
        choices=DIFFICULT_POLICIES,
        default="keep",
        help="difficult objects: keep them as normal boxes (default; detectron2 drops crowd boxes in "
        "training), write them as iscrowd=1 so COCO evaluation ignores them like the VOC metric "
        "(use for the evaluation split), or skip them",
    )
    parser.add_argument(
        "--image_dir",
        help="image folder, used to read image sizes when <size> is missing or 0 "
        "(default with --voc_root: <voc_root>/JPEGImages)",
    )
    parser.add_argument(
        "--image_ext",
        default=".jpg",
        help="image extension when <filename> is missing or has none; "
        "the name then is the annotation stem plus this (default: %(default)s)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="treat every skippable problem (bad object, malformed file) as an "
        "error: exit 2, write nothing",
    )
    return parser


def _validate_sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject contradictory or incomplete source options (the seed silently preferred one of them)."""
    if args.voc_root is not None:
        if args.ann_dir or args.ann_ids or args.ann_paths_list:
            parser.error(
                "--voc_root cannot be combined with --ann_dir, --ann_ids or --ann_paths_list"
            )
        args.split = args.split or "trainval"
        args.image_dir = args.image_dir or str(Path(args.voc_root) / "JPEGImages")
        return
    if args.split is not None:
        parser.error("--split needs --voc_root")
    if args.ann_paths_list is not None:
        if args.ann_dir or args.ann_ids:
            parser.error("--ann_paths_list cannot be combined with --ann_dir or --ann_ids")
    elif args.ann_dir is None:
        parser.error(
            "give --voc_root, --ann_dir [--ann_ids] or --ann_paths_list"
            if args.ann_ids is None
            else "--ann_ids needs --ann_dir"
        )


def labels_path_for(output: str | Path) -> Path:
    """Where inferred labels are written: ``<output stem>_labels.txt`` next to the output JSON."""
    output = Path(output)
    return output.with_name(f"{output.stem}_labels.txt")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 success, 2 bad input: no output)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate_sources(parser, args)
    if args.extract_num_from_imgid:
        print(
            "warning: --extract_num_from_imgid is ignored: image ids are 1..N in input order",
            file=sys.stderr,
        )
    return run("voc2coco", lambda: _convert(args))


def _convert(args: argparse.Namespace) -> int:
    """Convert and write; bad input raises DatasetError (a line per problem) and writes nothing."""
    labels = read_labels(args.labels) if args.labels is not None else None
    paths = annotation_paths(args)
    try:
        result = convert(
            paths,
            labels,
            difficult=args.difficult,
            image_dir=args.image_dir,
            image_ext=args.image_ext,
            strict=args.strict,
        )
    except DatasetError as e:
        if not args.strict:
            raise
        raise DatasetError(f"--strict: nothing written, because of:\n{e}") from e
    for problem in result.problems:
        print(f"skipped {problem.scope}: {problem}", file=sys.stderr)
    try:
        if result.labels_inferred:
            write_text_atomic(
                labels_path_for(args.output), "".join(f"{name}\n" for name in result.labels)
            )
        write_json_atomic(args.output, result.coco)
    except OSError as e:
        raise DatasetError(f"{e.filename or args.output}: cannot write: {e.strerror or e}") from e
    print(summary_table(result))
    print(f"wrote {args.output}")
    if result.labels_inferred:
        print(
            f"labels inferred from the annotations, written to {labels_path_for(args.output)}; "
            "pass it as --labels for the other splits so that category ids agree"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
