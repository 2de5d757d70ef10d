"""Export: ONNX (run in onnxruntime) and TorchScript give the eager model's detections.

The exported graph ends at the head; ``tools/export_postprocess.py`` (numpy) does the pre-processing and the
decoding. Both are checked here against the eager detectron2 path on generated shapes images: same
classes, boxes within 1e-3 px, scores within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import export as fcos_export
import export_postprocess as post
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import ResizeShortestEdge
from export import FCOSExportModule, export_model, main
from inference_helpers import random_fcos, same_detections, save_weights, shapes_val, tiny_cfg
from predictor import FCOSPredictor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    weights = save_weights(random_fcos(tiny_cfg()), root / "model.pth")
    cfg = tiny_cfg("MODEL.WEIGHTS", str(weights))
    images, _ = shapes_val(root / "shapes", num_val=3)
    predictor = FCOSPredictor(cfg)
    return root, cfg, predictor, images


def _run_exported(fmt: str, path: Path, batch: np.ndarray) -> list:
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": batch})
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return [t.numpy() for t in module(torch.from_numpy(batch))]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_gives_the_eager_detections(setup, fmt):
    root, cfg, predictor, images = setup
    path = root / f"fcos.{fmt}"
    meta_file = export_model(cfg, predictor.model, fmt, path, class_names=["a", "b", "c", "d"])
    meta = post.load_metadata(meta_file)
    assert meta["class_names"] == ["a", "b", "c", "d"]
    total = 0
    for image_path in images:
        image = read_image(str(image_path), format="BGR")
        eager = predictor(image)
        batch, resized = post.preprocess(image, meta)
        # 96x128 images at MIN_SIZE_TEST 128 -> 128x171, longest edge capped at MAX_SIZE_TEST 160 -> 120x160.
        assert resized == (120, 160) and batch.shape == (1, 3, 128, 160)
        detections = post.decode(_run_exported(fmt, path, batch), meta, resized, image.shape[:2])
        # Fewer than TEST.DETECTIONS_PER_IMAGE: no near-tie decides who makes the cut.
        assert 0 < len(eager) < cfg.TEST.DETECTIONS_PER_IMAGE
        assert same_detections(
            detections["boxes"],
            detections["scores"],
            detections["classes"],
            eager.pred_boxes.tensor,
            eager.scores,
            eager.pred_classes,
            box_atol=1e-3,
            score_atol=1e-4,
        )
        total += len(eager)
    assert total >= 10


def test_groupnorm_backbone_exports_to_onnx(tmp_path):
    """GroupNorm everywhere (backbone and head): the ONNX graph runs in onnxruntime like the eager model."""
    cfg = tiny_cfg("MODEL.RESNETS.NORM", "GN")
    model = random_fcos(cfg)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.backbone.modules())
    export_model(cfg, model, "onnx", tmp_path / "gn.onnx")
    graph_ops = {node.op_type for node in onnx.load(str(tmp_path / "gn.onnx")).graph.node}
    assert "InstanceNormalization" in graph_ops or "GroupNormalization" in graph_ops
    image = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        expected = FCOSExportModule(model)(image)
    actual = _run_exported("onnx", tmp_path / "gn.onnx", image.numpy())
    for a, e in zip(actual, expected):
        assert a.shape == tuple(e.shape)
        assert np.allclose(a, e.numpy(), atol=1e-3, rtol=1e-4)


def test_cli_writes_model_and_metadata(setup, tmp_path):
    _, cfg, _, _ = setup
    out = tmp_path / "cli" / "fcos.onnx"
    code = main(
        [
            "--config-file",
            "configs/fcos_shapes.yaml",
            "--format",
            "onnx",
            "--output",
            str(out),
            "--opts",
            *tiny_opts_with_weights(cfg),
        ]
    )
    assert code == 0
    meta = json.loads((tmp_path / "cli" / "fcos.onnx.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle", "cross"]
    levels = list(cfg.MODEL.FCOS.IN_FEATURES)
    assert meta["strides"] == list(cfg.MODEL.FCOS.FPN_STRIDES) and meta["levels"] == levels
    assert meta["output_names"] == [
        f"{kind}_{level}" for level in levels for kind in ("logits", "box_reg", "centerness")
    ]
    assert [o.name for o in onnxruntime.InferenceSession(str(out)).get_outputs()] == meta[
        "output_names"
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["fcos.onnx", "fcos.onnx.json"]


def tiny_opts_with_weights(cfg) -> list:
    return [
        "INPUT.MIN_SIZE_TEST",
        "128",
        "INPUT.MAX_SIZE_TEST",
        "160",
        "MODEL.WEIGHTS",
        cfg.MODEL.WEIGHTS,
    ]


def test_cli_missing_weights_points_to_the_weights_readme(tmp_path, capsys):
    assert (
        main(
            [
                "--config-file",
                "configs/fcos_shapes.yaml",
                "--format",
                "torchscript",
                "--output",
                str(tmp_path / "m.ts"),
                "--opts",
                "MODEL.WEIGHTS",
                str(tmp_path / "absent.pth"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "absent.pth" in err and "does not exist" in err and "pretrained_weights/README.md" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "size",
    [
        (480, 640, 800, 1333),
        (640, 480, 800, 1333),
        (100, 1000, 800, 1333),
        (333, 500, 256, 256),
        (97, 131, 128, 160),
        (1, 3, 2, 5),
        (255, 257, 200, 4000),
    ],
)
def test_resized_shape_matches_detectron2(size):
    height, width, short, longest = size
    assert post.resized_shape(height, width, short, longest) == ResizeShortestEdge.get_output_shape(
        height, width, short, longest
    )


def test_resized_shape_hand_computed():
    # 480x640 -> short edge 800: 800 x 1066.67 -> 1067; a 1:10 image is capped by the long edge 1333.
    assert post.resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert post.resized_shape(100, 1000, 800, 1333) == (133, 1333)


def test_preprocess_pads_with_the_pixel_mean():
    meta = {
        "min_size_test": 2,
        "max_size_test": 10,
        "size_divisibility": 4,
        "pixel_mean": [1.0, 2.0, 3.0],
    }
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    batch, resized = post.preprocess(image, meta)
    assert resized == (2, 3) and batch.shape == (1, 3, 4, 4)
    assert batch[0, :, :2, :3].tolist() == image.transpose(2, 0, 1).astype(np.float32).tolist()
    assert (
        batch[0, 0, 2:, :].tolist() == [[1.0] * 4] * 2 and batch[0, 2, :, 3].tolist() == [3.0] * 4
    )


def test_nms_hand_computed():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [0, 0, 10, 10]], dtype=np.float32
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    # IoU(0, 1) = 90 / 110 > 0.6: 1 goes; IoU(0, 2) = 50 / 150: 2 stays; box 3 is another class.
    assert post.batched_nms(boxes, scores, np.array([0, 0, 0, 1]), 0.6).tolist() == [0, 2, 3]
    assert post.batched_nms(boxes, scores, np.array([0, 0, 0, 0]), 0.6).tolist() == [0, 2]
    assert post.batched_nms(boxes, scores, np.array([0, 0, 0, 0]), 0.8).tolist() == [0, 2]
    # Threshold above 0.818: box 1 stays (IoU(1, 2) = 60 / 140 keeps 2 as well).
    assert post.batched_nms(boxes, scores, np.array([0, 0, 0, 0]), 0.85).tolist() == [0, 1, 2]


def test_nms_plus_one_hand_computed():
    """[0,0,9,9] vs [0,0,9,7]: "+1" IoU 80 / 100 = 0.8 (official flavour), plain IoU 63 / 81 = 0.78."""
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 7]], dtype=np.float32)
    scores = np.array([0.9, 0.8], dtype=np.float32)
    assert post.batched_nms(boxes, scores, np.array([0, 0]), 0.79, plus_one=True).tolist() == [0]
    assert post.batched_nms(boxes, scores, np.array([0, 0]), 0.79).tolist() == [0, 1]


def test_grid_points_match_the_model():
    from fcos.targets import grid_points

    for offset in (0.0, 0.5):
        expected = grid_points([(3, 5)], [16], offset, torch.device("cpu"))[0].numpy()
        assert np.array_equal(post.grid_points(3, 5, 16, offset), expected)
    assert post.grid_points(2, 2, 8, 0.5).tolist() == [[4, 4], [12, 4], [4, 12], [12, 12]]


def test_bad_metadata_names_the_file_and_field(tmp_path):
    path = tmp_path / "m.onnx.json"
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(ValueError, match=r"m\.onnx\.json: field 'format'"):
        post.load_metadata(tmp_path / "m.onnx")
    path.write_text(json.dumps({"format": post.METADATA_FORMAT, "version": 99}))
    with pytest.raises(ValueError, match="field 'version' is 99"):
        post.load_metadata(path)


def test_failed_check_leaves_no_files(setup, tmp_path, monkeypatch):
    """The export is checked under its temporary name: a mismatch writes neither model nor metadata."""
    _, cfg, predictor, _ = setup
    real_run = fcos_export.run_exported
    monkeypatch.setattr(
        fcos_export, "run_exported", lambda *args: [o + 0.01 for o in real_run(*args)]
    )
    with pytest.raises(RuntimeError, match="differs from the eager model by up to 0.01"):
        export_model(cfg, predictor.model, "torchscript", tmp_path / "m.ts")
    assert list(tmp_path.iterdir()) == []


def _deformable_model():
    """The tiny config with USE_DCN_IN_TOWER and non-zero offsets and masks (really deformed)."""
    cfg = tiny_cfg("MODEL.FCOS.USE_DCN_IN_TOWER", "True")
    model = random_fcos(cfg)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for tower in (model.head.cls_subnet, model.head.bbox_subnet):
            offset_conv = tower[3].offset
            weight = torch.randn(offset_conv.weight.shape, generator=generator)
            offset_conv.weight.copy_(weight * 0.05)
            offset_conv.bias.copy_(torch.randn(offset_conv.bias.shape, generator=generator))
    return cfg, model


@pytest.mark.parametrize("fmt,opset", [("onnx", 19), ("torchscript", 17)])
def test_deformable_tower_exports(tmp_path, fmt, opset):
    cfg, model = _deformable_model()
    path = tmp_path / f"dcn.{fmt}"
    export_model(cfg, model, fmt, path, opset=opset)
    if fmt == "onnx":
        assert "DeformConv" in {node.op_type for node in onnx.load(str(path)).graph.node}
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        expected = FCOSExportModule(model)(image)
    actual = _run_exported(fmt, path, image.numpy())
    for a, e in zip(actual, expected):
        assert a.shape == tuple(e.shape)
        assert np.allclose(a, e.numpy(), atol=1e-3, rtol=1e-4)


def test_deformable_tower_onnx_below_opset_19_names_the_switch(tmp_path, capsys):
    cfg, model = _deformable_model()
    message = r"MODEL\.FCOS\.USE_DCN_IN_TOWER.*--opset 19"
    with pytest.raises(fcos_export.ExportSettingsError, match=message):
        export_model(cfg, model, "onnx", tmp_path / "dcn.onnx")
    weights = save_weights(model, tmp_path / "weights" / "dcn.pth")
    out = tmp_path / "out"
    status = main(
        [
            "--config-file",
            "configs/fcos_shapes.yaml",
            "--format",
            "onnx",
            "--output",
            str(out / "m.onnx"),
            "--opts",
            "MODEL.FCOS.USE_DCN_IN_TOWER",
            "True",
            "MODEL.WEIGHTS",
            str(weights),
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    # The export's INFO log may precede it (and, in a long pytest run, "--- Logging error ---" noise
    # from handlers earlier tests bound to their captured streams); the error itself is one line,
    # without a traceback of the exception.
    assert "ExportSettingsError" not in err
    errors = [line for line in err.splitlines() if line.startswith("tools/export.py: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "tools/export.py: error: MODEL.FCOS.USE_DCN_IN_TOWER"
    )
    assert "--opset 19" in errors[0]
    assert not out.exists()
