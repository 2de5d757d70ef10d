"""Fast, in-process tests of train_net.py's setup: dataset selection (seed defect 1), NUM_CLASSES, COCO and
bad-data errors, degenerate boxes, optimizer, backend choice, LR scaling, AP table, curves, NaN stop, no
hidden rotation."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
import types
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import SimpleTrainer
from detectron2.structures import BoxMode
from PIL import Image
from torch import nn
from train_helpers import (
    REPO,
    SHAPES_CONFIG,
    TINY_OPTS,
    simple_boxes,
    simple_categories,
    write_coco,
)

import train_net
from fcos.data.common import DatasetError
from fcos.engine import evaluation, launch
from fcos.engine.config import SetupError, get_fcos_cfg
from fcos.engine.curves import archive_previous_metrics, plot_training_curves, read_metrics
from fcos.engine.datasets import drop_degenerate_boxes, use_custom_datasets
from fcos.engine.hooks import FiniteLossTrainer, NonFiniteLossError
from fcos.engine.trainer import FCOSTrainer, build_optimizer, unused_backbone_levels


def _setup(argv: List[str], world_size: int = 1):
    return train_net.setup_config(train_net.build_parser().parse_args(argv), world_size)


def _custom_argv(
    tmp_path: Path, catalog: List[str], train_classes: int = 3, val_classes: int = 3
) -> List[str]:
    train_json, train_dir = write_coco(
        tmp_path, "train", simple_categories(train_classes), simple_boxes(2, train_classes)
    )
    val_json, val_dir = write_coco(
        tmp_path, "val", simple_categories(val_classes), simple_boxes(2, val_classes)
    )
    name_train, name_val = f"t_{tmp_path.name}", f"v_{tmp_path.name}"
    catalog += [name_train, name_val]
    return [
        "--config-file",
        str(SHAPES_CONFIG),
        "--ann_file_train",
        str(train_json),
        "--image_dir_train",
        str(train_dir),
        "--name_train",
        name_train,
        "--ann_file_val",
        str(val_json),
        "--image_dir_val",
        str(val_dir),
        "--name_val",
        name_val,
    ]


# --- which datasets a run uses ----------------------------------------------------------------------------


def test_config_datasets_are_kept_without_custom_flags() -> None:
    # Seed defect 1: the seed replaced DATASETS.* with custom names even when no file was given.
    cfg = get_fcos_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "Base-FCOS.yaml"))
    use_custom_datasets(cfg, None, None, check=True)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.DATASETS.TEST == ("coco_2017_val",)


def test_custom_flags_replace_datasets_and_num_classes_follows_the_json(
    tmp_path: Path, catalog: List[str]
) -> None:
    cfg = _setup(_custom_argv(tmp_path, catalog))
    assert cfg.DATASETS.TRAIN == (catalog[0],)
    assert cfg.DATASETS.TEST == (catalog[1],)
    assert cfg.MODEL.FCOS.NUM_CLASSES == 3
    assert MetadataCatalog.get(catalog[0]).thing_classes == ["class1", "class2", "class3"]


def test_num_classes_that_contradicts_the_json_is_an_error(
    tmp_path: Path, catalog: List[str]
) -> None:
    with pytest.raises(
        SetupError, match=r"MODEL.FCOS.NUM_CLASSES is 5 but dataset .* has 3 categories"
    ):
        _setup(_custom_argv(tmp_path, catalog) + ["MODEL.FCOS.NUM_CLASSES", "5"])


def test_num_classes_set_to_the_json_count_is_accepted(tmp_path: Path, catalog: List[str]) -> None:
    assert (
        _setup(
            _custom_argv(tmp_path, catalog) + ["MODEL.FCOS.NUM_CLASSES", "3"]
        ).MODEL.FCOS.NUM_CLASSES
        == 3
    )


def test_train_and_val_with_different_categories_is_an_error(
    tmp_path: Path, catalog: List[str]
) -> None:
    with pytest.raises(SetupError, match="different categories"):
        _setup(_custom_argv(tmp_path, catalog, train_classes=3, val_classes=2))


def test_custom_train_without_val_disables_evaluation(tmp_path: Path, catalog: List[str]) -> None:
    argv = _custom_argv(tmp_path, catalog)
    cfg = _setup(argv[: argv.index("--ann_file_val")])
    assert cfg.DATASETS.TEST == ()


def test_annotation_file_without_image_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="--ann_file_train and --image_dir_train go together"):
        _setup(["--config-file", str(SHAPES_CONFIG), "--ann_file_train", str(tmp_path / "a.json")])


def test_missing_coco_names_the_path_and_the_variable() -> None:
    # detectron2 registered coco_2017_* at import under $DETECTRON2_DATASETS (unset here: ./datasets).
    json_file = MetadataCatalog.get("coco_2017_train").json_file
    assert not Path(json_file).exists()
    with pytest.raises(SetupError) as err:
        _setup(["--config-file", str(REPO / "configs" / "Base-FCOS.yaml")])
    message = str(err.value)
    assert (
        "coco_2017_train" in message and json_file in message and "DETECTRON2_DATASETS" in message
    )


def test_missing_weights_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(SetupError, match="nope.pth"):
        _setup(
            [
                "--config-file",
                str(SHAPES_CONFIG),
                "--eval-only",
                "MODEL.WEIGHTS",
                missing,
                "DATASETS.TEST",
                "()",
            ]
        )


@pytest.mark.parametrize("filter_empty", [True, False])
def test_images_without_annotations_are_reported_once_per_file_as_the_config_treats_them(
    tmp_path: Path, catalog: List[str], caplog: pytest.LogCaptureFixture, filter_empty: bool
) -> None:
    argv = _custom_argv(tmp_path, catalog)
    argv += ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", str(filter_empty)]
    files = {split: Path(argv[argv.index(f"--ann_file_{split}") + 1]) for split in ("train", "val")}
    for ann_file in files.values():
        ann = json.loads(ann_file.read_text())
        # 1.png loses its boxes
        ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 2]
        ann_file.write_text(json.dumps(ann))
    with caplog.at_level(logging.WARNING, logger="fcos.engine.datasets"):
        cfg = _setup(argv)
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is filter_empty
    train_fate = (
        "they are dropped from training (DATALOADER.FILTER_EMPTY_ANNOTATIONS is True); "
        "set it False to train on them as images without objects"
        if filter_empty
        else "they train as images without objects (DATALOADER.FILTER_EMPTY_ANNOTATIONS is False)"
    )
    warnings = [r.getMessage() for r in caplog.records if "without annotations" in r.getMessage()]
    assert warnings == [
        f"{files['train']}: 1 image(s) without annotations (1.png); {train_fate}",
        f"{files['val']}: 1 image(s) without annotations (1.png); they are evaluated as images "
        "without objects (every detection on them is a false positive)",
    ]


SCRATCH_ADVICE = "to train without pretrained weights, use configs/fcos_custom_scratch.yaml."


@pytest.mark.parametrize(
    "config, opts, advice",
    [
        ("fcos_R_50_FPN_develop.yaml", [], ("FrozenBN", 3)),
        ("fcos_shapes.yaml", ["MODEL.BACKBONE.FREEZE_AT", "1"], ("BN", 1)),
        ("fcos_shapes.yaml", ["MODEL.RESNETS.NORM", "FrozenBN"], ("FrozenBN", 0)),
        ("fcos_shapes.yaml", [], None),
    ],
)
def test_missing_weights_says_how_to_train_without_them(
    tmp_path: Path, config: str, opts: List[str], advice: Optional[Tuple[str, int]]
) -> None:
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(SetupError) as err:
        _setup(
            [
                "--config-file",
                str(REPO / "configs" / config),
                "MODEL.WEIGHTS",
                missing,
                "DATASETS.TRAIN",
                "()",
                "DATASETS.TEST",
                "()",
                *opts,
            ]
        )
    message = str(err.value)
    assert "nope.pth" in message and "pretrained_weights/README.md" in message
    if advice is None:  # a trainable backbone may start from random weights
        assert message.endswith('To train this config from scratch, set MODEL.WEIGHTS "".')
    else:  # a frozen one is never told to
        norm, freeze_at = advice
        frozen = f"(MODEL.RESNETS.NORM {norm}, MODEL.BACKBONE.FREEZE_AT {freeze_at}:"
        assert f"This config cannot train from scratch {frozen}" in message
        assert message.endswith(SCRATCH_ADVICE) and 'MODEL.WEIGHTS ""' not in message


# --- bad data: one clear error naming the file, before training ---------------------------------------------


def _break_missing_image(ann: dict, image_dir: Path) -> str:
    (image_dir / "1.png").unlink()
    return "1.png"


def _break_unreadable_image(ann: dict, image_dir: Path) -> str:
    (image_dir / "0.png").write_bytes(b"not an image")
    return "0.png"


def _break_unknown_category(ann: dict, image_dir: Path) -> str:
    ann["annotations"][0]["category_id"] = 42
    return "unknown category id 42"


def _break_not_coco(ann: dict, image_dir: Path) -> str:
    ann.clear()
    ann["items"] = []
    return "missing key 'images'"


@pytest.mark.parametrize(
    "breaker",
    [_break_missing_image, _break_unreadable_image, _break_unknown_category, _break_not_coco],
)
def test_bad_training_data_is_a_clear_error_before_training(
    tmp_path: Path, catalog: List[str], breaker
) -> None:
    argv = _custom_argv(tmp_path, catalog)
    ann_file = Path(argv[argv.index("--ann_file_train") + 1])
    ann = json.loads(ann_file.read_text())
    expected = breaker(ann, tmp_path / "train")
    ann_file.write_text(json.dumps(ann))
    with pytest.raises(SetupError) as err:
        _setup(argv)
    assert expected in str(err.value)
    assert str(ann_file) in str(err.value)
    # Nothing registered, not even the (valid) validation set.
    assert not set(catalog) & set(DatasetCatalog.list())


def _with_degenerate_boxes(tmp_path: Path, catalog: List[str]) -> tuple[List[str], Path]:
    """Custom-data argv whose training JSON has a zero-width, negative-height and outside box."""
    argv = _custom_argv(tmp_path, catalog)
    ann_file = Path(argv[argv.index("--ann_file_train") + 1])
    ann = json.loads(ann_file.read_text())
    ann["annotations"][1]["bbox"] = [5.0, 5.0, 0.0, 10.0]
    ann["annotations"][2]["bbox"] = [30.0, 30.0, 10.0, -4.0]
    ann["annotations"][3]["bbox"] = [70.0, 0.0, 5.0, 5.0]  # right of the 64 px wide image
    ann_file.write_text(json.dumps(ann))
    return argv, ann_file


def test_degenerate_boxes_are_one_warning_and_training_keeps_the_rest(
    tmp_path: Path, catalog: List[str], caplog: pytest.LogCaptureFixture
) -> None:
    argv, ann_file = _with_degenerate_boxes(tmp_path, catalog)
    with caplog.at_level(logging.INFO, logger="fcos.engine"):
        cfg = _setup(argv)
        dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
        drop_degenerate_boxes(dicts, cfg.DATASETS.TRAIN)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "degenerate box(es)" in r.getMessage()
    ]
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning.startswith(f"{ann_file}: 3 degenerate box(es) with no area inside their image")
    assert "annotations[1] (id 2, image 0.png).bbox [5.0, 5.0, 0.0, 10.0]: zero or" in warning
    assert (
        "annotations[3] (id 4, image 1.png).bbox [70.0, 0.0, 5.0, 5.0]: entirely outside the "
        "64x64 image"
    ) in warning
    # 2 images x 2 boxes, 3 degenerate: the loader keeps image 0's first box only.
    assert [len(d["annotations"]) for d in dicts] == [1, 0]


def test_strict_boxes_refuses_the_dataset(tmp_path: Path, catalog: List[str]) -> None:
    argv, ann_file = _with_degenerate_boxes(tmp_path, catalog)
    with pytest.raises(SetupError) as err:
        _setup(argv + ["DATASETS.STRICT_BOXES", "True"])
    assert str(ann_file) in str(err.value)
    message = str(err.value)
    assert "annotations[2] (id 3, image 1.png).bbox [30.0, 30.0, 10.0, -4.0]: zero or" in message
    assert "3 error(s)" in str(err.value)


def test_json_that_is_not_json_is_a_clear_error(tmp_path: Path, catalog: List[str]) -> None:
    argv = _custom_argv(tmp_path, catalog)
    ann_file = Path(argv[argv.index("--ann_file_val") + 1])
    ann_file.write_text("{ not json")
    with pytest.raises(SetupError, match="not valid JSON"):
        _setup(argv)


def test_degenerate_boxes_are_dropped_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    def anno(box: List[float]) -> dict:
        return {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}

    dicts = [
        {
            "file_name": "a",
            "width": 64,
            "height": 48,
            "annotations": [anno([10, 10, 20, 20]), anno([10, 10, 0, 20]), anno([70, 10, 5, 5])],
        },
        {
            "file_name": "b",
            "width": 64,
            "height": 48,
            "annotations": [anno([0, 40, 10, 8]), anno([5, 48, 4, 4])],
        },
    ]
    with caplog.at_level(logging.INFO, logger="fcos.engine.datasets"):
        kept = drop_degenerate_boxes(copy.deepcopy(dicts), ["toy"])
    # Zero width; entirely right of x=64; entirely below y=48 -> 3 removed, 2 kept.
    assert [len(r["annotations"]) for r in kept] == [1, 1]
    assert kept[1]["annotations"][0]["bbox"] == [0, 40, 10, 8]
    assert "Dropped 3 degenerate box(es)" in caplog.text
    expected = r"3 training box\(es\) in \['toy'\].* a box \[10, 10, 0, 20\]: zero"
    with pytest.raises(DatasetError, match=expected):
        drop_degenerate_boxes(dicts, ["toy"], strict=True)


# --- optimizer, processes, learning rate ---------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_adamw_is_built_with_the_config_values_and_clipping() -> None:
    cfg = get_fcos_cfg()
    cfg.merge_from_list(
        [
            "SOLVER.OPTIMIZER",
            "ADAMW",
            "SOLVER.BASE_LR",
            "0.002",
            "SOLVER.WEIGHT_DECAY",
            "0.05",
            "SOLVER.WEIGHT_DECAY_NORM",
            "0.0",
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            "True",
        ]
    )
    model = _model()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and type(opt).__name__ == "AdamWWithGradientClip"
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    # conv weight and bias: WEIGHT_DECAY 0.05; BN weight and bias: WEIGHT_DECAY_NORM 0.
    assert [decay[id(p)] for p in model.parameters()] == [0.05, 0.05, 0.0, 0.0]
    assert all(g["lr"] == 0.002 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_sgd_is_detectron2s_and_unknown_optimizer_is_an_error() -> None:
    cfg = get_fcos_cfg()
    assert type(build_optimizer(cfg, _model())) is torch.optim.SGD
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER: unknown optimizer 'LAMB'"):
        build_optimizer(cfg, _model())


def test_backend_is_gloo_on_cpu_and_nccl_with_enough_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.choose_backend("cpu", 4) == "gloo"
    assert launch.choose_backend("cuda", 2) == "nccl"
    with pytest.raises(launch.LaunchError, match="--num-gpus 4 but only 2 GPU"):
        launch.choose_backend("cuda", 4)
    monkeypatch.setattr(launch.dist, "is_nccl_available", lambda: False)  # every Windows build
    assert launch.choose_backend("cuda", 2) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(launch.LaunchError, match="only 0 GPU"):
        launch.choose_backend("cuda:0", 1)


def test_lr_and_batch_scale_with_the_number_of_processes(tmp_path: Path) -> None:
    # Batch 8 and lr 1e-3 for REFERENCE_WORLD_SIZE 1 -> 2 processes: batch 16, lr 2e-3, half the iterations.
    argv = [
        "--config-file",
        str(SHAPES_CONFIG),
        "DATASETS.TRAIN",
        "()",
        "DATASETS.TEST",
        "()",
        "SOLVER.IMS_PER_BATCH",
        "8",
        "SOLVER.BASE_LR",
        "0.001",
        "SOLVER.MAX_ITER",
        "100",
        "SOLVER.STEPS",
        "(80,)",
        "SOLVER.REFERENCE_WORLD_SIZE",
        "1",
    ]
    cfg = _setup(argv, world_size=2)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.002, 50)
    assert cfg.SOLVER.STEPS == (40,)
    with pytest.raises(
        SetupError,
        match=r"SOLVER.IMS_PER_BATCH \(3\) must be divisible by the number of processes \(2\)",
    ):
        _setup(
            argv + ["SOLVER.IMS_PER_BATCH", "3", "SOLVER.REFERENCE_WORLD_SIZE", "0"], world_size=2
        )
    with pytest.raises(
        SetupError,
        match=r"SOLVER.IMS_PER_BATCH \(6\) must be divisible by SOLVER.REFERENCE_WORLD_SIZE \(4\)",
    ):
        _setup(
            argv + ["SOLVER.IMS_PER_BATCH", "6", "SOLVER.REFERENCE_WORLD_SIZE", "4"], world_size=2
        )


def test_unused_levels_are_found_only_for_a_backbone_that_builds_them() -> None:
    cfg = get_fcos_cfg()
    cfg.merge_from_file(str(SHAPES_CONFIG))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.RESNETS.OUT_FEATURES",
            "['res3', 'res4', 'res5']",
            "MODEL.FPN.IN_FEATURES",
            "['res3', 'res4', 'res5']",
            "MODEL.FCOS.IN_FEATURES",
            "['p3', 'p4', 'p5']",
            "MODEL.FCOS.FPN_STRIDES",
            "[8, 16, 32]",
            "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
            "[[-1, 32], [32, 64], [64, 100000]]",
        ]
    )
    assert unused_backbone_levels(cfg, FCOSTrainer.build_model(cfg)) == []
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    assert unused_backbone_levels(cfg, FCOSTrainer.build_model(cfg)) == ["p6", "p7"]


# --- evaluation output ---------------------------------------------------------------------------------------


def test_ap_table_rows_and_missing_values() -> None:
    metrics = {
        "AP": 51.234,
        "AP50": 80.5,
        "AP75": 55.0,
        "APs": float("nan"),
        "APm": 40.0,
        "APl": 70.126,
        "AP-circle": 1.0,
    }
    table = evaluation.format_ap_table({"bbox": metrics, "bbox_TTA": dict(metrics, AP=52.0)})
    lines = table.splitlines()
    assert len(lines) == 4
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "bbox",
        "51.23",
        "80.50",
        "55.00",
        "-",
        "40.00",
        "70.13",
    ]
    assert lines[3].split("|")[1].strip() == "bbox_TTA" and "52.00" in lines[3]
    nested = evaluation.format_ap_table({"a_val": {"bbox": metrics}, "b_val": {"bbox": metrics}})
    assert "a_val/bbox" in nested and "b_val/bbox" in nested
    assert evaluation.format_ap_table({}).startswith("no box AP results")


def test_fast_coco_eval_is_used_only_when_the_extension_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stub = types.ModuleType("detectron2._C")
    monkeypatch.setitem(sys.modules, "detectron2._C", stub)
    assert evaluation.has_fast_coco_eval() is False
    stub.COCOevalEvaluateImages = stub.COCOevalAccumulate = lambda *a: None
    assert evaluation.has_fast_coco_eval() is True


def test_training_curves_from_metrics_json(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    lines = [
        {"iteration": 19, "total_loss": 3.0, "loss_cls": 1.0, "lr": 0.001},
        {"iteration": 39, "total_loss": 2.0, "loss_cls": 0.8, "lr": 0.001},
        {"iteration": 39, "bbox/AP": 10.0, "bbox/AP50": 20.0},
        # after --resume from iteration 29: iteration 39 again, the later line wins
        {"iteration": 39, "total_loss": 1.5, "loss_cls": 0.7, "lr": 0.001},
    ]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 59, "total_lo')
    by_iter = read_metrics(metrics)
    assert sorted(by_iter) == [19, 39]
    assert by_iter[39] == {
        "total_loss": 1.5,
        "loss_cls": 0.7,
        "lr": 0.001,
        "bbox/AP": 10.0,
        "bbox/AP50": 20.0,
    }
    out = tmp_path / "curves.png"
    assert plot_training_curves(metrics, out) is True
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 900)  # 3 panels of 8x3 in at 100 dpi
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    metrics.write_text(json.dumps({"iteration": 0, "data_time": 0.1}) + "\n")
    assert plot_training_curves(metrics, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_a_fresh_run_moves_the_previous_metrics_aside(tmp_path: Path) -> None:
    assert archive_previous_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text('{"iteration": 0}\n')
    archived = archive_previous_metrics(tmp_path)
    assert archived is not None and archived.parent == tmp_path
    assert archived.name.startswith("metrics.") and archived.name.endswith(".json")
    assert archived.read_text() == '{"iteration": 0}\n'
    assert not (tmp_path / "metrics.json").exists()


# --- training loop ------------------------------------------------------------------------------------------


class _LossAt(nn.Module):
    """A one-parameter model whose loss becomes NaN at iteration ``bad_iter`` (data = iteration number)."""

    def __init__(self, bad_iter: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.bad_iter = bad_iter

    def forward(self, it: int) -> dict:
        scale = float("nan") if it == self.bad_iter else 1.0
        return {"loss_a": (self.w * scale).sum() ** 2}


def test_nan_loss_stops_with_the_iteration_before_the_step() -> None:
    model = _LossAt(bad_iter=3)
    trainer = FiniteLossTrainer(
        model, iter(range(100)), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: .*'loss_a': nan"):
        trainer.train(0, 10)
    # Three SGD steps on w^2 (w <- w - 0.1 * 2w = 0.8 w), none at iteration 3.
    assert model.w.item() == pytest.approx(0.8**3)


def test_nan_loss_names_the_iteration_detectron2_passes() -> None:
    # detectron2 main's asynchronous metric writer passes the iteration the losses belong to.
    model = _LossAt(bad_iter=-1)
    trainer = FiniteLossTrainer(
        model, iter(range(100)), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    trainer.iter = 9
    with pytest.raises(NonFiniteLossError, match=r"iteration 4 .*'loss_a': nan"):
        trainer._write_metrics({"loss_a": torch.tensor(float("nan"))}, 0.0, iter=4)


@pytest.mark.skipif(
    "async_write_metrics" not in inspect.signature(SimpleTrainer.__init__).parameters,
    reason="this detectron2's SimpleTrainer has no asynchronous metric writer (0.6)",
)
def test_asynchronous_metrics_are_written_for_each_iteration() -> None:
    model = _LossAt(bad_iter=-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = FiniteLossTrainer(model, iter(range(100)), optimizer, async_write_metrics=True)
    trainer.train(0, 3)
    # w^2 with w <- 0.8 w after each step: 1, 0.64, 0.4096 at iterations 0, 1, 2.
    values = trainer.storage.history("total_loss").values()
    assert [it for _, it in values] == [0, 1, 2]
    assert [v for v, _ in values] == pytest.approx([1.0, 0.64, 0.4096])


def test_resume_from_a_state_without_trainer_state_starts_a_fresh_optimizer(
    tmp_path: Path, catalog: List[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _setup(
        _custom_argv(tmp_path, catalog) + [*TINY_OPTS, "OUTPUT_DIR", str(tmp_path / "out")]
    )
    trainer = FCOSTrainer(cfg)
    # What detectron2 0.6's DefaultTrainer and the seed saved: the iteration and the hook states.
    scheduler = {"last_epoch": 41, "base_lrs": [cfg.SOLVER.BASE_LR]}
    with caplog.at_level(logging.WARNING, logger=FCOSTrainer.__module__):
        trainer.load_state_dict({"iteration": 41, "hooks": {"LRScheduler": scheduler}})
    assert trainer.iter == 41
    assert trainer.scheduler.last_epoch == 41
    assert trainer._trainer.optimizer.state_dict()["state"] == {}
    assert "no optimizer state" in caplog.text


def test_training_images_are_never_rotated(tmp_path: Path, catalog: List[str]) -> None:
    # Seed defect 2 rotated images by 90 degrees unless the output folder was named "no90". A 64x40
    # image must stay 64 wide and 40 high, its box unchanged or mirrored, over many samples.
    ann_file, image_dir = write_coco(
        tmp_path, "rot", simple_categories(1), [[(1, [4.0, 6.0, 20.0, 10.0])]]
    )
    data = json.loads(ann_file.read_text())
    Image.new("RGB", (64, 40)).save(image_dir / "0.png")
    data["images"][0].update(width=64, height=40)
    ann_file.write_text(json.dumps(data))
    catalog.append(f"rot_{tmp_path.name}")
    cfg = _setup(
        [
            "--config-file",
            str(SHAPES_CONFIG),
            "--ann_file_train",
            str(ann_file),
            "--image_dir_train",
            str(image_dir),
            "--name_train",
            catalog[0],
            *TINY_OPTS,
            "INPUT.MIN_SIZE_TRAIN",
            "(40,)",
            "SOLVER.IMS_PER_BATCH",
            "1",
        ]
    )
    loader = iter(FCOSTrainer.build_train_loader(cfg))
    seen = set()
    for _ in range(12):
        (sample,) = next(loader)
        assert tuple(sample["image"].shape) == (3, 40, 64)
        seen.add(tuple(sample["instances"].gt_boxes.tensor[0].tolist()))
    # Both the original and the mirrored box occur (all 12 the same: probability 2 / 2**12).
    assert seen == {(4.0, 6.0, 24.0, 16.0), (40.0, 6.0, 60.0, 16.0)}
