"""Install smoke tests: the detectron2 that setup.sh installed works here, and its patcher is strict.

Each detectron2 test exercises one of the sdist fixes of tools/install_detectron2.py (and fails on
an unpatched pb1-detectron2 0.6); the patcher tests run on fake trees under tmp_path. The --source
route is tested on a fake checkout and, when the detectron2 main snapshot of ../shared/vendor-test
(or $FCOS_VENDOR_TEST_DIR) is there, by building a wheel from it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENDOR_TEST = Path(os.environ.get("FCOS_VENDOR_TEST_DIR", REPO.parent / "shared" / "vendor-test"))


def load_installer() -> types.ModuleType:
    """Import tools/install_detectron2.py by path.

    An official detectron2 build installs its own top-level ``tools`` package, which would shadow
    this repository's tools/ directory for ``import tools.install_detectron2``.
    """
    name = "fcos_install_detectron2"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "tools" / "install_detectron2.py"
        )
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
    exec(installer.C_MODULE_TEMPLATE.format(fingerprint="abc", origin="C:\\d2"), module.__dict__)
    assert module.FCOS_D2_PATCH_FINGERPRINT == "abc"
    assert module.FCOS_D2_INSTALLED_FROM == "C:\\d2"
    assert module.has_cuda() is False
    assert "C++ extension" in module.get_compiler_version()
    with pytest.raises(AttributeError, match=r"box_iou_rotated is unavailable"):
        module.box_iou_rotated  # noqa: B018 - the attribute access is what is tested


# --- the --source route ------------------------------------------------------------------------

# The parts of a detectron2 checkout that the --source patches touch, as main has them.
FAKE_SETUP = (
    "import torch\n"
    'PROJECTS = {"detectron2.projects.point_rend": "projects/PointRend/point_rend"}\n'
    "\n"
    "setup(\n"
    '    name="detectron2",\n'
    '    packages=find_packages(exclude=("configs", "tests*")) + list(PROJECTS.keys()),\n'
    "    package_dir=PROJECTS,\n"
    "    ext_modules=get_extensions(),\n"
    '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n'
    ")\n"
)
FAKE_MODEL_ZOO = (
    "import os\n"
    "import pkg_resources\n"
    "def get_config_file(config_path):\n"
    "    cfg_file = pkg_resources.resource_filename(\n"
    '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
    "    )\n"
    "    return cfg_file\n"
)
# Copied: what setup.py builds from. Left behind: VCS data, datasets, build output, binaries.
FAKE_SOURCE_FILES = {
    "detectron2/__init__.py": '__version__ = "0.6"\n',
    "detectron2/model_zoo/model_zoo.py": FAKE_MODEL_ZOO,
    "configs/Base-RCNN-FPN.yaml": "MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n",
    "projects/PointRend/point_rend/__init__.py": "",
    "setup.py": FAKE_SETUP,
}
FAKE_OTHER_FILES = {
    ".git/HEAD": "ref: refs/heads/main\n",
    "datasets/coco/train2017/0001.jpg": "not really an image\n",
    "build/lib/detectron2/__init__.py": "",
    "detectron2.egg-info/PKG-INFO": "Name: detectron2\n",
    "detectron2/__pycache__/__init__.cpython-311.pyc": "bytecode\n",
    f"detectron2/_C{importlib.machinery.EXTENSION_SUFFIXES[0]}": "a compiled extension\n",
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A fake detectron2 checkout with the files a real one has around the source."""
    root = tmp_path / "detectron2"
    write_tree(root, {**FAKE_SOURCE_FILES, **FAKE_OTHER_FILES})
    return root


def tree_contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_source_copy_is_patched_and_the_checkout_untouched(checkout: Path, tmp_path: Path) -> None:
    before = tree_contents(checkout)
    fingerprint = installer.prepare_source_tree(checkout, tmp_path / "copy")
    assert tree_contents(checkout) == before

    copy = tree_contents(tmp_path / "copy")
    assert sorted(copy) == sorted([*FAKE_SOURCE_FILES, "detectron2/_C.py"])
    setup_py = copy["setup.py"].decode()
    assert "ext_modules" not in setup_py and "cmdclass" not in setup_py
    assert 'packages=find_packages(include=("detectron2", "detectron2.*")) + list(PROJECTS),' in (
        setup_py
    )
    kept = "{name: folder for name, folder in PROJECTS.items() if path.isdir(folder)}"
    assert f"\nPROJECTS = {kept}\n\nsetup(\n" in setup_py
    model_zoo = copy["detectron2/model_zoo/model_zoo.py"].decode()
    assert "pkg_resources" not in model_zoo
    assert 'os.path.join(os.path.dirname(__file__), "configs", config_path)' in model_zoo

    c_module = types.ModuleType("fake_detectron2_C")
    exec(copy["detectron2/_C.py"].decode(), c_module.__dict__)
    assert c_module.FCOS_D2_PATCH_FINGERPRINT == fingerprint
    assert c_module.FCOS_D2_INSTALLED_FROM == str(checkout)


def test_source_fingerprint_follows_the_source_only(checkout: Path) -> None:
    fingerprint = installer.source_fingerprint(checkout)
    assert fingerprint != installer.patch_fingerprint()  # not taken for the sdist install
    write_tree(checkout, {"detectron2/__pycache__/x.pyc": "new bytecode", ".git/ORIG_HEAD": "x"})
    assert installer.source_fingerprint(checkout) == fingerprint
    write_tree(checkout, {"detectron2/engine/defaults.py": "# one more source file\n"})
    assert installer.source_fingerprint(checkout) != fingerprint


def test_symlinked_folders_in_the_checkout_are_not_followed(checkout: Path, tmp_path: Path) -> None:
    write_tree(tmp_path / "elsewhere", {"huge.bin": "data"})
    try:
        (checkout / "detectron2" / "model_zoo" / "configs").symlink_to(tmp_path / "elsewhere")
    except OSError as error:  # Windows without the symlink privilege
        pytest.skip(f"cannot create a symlink here: {error}")
    assert installer.source_files(checkout) == sorted(Path(p) for p in FAKE_SOURCE_FILES)


def _missing_folder(root: Path) -> Path:
    return root / "no-such-dir"


def _package_folder(root: Path) -> Path:
    return root / "detectron2"


def _without_configs(root: Path) -> Path:
    (root / "configs").rename(root / "other")
    return root


def _other_setup_py(root: Path) -> Path:
    (root / "setup.py").write_text("setup()\n")
    return root


@pytest.mark.parametrize(
    "breaker, message",
    [
        (_missing_folder, r"no-such-dir: not a directory"),
        (_package_folder, r"detectron2/detectron2: no setup\.py"),
        (_without_configs, r"detectron2: no configs "),
        (_other_setup_py, r": setup\.py: expected 1 occurrence\(s\) of '    ext_modules="),
    ],
    ids=["missing", "package-folder", "no-configs", "other-setup-py"],
)
def test_unknown_tree_is_one_line_exit_2_and_nothing_installed(
    checkout: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    breaker,
    message: str,
) -> None:
    monkeypatch.setattr(installer, "probe_install", lambda: ("missing", ""))
    monkeypatch.setattr(installer, "pip_install_tree", lambda *a: pytest.fail("pip install ran"))
    source = breaker(checkout)
    before = tree_contents(checkout)
    assert installer.main(["--source", str(source)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(r"^\[install_detectron2\] error: .*" + message, line), line
    assert str(source) in line
    assert tree_contents(checkout) == before


@pytest.mark.parametrize("state", ["official", "current"])
def test_source_install_leaves_an_official_or_current_build_alone(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    answer = "official" if state == "official" else installer.source_fingerprint(checkout)
    monkeypatch.setattr(installer, "probe_install", lambda: (answer, str(checkout)))
    monkeypatch.setattr(installer, "pip_install_tree", lambda *a: pytest.fail("pip install ran"))
    assert installer.main(["--source", str(checkout)]) == 0


def test_source_install_replaces_the_sdist_build(
    checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(installer, "probe_install", lambda: (installer.patch_fingerprint(), ""))
    installed: list[tuple[str, str]] = []

    def pip_install_tree(root: Path, fingerprint: str) -> None:
        installed.append((fingerprint, (root / "detectron2" / "_C.py").read_text()))

    monkeypatch.setattr(installer, "pip_install_tree", pip_install_tree)
    work = tmp_path / "work"
    assert installer.main(["--source", str(checkout), "--cache-dir", str(work)]) == 0
    ((fingerprint, c_module),) = installed
    assert fingerprint == installer.source_fingerprint(checkout)
    assert f'FCOS_D2_PATCH_FINGERPRINT = "{fingerprint}"' in c_module
    assert list(work.iterdir()) == []  # the patched copy is temporary


def snapshot_tarballs() -> list[Path]:
    return sorted(VENDOR_TEST.glob("detectron2-main-*.tar.gz")) if VENDOR_TEST.is_dir() else []


@pytest.mark.slow
def test_detectron2_main_snapshot_builds_a_wheel_without_the_extension(tmp_path: Path) -> None:
    tarballs = snapshot_tarballs()
    if not tarballs:
        pytest.skip(f"no detectron2-main-*.tar.gz in {VENDOR_TEST} (set FCOS_VENDOR_TEST_DIR)")
    with tarfile.open(tarballs[-1]) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    (checkout,) = [p.parent for p in (tmp_path / "src").glob("*/setup.py")]
    fingerprint = installer.prepare_source_tree(checkout, tmp_path / "copy")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
        + ["--wheel-dir", str(tmp_path / "wheel"), str(tmp_path / "copy")],
        check=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("detectron2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        c_module = archive.read("detectron2/_C.py").decode()
        model_zoo = archive.read("detectron2/model_zoo/model_zoo.py").decode()
    assert {name.split("/")[0] for name in names if "/" in name} == {
        "detectron2",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert not [name for name in names if name.endswith((".so", ".pyd"))]
    assert "detectron2/model_zoo/configs/COCO-Detection/fcos_R_50_FPN_1x.py" in names
    assert "detectron2/model_zoo/configs/Base-RetinaNet.yaml" in names
    assert f'FCOS_D2_PATCH_FINGERPRINT = "{fingerprint}"' in c_module
    assert "pkg_resources" not in model_zoo


# --- the installed detectron2 ------------------------------------------------------------------


def test_installed_detectron2_is_official_or_this_patch_set() -> None:
    assert installer.installed_state_for_its_origin() in ("official", "current")


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
