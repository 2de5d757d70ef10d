"""Install smoke tests: the detectron2 that setup.sh installed works here, and its patcher is strict.

Each detectron2 test exercises one of the sdist fixes of tools/install_detectron2.py (and fails on
an unpatched pb1-detectron2 0.6); the patcher tests run on fake sdist trees under tmp_path.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_installer() -> types.ModuleType:
    """Import tools/install_detectron2.py by path.

    An official detectron2 build installs its own top-level ``tools`` package, which would shadow
    this repository's tools/ directory for ``import tools.install_detectron2``.
    """
    name = "fcos_install_detectron2"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "install_detectron2.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


installer = load_installer()


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Create a fake sdist tree: relative path -> text."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


# --- the patcher -------------------------------------------------------------------------------


def test_patch_replaces_every_expected_occurrence(tmp_path: Path) -> None:
    write_tree(tmp_path, {"pkg/a.py": "x = np.float\ny = np.float\n"})
    installer.apply_patches(tmp_path, [installer.Patch("pkg/a.py", "np.float", "float", 2)])
    assert (tmp_path / "pkg/a.py").read_text() == "x = float\ny = float\n"


def test_missing_snippet_fails_naming_the_file_and_writes_nothing(tmp_path: Path) -> None:
    write_tree(tmp_path, {"setup.py": "import torch\n", "pkg/b.py": "unrelated\n"})
    patches = [
        installer.Patch("setup.py", "import torch\n", ""),
        installer.Patch("pkg/b.py", "Image.LINEAR", "Image.BILINEAR"),
    ]
    with pytest.raises(installer.InstallError, match=r"^pkg/b\.py: expected 1 occurrence.*found 0"):
        installer.apply_patches(tmp_path, patches)
    # All or nothing: the first, valid patch must not have been written either.
    assert (tmp_path / "setup.py").read_text() == "import torch\n"
    assert (tmp_path / "pkg/b.py").read_text() == "unrelated\n"


def test_snippet_found_more_often_than_expected_fails(tmp_path: Path) -> None:
    write_tree(tmp_path, {"c.py": "np.int\nnp.int\n"})
    with pytest.raises(installer.InstallError, match=r"^c\.py: expected 1 occurrence.*found 2"):
        installer.apply_patches(tmp_path, [installer.Patch("c.py", "np.int", "int")])


def test_missing_file_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(installer.InstallError, match=r"^detectron2/gone\.py: missing"):
        installer.apply_patches(tmp_path, [installer.Patch("detectron2/gone.py", "a", "b")])


def test_leftover_numpy_aliases_are_found_and_sized_types_are_not(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "d/ok.py": "import numpy as np\nx = np.float32(1)\ny = np.int64\nz = np.bool_\n",
            "d/bad.py": "import numpy as np\n\nm = np.zeros(3).astype(np.bool)\n",
        },
    )
    assert installer.find_removed_numpy_aliases(tmp_path) == ["d/bad.py:3 np.bool"]


def test_c_module_answers_version_queries_and_explains_missing_ops() -> None:
    module = types.ModuleType("fake_detectron2_C")
    exec(installer.C_MODULE_TEMPLATE.format(fingerprint="abc"), module.__dict__)
    assert module.FCOS_D2_PATCH_FINGERPRINT == "abc"
    assert module.has_cuda() is False
    assert "C++ extension" in module.get_compiler_version()
    with pytest.raises(AttributeError, match=r"box_iou_rotated is unavailable"):
        module.box_iou_rotated  # noqa: B018 - the attribute access is what is tested


# --- the installed detectron2 ------------------------------------------------------------------


def test_installed_detectron2_is_official_or_this_patch_set() -> None:
    assert installer.installed_state() in ("official", "current")


def test_collect_env_runs() -> None:
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert re.search(r"^detectron2\s+0\.6 @", info, re.MULTILINE)
    assert "not built correctly" not in info


def test_model_zoo_configs_are_packaged() -> None:
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    # Values set in the _BASE_ file Base-RetinaNet.yaml, so that one was packaged too.
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert cfg.MODEL.RETINANET.IOU_THRESHOLDS == [0.4, 0.5]


def test_class_histogram_counts_non_crowd_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    from detectron2.data import build

    messages: list[str] = []
    monkeypatch.setattr(build, "log_first_n", lambda level, message, key: messages.append(message))
    dataset = [
        {"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1}]},
        {"annotations": [{"category_id": 0, "iscrowd": 1}, {"category_id": 1}]},
        {"annotations": []},
    ]
    build.print_instances_class_histogram(dataset, ["cat", "dog"])
    (table,) = messages
    assert re.search(r"\|\s*cat\s*\|\s*1\s*\|\s*dog\s*\|\s*3\s*\|", table)
    assert re.search(r"\|\s*total\s*\|\s*4\s*\|", table)


def test_resize_scale_gives_python_int_sizes() -> None:
    from detectron2.data import transforms as T

    # 100x50 image, target 40x60 at scale 0.5 -> 20x30 box; min(20/100, 30/50) = 0.2 -> 20x10.
    augmentation = T.ResizeScale(0.5, 0.5, target_height=40, target_width=60)
    transform = augmentation.get_transform(np.zeros((100, 50, 3), dtype=np.uint8))
    assert (transform.new_h, transform.new_w) == (20, 10)
    assert type(transform.new_h) is int and type(transform.new_w) is int
    assert transform.apply_image(np.zeros((100, 50, 3), dtype=np.uint8)).shape == (20, 10, 3)


def test_detectron2_retinanet_with_gn_head_trains_and_infers_on_cpu() -> None:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 64  # GN(32 groups) needs >1 value per group on a 1x1 p7
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.RETINANET.NORM = "GN"  # torch 2.x rejected the unpatched GroupNorm probe
    torch.manual_seed(0)
    model = build_model(cfg)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules())

    def sample(boxes: list[list[float]], classes: list[int]) -> dict:
        instances = Instances((64, 96))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes)
        return {"image": torch.rand(3, 64, 96) * 255, "instances": instances}

    batch = [sample([[8.0, 8.0, 40.0, 48.0]], [1]), sample([[50.0, 10.0, 90.0, 60.0]], [2])]
    model.train()
    with EventStorage(0):  # RetinaNet logs its foreground count to the current storage
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": batch[0]["image"], "height": 32, "width": 48}])
    assert output["instances"].image_size == (32, 48)
    assert len(output["instances"]) <= cfg.TEST.DETECTIONS_PER_IMAGE
