"""Export a trained FCOS to ONNX or TorchScript.

    python tools/export.py --config-file output/fcos_shapes/config.yaml --format onnx \
        --output output/export/fcos_shapes.onnx --opts MODEL.WEIGHTS output/fcos_shapes/model_final.pth

writes ``output/export/fcos_shapes.onnx`` and ``output/export/fcos_shapes.onnx.json``. The graph takes
one float32 batch (N, 3, H, W) of raw pixel values in ``INPUT.FORMAT`` channel order (H and W: any
multiple of the backbone's size divisibility, 32 for FPN), normalises it, runs backbone, FPN and head,
and returns the head maps of every level: ``logits_<level>`` (N, K, H/s, W/s), ``box_reg_<level>``
(N, 4, H/s, W/s) distances in input pixels, ``centerness_<level>`` (N, 1, H/s, W/s). Turning them into
boxes (threshold, top-k, NMS, rescaling) is ``tools/export_postprocess.py`` (numpy + Pillow only; its
docstring says why decoding stays out of the graph); the JSON holds the settings it needs.

GroupNorm (the head's default norm; ``MODEL.RESNETS.NORM: GN`` for the backbone) exports through the
TorchScript-based ONNX exporter as InstanceNormalization plus a per-channel affine, which every
onnxruntime version runs; opset 17 is the default. That exporter needs no extra package (the newer
``dynamo`` exporter needs ``onnxscript``) and keeps height and width dynamic. Before the file is put in
place, the export is run on an input of another size than the traced one and compared with the eager
model; a mismatch leaves no file behind.

With ``MODEL.FCOS.USE_DCN_IN_TOWER`` the deformable tower convs export as ONNX ``DeformConv``, which
needs ``--opset 19`` or higher (a lower opset is refused with a message naming the switch);
TorchScript keeps torchvision's ``deform_conv2d`` op (loading that file needs torchvision).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from export_postprocess import METADATA_FORMAT, METADATA_VERSION, metadata_path
from torch import Tensor, nn

from fcos import FCOS
from fcos.deform_conv import (
    ONNX_DEFORM_CONV_OPSET,
    ModulatedDeformConv2d,
    register_onnx_deform_conv,
)
from fcos.engine.cli import run
from fcos.engine.config import SetupError
from fcos.engine.defaults import build_inference_model, class_names, load_config
from fcos.file_io import atomic_output, write_text_atomic

logger = logging.getLogger("fcos.export")

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
# Tolerance of the post-export check on raw head maps: |export - eager| <= ATOL + RTOL * |eager|.
CHECK_ATOL = 1e-3
CHECK_RTOL = 1e-4


class FCOSExportModule(nn.Module):
    """Normalisation + backbone + head of an ``FCOS``, returning the raw maps of each level (no decoding)."""

    def __init__(self, model: FCOS) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.in_features = list(model.head_in_features)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), persistent=False)

    def output_names(self) -> List[str]:
        """Graph output names, three per level in level order (the order ``decode`` expects)."""
        return [
            f"{kind}_{level}"
            for level in self.in_features
            for kind in ("logits", "box_reg", "centerness")
        ]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        features = self.backbone((image - self.pixel_mean) / self.pixel_std)
        logits, box_reg, centerness = self.head([features[name] for name in self.in_features])
        return tuple(t for level in zip(logits, box_reg, centerness) for t in level)


def export_metadata(
    cfg: CfgNode, module: FCOSExportModule, class_names: Optional[Sequence[str]]
) -> Dict:
    """Everything ``export_postprocess`` needs besides the graph, as a JSON-ready dict."""
    fc = cfg.MODEL.FCOS
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "input_name": "image",
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in module.pixel_mean.flatten()],
        "size_divisibility": int(module.backbone.size_divisibility),
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "output_names": module.output_names(),
        "levels": list(module.in_features),
        "strides": [int(s) for s in fc.FPN_STRIDES],
        "grid_offset": float(fc.GRID_OFFSET),
        "num_classes": int(fc.NUM_CLASSES),
        "class_names": list(class_names) if class_names is not None else None,
        "score_thresh_test": float(fc.SCORE_THRESH_TEST),
        "topk_candidates_test": int(fc.TOPK_CANDIDATES_TEST),
        "inference_topk_first": bool(fc.INFERENCE_TOPK_FIRST),
        "postprocess": str(fc.POSTPROCESS),
        "nms_thresh_test": float(fc.NMS_THRESH_TEST),
        "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        "box_reg_weights": [float(w) for w in fc.BBOX_REG_WEIGHTS],
    }


def example_input(size_divisibility: int, height: int, width: int) -> Tensor:
    """A (1, 3, H, W) pixel batch, H and W rounded up to the size divisibility; fixed seed."""
    divisor = max(1, size_divisibility)
    height, width = -(-height // divisor) * divisor, -(-width // divisor) * divisor
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, 3, height, width), generator=generator) * 255.0


class ExportSettingsError(SetupError):
    """A model/format/opset combination that cannot be exported; the message names the switch."""


def check_exportable(model: nn.Module, fmt: str, opset: int) -> None:
    """Refuse, before anything is traced, an ONNX opset that lacks an operator the model uses."""
    deformable = any(isinstance(m, ModulatedDeformConv2d) for m in model.modules())
    if fmt == "onnx" and deformable and opset < ONNX_DEFORM_CONV_OPSET:
        raise ExportSettingsError(
            f"MODEL.FCOS.USE_DCN_IN_TOWER: deformable convs export as ONNX DeformConv, which needs "
            f"--opset {ONNX_DEFORM_CONV_OPSET} or higher (got {opset}); "
            "or export with --format torchscript"
        )


def export_onnx(
    module: FCOSExportModule, example: Tensor, path: str, opset: int = DEFAULT_OPSET
) -> None:
    """Trace ``module`` on ``example`` into an ONNX file with dynamic batch, height and width."""
    import onnx

    register_onnx_deform_conv()
    names = module.output_names()
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch", 2: f"height_{name}", 3: f"width_{name}"} for name in names})
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=names,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    onnx.checker.check_model(path)


def export_torchscript(module: FCOSExportModule, example: Tensor, path: str) -> None:
    """Trace ``module`` into a TorchScript file (shape-generic: the net has no size-dependent branches)."""
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,))
    torch.jit.save(traced, path)


def run_exported(fmt: str, path: Path, image: Tensor) -> List[np.ndarray]:
    """Run an exported file on a (N, 3, H, W) batch: onnxruntime for ONNX, torch.jit for TorchScript."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": image.numpy()})
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [t.numpy() for t in loaded(image)]


def check_export(fmt: str, path: Path, module: FCOSExportModule, image: Tensor) -> float:
    """Run the export and the eager module on ``image``; return the largest difference, raise if too large."""
    with torch.no_grad():
        expected = [t.numpy() for t in module(image)]
    actual = run_exported(fmt, path, image)
    worst = 0.0
    for name, a, e in zip(module.output_names(), actual, expected):
        if a.shape != e.shape:
            raise RuntimeError(
                f"{path}: output {name} has shape {a.shape}, the eager model gives {e.shape}"
            )
        worst = max(worst, float(np.abs(a - e).max(initial=0.0)))
        if not np.allclose(a, e, atol=CHECK_ATOL, rtol=CHECK_RTOL):
            raise RuntimeError(
                f"{path}: output {name} differs from the eager model by up to {np.abs(a - e).max():.3g}"
            )
    return worst


def export_model(
    cfg: CfgNode,
    model: FCOS,
    fmt: str,
    output: Path,
    class_names: Optional[Sequence[str]] = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a CPU ``model`` to ``output`` (+ metadata JSON), check it on a second input size.

    Returns the metadata JSON's path.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r}; choose one of {list(FORMATS)}")
    check_exportable(model, fmt, opset)
    module = FCOSExportModule(model).eval()
    divisor = module.backbone.size_divisibility
    meta_file = metadata_path(output)
    text = json.dumps(export_metadata(cfg, module, class_names), indent=2) + "\n"

    # Export to a temporary name and check it there: a failed check leaves no model file.
    with atomic_output(output) as tmp:
        trace_input = example_input(divisor, 256, 320)
        if fmt == "onnx":
            export_onnx(module, trace_input, tmp, opset)
        else:
            export_torchscript(module, trace_input, tmp)
        worst = check_export(fmt, Path(tmp), module, example_input(divisor, 192, 128))
        logger.info(
            f"{output}: matches the eager model on a 192x128 input (max |difference| {worst:.2e})"
        )
        write_text_atomic(meta_file, text)
    return meta_file


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: build the config's model with its weights and export it."""
    parser = argparse.ArgumentParser(prog="tools/export.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="the model's config (e.g. OUTPUT_DIR/config.yaml)",
    )
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="model file to write; metadata goes to OUTPUT.json",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)"
    )
    parser.add_argument(
        "--ann_file", help="COCO JSON whose 'categories' name the classes (custom datasets)"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    # force: a CLI owns the root logger (and in-process callers get a handler on their current stderr).
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )

    def export() -> int:
        # Traced on the CPU: the graph holds no device-specific tensors, and the runtimes load it anywhere.
        cfg = load_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"], args.ann_file)
        model = build_inference_model(cfg)
        names = class_names(cfg, args.ann_file)
        check_exportable(model, args.format, args.opset)
        meta_file = export_model(cfg, model, args.format, args.output, names, args.opset)
        print(f"wrote {args.output} and {meta_file}")
        return 0

    return run("tools/export.py", export)


if __name__ == "__main__":
    sys.exit(main())
