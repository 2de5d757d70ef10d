"""Convert a pretrained checkpoint to this project's (detectron2) parameter names, once.

    python tools/convert.py IN OUT [--allow-unsafe-pickle]

IN may be in any layout ``fcos.checkpoint_layouts`` recognises (official FCOS, torchvision ResNet,
detectron2/Caffe2 ImageNet .pkl, or already detectron2). OUT is a ``{"model": state_dict}`` ``.pth`` that
plain ``torch.load(weights_only=True)`` and detectron2's own ``DetectionCheckpointer`` load by name,
so converting an untrusted pickle once yields a file that is safe to pass around.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

from fcos.checkpoint_layouts import describe, read_checkpoint
from fcos.engine.cli import run
from fcos.engine.config import SetupError
from fcos.file_io import atomic_write


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/convert.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint to convert (.pth or .pkl)")
    parser.add_argument("output", help="where to write the detectron2-layout .pth")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="unpickle objects other than tensors, arrays and plain containers; runs code from the file, "
        "use only for files from a trusted source",
    )
    return parser


def convert(input_path: str, output_path: str, *, allow_unsafe_pickle: bool = False) -> str:
    """Convert ``input_path`` and write ``output_path`` atomically; returns a one-line description."""
    converted = read_checkpoint(input_path, allow_unsafe_pickle=allow_unsafe_pickle)
    payload = {
        "model": converted.state_dict,
        "__author__": f"tools/convert.py from {converted.layout.name} layout",
    }
    atomic_write(output_path, lambda f: torch.save(payload, f))
    return describe(converted, input_path) + f" -> {output_path}"


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status 0, or 2 with one line for a missing, unreadable, unsafe or unrecognised input."""
    args = _parser().parse_args(argv)

    def convert_file() -> int:
        if not os.path.isfile(args.input):
            raise SetupError(f"{args.input}: no such file (see pretrained_weights/README.md)")
        if os.path.abspath(args.input) == os.path.abspath(args.output):
            raise SetupError(f"{args.output}: output must differ from the input file")
        try:
            print(convert(args.input, args.output, allow_unsafe_pickle=args.allow_unsafe_pickle))
        except OSError as e:
            raise SetupError(f"{e.filename or args.output}: {e.strerror or e}") from e
        return 0

    return run("tools/convert.py", convert_file)


if __name__ == "__main__":
    sys.exit(main())
