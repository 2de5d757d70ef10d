"""Install detectron2 into the running Python environment without compiling its C++ extension.

Why this exists: detectron2 is not on PyPI under its own name, and building its C++ extension needs
a compiler (and the CUDA toolkit for GPU ops) that many users, on Windows especially, do not have.
This project needs none of the compiled ops. Two routes, both pip-installing the Python code only:

* default: download the ``pb1-detectron2==0.6`` sdist (the official v0.6 Python code without C++
  sources), check its hash and patch it for torch 2.x, Pillow 10, setuptools 81 and numpy 1.24/2;
* ``--source DIR``: a detectron2 source checkout (``git clone`` of the official repository, e.g. its
  main branch), copied and patched so that ``setup.py`` builds no extension. The checkout itself is
  never modified.

Each route applies a list of small (old, new) text replacements, a comment above each saying which
library change made it necessary, and writes a pure-Python ``detectron2/_C.py`` compatibility module
in place of the compiled extension. Every replacement asserts that its old text occurs exactly the
expected number of times and all of them are checked before any file is written, so a different
tree fails loudly and untouched.

Run it with the target environment's interpreter (torch must already be installed there)::

    .venv/bin/python tools/install_detectron2.py --cache-dir .install-cache
    .venv/bin/python tools/install_detectron2.py --source ../detectron2

An official detectron2 build (one with a compiled ``detectron2._C``) is left untouched, and so is an
install made by this script by the same route from the same tree and patch set; anything else is
replaced.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.machinery
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
LOG_PREFIX = "[install_detectron2]"

# numpy >= 1.24 removed these aliases of Python builtins; any left in the tree breaks at run time.
REMOVED_NUMPY_ALIASES = frozenset(
    {"bool", "int", "float", "complex", "object", "str", "long", "unicode"}
)


class InstallError(RuntimeError):
    """A step failed; the message is one line that names the file or command involved."""


@dataclass(frozen=True)
class Patch:
    """Replace ``old``, expected ``count`` times, by ``new`` in ``path`` (tree-relative)."""

    path: str
    old: str
    new: str
    count: int = 1


# setuptools >= 81 removed pkg_resources, which detectron2.model_zoo (0.6 and main) imports to
# find its configs; they sit next to model_zoo.py.
MODEL_ZOO_PATCHES: tuple[Patch, ...] = (
    Patch("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", ""),
    Patch(
        "detectron2/model_zoo/model_zoo.py",
        "    cfg_file = pkg_resources.resource_filename(\n"
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )\n",
        '    cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)\n',
    ),
)

SDIST_PATCHES: tuple[Patch, ...] = (
    # setup.py imports torch and builds a C++ extension whose sources the sdist lacks.
    Patch(
        "setup.py",
        "import torch\n"
        "from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension\n"
        "\n"
        'torch_ver = [int(x) for x in torch.__version__.split(".")[:2]]\n'
        'assert torch_ver >= [1, 8], "Requires PyTorch >= 1.8"\n',
        "",
    ),
    Patch(
        "setup.py",
        "    ext_modules=get_extensions(),\n"
        '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n',
        "",
    ),
    # The sdist has the model-zoo configs inside the package already, but get_model_zoo_configs()
    # globs a top-level configs/ that it lacks, so no config would be installed.
    Patch(
        "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    ),
    # The sdist's tools/ (detectron2's example scripts) would be installed as a top-level package
    # named "tools" and shadow this repository's tools/ directory.
    Patch(
        "setup.py",
        'packages=find_packages(exclude=("configs", "tests*"))',
        'packages=find_packages(exclude=("configs", "tests*", "tools"))',
    ),
    # Install under the real project name so pip replaces any other "detectron2" distribution.
    Patch("setup.py", 'name="pb1-detectron2",', 'name="detectron2",'),
    # black==21.4b2 breaks with click >= 8.1; black, future and pydot only serve LazyConfig.to_py
    # and caffe2 export, which this project does not use and does not install.
    Patch("setup.py", '        "black==21.4b2",\n', ""),
    Patch("setup.py", '        "future",  # used by caffe2\n', ""),
    Patch("setup.py", '        "pydot",  # used to save caffe2 SVGs\n', ""),
    # Pillow >= 10 removed Image.LINEAR (a default argument: detectron2.data fails at import).
    Patch(
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR,",
        "interp=Image.BILINEAR,",
    ),
    *MODEL_ZOO_PATCHES,
    # numpy 2: np.array(..., copy=False) raises whenever a copy is needed. Pillow 13 images export
    # their buffer, so this passes today; np.asarray states the intent without that trap.
    Patch(
        "detectron2/layers/mask_ops.py",
        "mask = np.array(mask, copy=False)",
        "mask = np.asarray(mask)",
    ),
    # torch 2.x rejects GroupNorm(32 groups, 1 channel): probe the norm type with 32 channels.
    Patch(
        "detectron2/modeling/meta_arch/retinanet.py",
        "norm_name = str(type(get_norm(norm, 1)))",
        "norm_name = str(type(get_norm(norm, 32)))",
    ),
    # ResizeScale passed numpy ints as the output size; Pillow wants Python ints.
    Patch(
        "detectron2/data/transforms/augmentation_impl.py",
        "input_size[0], input_size[1], output_size[0], output_size[1], self.interp",
        "input_size[0], input_size[1], int(output_size[0]), int(output_size[1]), self.interp",
    ),
    # numpy >= 1.24 removed np.bool / np.int / np.float / np.str (aliases of the builtins).
    Patch(
        "detectron2/evaluation/pascal_voc_evaluation.py",
        'np.array([x["difficult"] for x in R]).astype(np.bool)',
        'np.array([x["difficult"] for x in R]).astype(bool)',
    ),
    Patch("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)", 2),
    Patch("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.float)", "dtype=float)", 2),
    Patch("detectron2/evaluation/sem_seg_evaluation.py", ".astype(np.float)", ".astype(float)", 3),
    Patch("detectron2/structures/masks.py", ".astype(np.bool)", ".astype(bool)", 2),
    Patch("detectron2/structures/masks.py", "dtype=np.bool)", "dtype=bool)"),
    Patch(
        "detectron2/data/build.py",
        "np.zeros((num_classes,), dtype=np.int)",
        "np.zeros((num_classes,), dtype=int)",
    ),
    Patch(
        "detectron2/data/build.py",
        'if not x.get("iscrowd", 0)], dtype=np.int\n',
        'if not x.get("iscrowd", 0)], dtype=int\n',
    ),
    Patch("detectron2/data/datasets/pascal_voc.py", "dtype=np.str)", "dtype=str)"),
    Patch("detectron2/utils/visualizer.py", ".numpy().astype(np.bool)", ".numpy().astype(bool)", 3),
    Patch("detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)"),
)

# What --source patches in a detectron2 checkout (checked against main, commit 02b5c4e).
SOURCE_PATCHES: tuple[Patch, ...] = (
    # setup.py compiles detectron2/layers/csrc into detectron2._C: this route installs Python only.
    Patch(
        "setup.py",
        "    ext_modules=get_extensions(),\n"
        '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n',
        "",
    ),
    # A checkout's tools/ (detectron2's example scripts, with an __init__.py) would be installed as
    # a top-level package named "tools" and shadow this repository's tools/ directory.
    Patch(
        "setup.py",
        'packages=find_packages(exclude=("configs", "tests*")) + list(PROJECTS.keys()),',
        'packages=find_packages(include=("detectron2", "detectron2.*")) + list(PROJECTS),',
    ),
    # detectron2.projects.* are installed from the checkout's projects/; a tree exported without
    # that folder installs without them instead of failing on the missing package directories.
    Patch(
        "setup.py",
        "\nsetup(\n",
        "\nPROJECTS = {name: folder for name, folder in PROJECTS.items() if path.isdir(folder)}\n"
        "\nsetup(\n",
    ),
    *MODEL_ZOO_PATCHES,
)

# What --source copies out of a checkout: what setup.py builds from. Anything else (.git, datasets/,
# which often holds COCO, build output) stays behind.
SOURCE_ENTRIES = ("setup.py", "setup.cfg", "detectron2", "configs", "projects")
REQUIRED_SOURCE_ENTRIES = ("setup.py", "detectron2/__init__.py", "configs")
# Generated by a previous build or run inside the checkout, never part of the source.
SKIPPED_DIRS = frozenset({"__pycache__", "build"})
SKIPPED_SUFFIXES = (".pyc", ".egg-info", *importlib.machinery.EXTENSION_SUFFIXES)

# detectron2/_C.py written at install time. collect_env() and default_setup() call the three
# version queries; any compiled op gets an AttributeError that says why it is missing.
C_MODULE_TEMPLATE = '''\
"""Pure-Python stand-in for detectron2's compiled extension, written by fcos-d2's
tools/install_detectron2.py, which installs detectron2 without compiling its C++ code.

collect_env() and default_setup() only query the versions below. Compiled ops (rotated boxes,
detectron2's own deformable conv, the fast COCO evaluator) are not available in this install.
"""

FCOS_D2_PATCH_FINGERPRINT = "{fingerprint}"
FCOS_D2_INSTALLED_FROM = {origin!r}


def get_compiler_version() -> str:
    return "none (detectron2 installed without its C++ extension)"


def get_cuda_version() -> str:
    return "none (detectron2 installed without its C++ extension)"


def has_cuda() -> bool:
    return False


def __getattr__(name: str):
    raise AttributeError(
        f"detectron2._C.{{name}} is unavailable: this detectron2 was installed by fcos-d2's "
        "tools/install_detectron2.py without its C++ extension"
    )
'''


class UnknownTreeError(InstallError):
    """``--source`` names something that is not a detectron2 checkout this script knows."""


def patch_fingerprint(
    tree_digest: str = SDIST_SHA256, patches: Sequence[Patch] = SDIST_PATCHES
) -> str:
    """Identify input tree + patch set: a rerun can tell whether the installed copy is current."""
    payload = repr((tree_digest, tuple(patches), C_MODULE_TEMPLATE)).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def log(message: str) -> None:
    """Print one progress line; setup.sh shows these as its detectron2 step."""
    print(f"{LOG_PREFIX} {message}", flush=True)


def apply_patches(root: Path, patches: Sequence[Patch]) -> None:
    """Apply ``patches`` to the tree at ``root``, all or nothing.

    Every occurrence count is checked against the original text before anything is written, and
    each file is replaced atomically, so a mismatch leaves the tree exactly as it was.
    """
    texts: dict[str, str] = {}
    for patch in patches:
        if patch.path not in texts:
            file = root / patch.path
            if not file.is_file():
                raise InstallError(f"{patch.path}: missing (a different detectron2 tree?)")
            texts[patch.path] = file.read_text(encoding="utf-8")
        found = texts[patch.path].count(patch.old)
        if found != patch.count:
            raise InstallError(
                f"{patch.path}: expected {patch.count} occurrence(s) of {patch.old!r}, "
                f"found {found} (a different detectron2 tree?)"
            )
        texts[patch.path] = texts[patch.path].replace(patch.old, patch.new)
    for relative, text in texts.items():
        write_atomically(root / relative, text)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and rename it, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def find_removed_numpy_aliases(root: Path) -> list[str]:
    """List ``file:line np.<alias>`` uses of removed numpy aliases left anywhere under ``root``."""
    hits = []
    for file in sorted(root.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("np", "numpy")
                and node.attr in REMOVED_NUMPY_ALIASES
            ):
                hits.append(f"{file.relative_to(root)}:{node.lineno} np.{node.attr}")
    return hits


def finish_tree(root: Path, patches: Sequence[Patch], fingerprint: str, origin: str) -> None:
    """Patch an extracted or copied tree and add ``detectron2/_C.py``: ready for pip install.

    ``origin`` (the sdist's file name or the checkout's path) is recorded in ``_C.py`` so that a
    check of the environment can recompute the fingerprint it should have.
    """
    log(f"applying {len(patches)} asserted patches")
    apply_patches(root, patches)
    # The detectron2 package only: a checkout's projects/ holds far more than the three projects
    # setup.py installs, and this project uses none of them.
    leftovers = find_removed_numpy_aliases(root / "detectron2")
    if leftovers:
        raise InstallError("removed numpy aliases left unpatched: " + ", ".join(leftovers))
    c_module = C_MODULE_TEMPLATE.format(fingerprint=fingerprint, origin=origin)
    write_atomically(root / "detectron2" / "_C.py", c_module)


def source_files(source: Path) -> list[Path]:
    """The checkout's files that --source copies (see SOURCE_ENTRIES), relative, sorted.

    Symlinked folders are not followed: ``detectron2/model_zoo/configs`` is one that setup.py
    creates, and a ``datasets`` link can point at a whole dataset.
    """
    files = []
    for entry in SOURCE_ENTRIES:
        top = source / entry
        if top.is_file():
            files.append(Path(entry))
        elif top.is_dir() and not top.is_symlink():
            for folder, dirs, names in os.walk(top):
                dirs[:] = [d for d in dirs if _is_copied_dir(Path(folder) / d)]
                relative = Path(folder).relative_to(source)
                files.extend(relative / n for n in names if not n.endswith(SKIPPED_SUFFIXES))
    return sorted(files)


def _is_copied_dir(folder: Path) -> bool:
    """Whether source_files descends into ``folder``: no build output, no symlinked folder."""
    return not (
        folder.name in SKIPPED_DIRS or folder.name.endswith(SKIPPED_SUFFIXES) or folder.is_symlink()
    )


def check_source_tree(source: Path) -> None:
    """Fail with one line unless ``source`` looks like a detectron2 checkout."""
    if not source.is_dir():
        raise UnknownTreeError(f"{source}: not a directory (--source wants a detectron2 checkout)")
    for required in REQUIRED_SOURCE_ENTRIES:
        if not (source / required).exists():
            raise UnknownTreeError(
                f"{source}: no {required} (--source wants a detectron2 checkout, the folder that "
                "`git clone https://github.com/facebookresearch/detectron2` creates)"
            )


def source_digest(source: Path, files: Sequence[Path]) -> str:
    """Hash the names and contents of ``files``: a changed checkout gives another fingerprint."""
    digest = hashlib.sha256()
    for relative in files:
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_of(source / relative)))
    return digest.hexdigest()


def source_fingerprint(source: Path) -> str:
    """The fingerprint a --source install of the checkout at ``source`` gets."""
    check_source_tree(source)
    return patch_fingerprint(source_digest(source, source_files(source)), SOURCE_PATCHES)


def prepare_source_tree(source: Path, destination: Path) -> str:
    """Copy the checkout at ``source`` into ``destination``, patch the copy, return its fingerprint.

    ``source`` is only read. Every failure to recognise it is an UnknownTreeError naming ``source``.
    """
    fingerprint = source_fingerprint(source)
    for relative in source_files(source):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target)
    try:
        finish_tree(destination, SOURCE_PATCHES, fingerprint, str(source))
    except InstallError as error:
        raise UnknownTreeError(f"{source}: {error}") from None
    return fingerprint


# Run in a fresh interpreter so nothing imported by this process can mask a just-installed copy.
# Prints two lines: what _C is (missing, official, or the fingerprint of this script's stand-in,
# "foreign" for someone else's) and where this script installed it from (empty if unknown).
STATE_PROBE = """
import importlib.machinery, importlib.util
try:
    spec = importlib.util.find_spec("detectron2._C")
except Exception:
    spec = None
if spec is None or spec.origin is None:
    print("missing", "", sep="\\n")
elif spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
    print("official", "", sep="\\n")
else:
    import detectron2._C as c
    print(getattr(c, "FCOS_D2_PATCH_FINGERPRINT", "foreign"))
    print(getattr(c, "FCOS_D2_INSTALLED_FROM", ""))
"""


def probe_install() -> tuple[str, str]:
    """(what detectron2._C is, recorded origin) in this environment; see STATE_PROBE."""
    probe = subprocess.run([sys.executable, "-c", STATE_PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        return "missing", ""
    answer, _, origin = probe.stdout.partition("\n")
    return answer, origin.strip()


def installed_state(fingerprint: str | None = None) -> str:
    """Describe this environment's detectron2: missing, official, current or stale.

    "official" has a compiled ``_C``; "current" was installed by this script with ``fingerprint``
    (default: the sdist route's); "stale" is anything else that imports (another route, tree or
    patch set, someone else's stand-in).
    """
    answer, _ = probe_install()
    return _state(answer, fingerprint or patch_fingerprint())


def _state(answer: str, fingerprint: str) -> str:
    """installed_state's verdict on a STATE_PROBE answer, for the expected ``fingerprint``."""
    if answer in ("missing", "official"):
        return answer
    return "current" if answer == fingerprint else "stale"


def installed_state_for_its_origin() -> str:
    """installed_state() against the fingerprint that the recorded origin should give.

    For an environment installed by either route, whichever it was: the test suite runs in both.
    """
    answer, origin = probe_install()
    if answer in ("missing", "official") or origin in ("", SDIST_FILE):
        return _state(answer, patch_fingerprint())
    return _state(answer, source_fingerprint(Path(origin)))


def sha256_of(path: Path) -> str:
    """Hash a file in chunks, so memory stays flat for any file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run(command: Sequence[str]) -> None:
    """Run a command, echoing it; a failure becomes one InstallError line naming the command."""
    log("$ " + " ".join(command))
    if subprocess.run(command).returncode != 0:
        raise InstallError(f"command failed: {' '.join(command)}")


def fetch_sdist(cache_dir: Path) -> Path:
    """Return the verified sdist in ``cache_dir``, downloading it with this environment's pip."""
    sdist = cache_dir / SDIST_FILE
    if not sdist.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            + ["--no-build-isolation", "--dest", str(cache_dir), f"{SDIST_NAME}=={SDIST_VERSION}"]
        )
    else:
        log(f"using cached {sdist}")
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        raise InstallError(f"{sdist}: sha256 {actual}, expected {SDIST_SHA256}; delete it, retry")
    return sdist


def remove_other_installs() -> None:
    """Uninstall every distribution that provides the ``detectron2`` package, whatever its name."""
    owners = sorted(set(importlib.metadata.packages_distributions().get("detectron2", [])))
    if owners:
        run([sys.executable, "-m", "pip", "uninstall", "--yes", *owners])


def pip_install_tree(root: Path, fingerprint: str) -> None:
    """Replace any other detectron2 by the prepared tree at ``root`` and check the result."""
    remove_other_installs()
    run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", str(root)])
    state = installed_state(fingerprint)
    if state != "current":
        raise InstallError(f"after installing, detectron2 is {state} instead of current")
    log("detectron2 installed")


def install_sdist(cache_dir: Path) -> None:
    """Download, patch and pip-install detectron2 0.6 unless a usable copy is already installed."""
    state = installed_state()
    if state in ("official", "current"):
        log(f"detectron2 already installed ({state} build): nothing to do")
        return
    log(f"detectron2 is {state}: building it from {SDIST_FILE}")
    sdist = fetch_sdist(cache_dir)
    with tempfile.TemporaryDirectory(prefix="detectron2-build-", dir=cache_dir) as build_dir:
        with tarfile.open(sdist) as archive:
            archive.extractall(build_dir, filter="data")
        root = Path(build_dir) / f"{SDIST_NAME}-{SDIST_VERSION}"
        finish_tree(root, SDIST_PATCHES, patch_fingerprint(), SDIST_FILE)
        pip_install_tree(root, patch_fingerprint())


def install_source(source: Path, work_dir: Path | None) -> None:
    """Copy, patch and pip-install the checkout at ``source`` unless that is already installed."""
    fingerprint = source_fingerprint(source)
    state = installed_state(fingerprint)
    if state in ("official", "current"):
        log(f"detectron2 already installed ({state} build): nothing to do")
        return
    log(f"detectron2 is {state}: installing it from a patched copy of {source}")
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="detectron2-source-", dir=work_dir) as build_dir:
        root = Path(build_dir) / "detectron2"
        pip_install_tree(root, prepare_source_tree(source, root))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints one error line, returns 2 for a bad --source, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where the downloaded sdist is kept between runs (git-ignored); required without "
        "--source, with it the parent folder of the temporary patched copy",
    )
    parser.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="install from this detectron2 checkout (e.g. a git clone of main) instead of the "
        "0.6 sdist; DIR is copied, never modified",
    )
    args = parser.parse_args(argv)
    if args.source is None and args.cache_dir is None:
        parser.error("--cache-dir is required without --source")
    cache_dir = args.cache_dir.resolve() if args.cache_dir is not None else None
    try:
        if args.source is not None:
            install_source(args.source.resolve(), cache_dir)
        else:
            install_sdist(cache_dir)
    except UnknownTreeError as error:
        print(f"{LOG_PREFIX} error: {error}", file=sys.stderr)
        return 2
    except InstallError as error:
        print(f"{LOG_PREFIX} error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
