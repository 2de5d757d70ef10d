"""Training-side config keys that detectron2 0.6 lacks, and the project's full config schema.

``SOLVER.OPTIMIZER`` exists because detectron2 0.6 only builds SGD, and from-scratch training of the
embedded config in a CPU budget needs AdamW (measured: AdamW lr 1e-3 far ahead of SGD 0.01 in minutes).
``DATASETS.SHAPES`` describes the embedded synthetic dataset, so one config file fully defines the
README's first command, data included. ``DATASETS.STRICT_BOXES`` chooses between dropping boxes with
no area inside their image (default) and refusing the dataset.

:func:`merge_config` is how every application builds its config from a file and ``KEY VALUE``
overrides: the merge is detectron2's (``_BASE_`` chains, version upgrade, yacs type checks), and
each error it can raise becomes one line naming the file (the one in the ``_BASE_`` chain that holds
the key) or the command line, the key, and for a typo the closest existing keys.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from fcos.config import add_fcos_config
from fcos.data import shapes

from .augmentation import add_color_jitter_config

OPTIMIZERS = ("SGD", "ADAMW")


class SetupError(ValueError):
    """A problem with the run's config, data or weights found before training; the message says what to fix."""


def add_training_config(cfg: CN) -> None:
    """Add ``SOLVER.OPTIMIZER``/``BETAS``/``AMP.PRECISION``/``EPOCHS``, ``INPUT.SIZES_FROM_DATA``, ``DATASETS.SHAPES.*``."""
    cfg.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2); SGD uses SOLVER.MOMENTUM instead.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # True: INPUT.MIN/MAX_SIZE_TRAIN/TEST and MODEL.FCOS.OBJECT_SIZES_OF_INTEREST are derived
    # from the run's datasets (fcos.data.sizes) when train_net.py starts; the run's config.yaml
    # holds the values.
    cfg.INPUT.SIZES_FROM_DATA = False
    # > 0: SOLVER.MAX_ITER = ceil(EPOCHS * training images / IMS_PER_BATCH), and STEPS, WARMUP_ITERS,
    # TEST.EVAL_PERIOD, SOLVER.CHECKPOINT_PERIOD scaled with it (fcos.engine.schedule).
    cfg.SOLVER.EPOCHS = 0
    add_color_jitter_config(cfg)
    # Training autocast dtype with detectron2's SOLVER.AMP.ENABLED: "auto" (float16 + GradScaler
    # on CUDA, bfloat16 on a CPU with native bf16, else fp32) | "float16" | "bfloat16"
    # (fcos.precision).
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.DATASETS.SHAPES = CN()
    # Where the embedded dataset is generated; "" = fcos.data.shapes' default (datasets/generated/shapes in the repository).
    cfg.DATASETS.SHAPES.ROOT = ""
    cfg.DATASETS.SHAPES.NUM_TRAIN = shapes.DEFAULT_NUM_TRAIN
    cfg.DATASETS.SHAPES.NUM_VAL = shapes.DEFAULT_NUM_VAL
    # (height, width) of every generated image.
    cfg.DATASETS.SHAPES.IMAGE_SIZE = tuple(shapes.DEFAULT_IMAGE_SIZE)
    cfg.DATASETS.SHAPES.SEED = 0
    # Training boxes with no area inside their image (zero or negative size, or entirely outside):
    # False drops them with one warning that counts them, True refuses the dataset.
    cfg.DATASETS.STRICT_BOXES = False


def get_fcos_cfg() -> CN:
    """detectron2's defaults plus the FCOS library's keys (``add_fcos_config``) and the training keys above."""
    cfg = get_cfg()
    add_fcos_config(cfg)
    add_training_config(cfg)
    return cfg


# What yacs says about a bad key or value (yacs 0.1.x; detectron2 and fvcore pass these through).
_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")
_RENAMED_KEY = re.compile(
    r"Key (\S+) was renamed to (\S+); please update your config\.(?: Note: (.*))?", re.S
)
_TYPE_MISMATCH = re.compile(
    r"Type mismatch \((.+?) vs\. (.+?)\) with values \((.*) vs\. (.*)\) for config key: (\S+)", re.S
)
COMMAND_LINE = "command-line override"


class _KeysOnlyLoader(yaml.SafeLoader):
    """Safe YAML loading that reads Python-tagged values (which detectron2 loads unsafely) as None:
    finding which file sets a key needs the keys, never the objects."""


_KeysOnlyLoader.add_multi_constructor("", lambda loader, tag, node: None)


def merge_config(cfg: CN, config_file: Optional[str], opts: Sequence[str]) -> None:
    """Merge ``config_file`` (if given) and ``KEY VALUE`` ``opts`` into ``cfg``, in place.

    Raises:
        SetupError: one line naming the culprit: a missing or unparsable file (or ``_BASE_``), an
            unknown key with the closest existing ones, a renamed key, a value of the wrong type.
    """
    if config_file:
        chain = _yaml_chain(config_file)
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError) as err:
            raise _config_error(cfg, err, chain) from None
    if len(opts) % 2:
        raise SetupError(
            f"{COMMAND_LINE}s need KEY VALUE pairs, got an odd number of items: {list(opts)}"
        )
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as err:
        raise _config_error(cfg, err, []) from None


def _yaml_chain(config_file: str) -> List[Tuple[str, Dict[str, Any]]]:
    """(file, parsed YAML) of ``config_file`` and its ``_BASE_`` files, depth first, as detectron2
    resolves them (relative to the including file); missing or unparsable files are a SetupError."""
    chain: List[Tuple[str, Dict[str, Any]]] = []

    def visit(path: str, included_by: Optional[str]) -> None:
        where = f"_BASE_ of {included_by}" if included_by else "--config-file"
        if not os.path.isfile(path):
            raise SetupError(f"{where}: {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_KeysOnlyLoader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise SetupError(f"{path}: not valid YAML: {problem}{at}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise SetupError(f"{path}: cannot read the config file: {err}") from None
        if not isinstance(data, dict):
            raise SetupError(
                f"{path}: expected a mapping of config keys (KEY: value), got {type(data).__name__}"
            )
        chain.append((path, data))
        bases = data.get("_BASE_", [])
        for base in [bases] if isinstance(bases, str) else bases:
            if base.startswith(("https://", "http://")):
                continue  # fetched by detectron2's PathManager; not searched for culprits
            base = os.path.expanduser(base)
            if not os.path.isabs(base):
                base = os.path.join(os.path.dirname(path), base)
            visit(base, path)

    visit(config_file, None)
    return chain


def all_keys(cfg: CN, prefix: str = "") -> Iterator[str]:
    """Every dotted leaf key of ``cfg``."""
    for name, value in cfg.items():
        if isinstance(value, CN):
            yield from all_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _culprit(chain: List[Tuple[str, Dict[str, Any]]], key: str) -> str:
    """The file of the ``_BASE_`` chain whose YAML sets ``key`` (else the command line)."""
    for index, (path, data) in enumerate(chain):
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            return path if index == 0 else f"{path} (in the _BASE_ chain of {chain[0][0]})"
    return chain[0][0] if chain else COMMAND_LINE


def _type_name(text: str) -> str:
    match = re.fullmatch(r"<class '([\w.]+)'>", text.strip())
    return match.group(1) if match else text


def _config_error(
    cfg: CN, err: BaseException, chain: List[Tuple[str, Dict[str, Any]]]
) -> SetupError:
    """A one-line SetupError for what yacs raised while merging."""
    message = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    unknown = _UNKNOWN_KEY.search(message)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, list(all_keys(cfg)), n=3, cutoff=0.8)
        others = f" (or {', '.join(close[1:])})" if len(close) > 1 else ""
        hint = f"; did you mean {close[0]}{others}?" if close else " (see the README's config keys)"
        return SetupError(f"{_culprit(chain, key)}: {key} is not a config key{hint}")
    renamed = _RENAMED_KEY.search(message)
    if renamed:
        key, new_key, note = renamed.groups()
        why = f" ({note.strip()})" if note else ""
        where = _culprit(chain, key)
        return SetupError(f"{where}: {key} was renamed to {new_key}{why}; use {new_key}")
    mismatch = _TYPE_MISMATCH.search(message)
    if mismatch:
        expected, given, default, value, key = mismatch.groups()
        return SetupError(
            f"{_culprit(chain, key)}: {key} must be of type {_type_name(expected)} "
            f"(the value it replaces is {default}), got {value!r} of type {_type_name(given)}"
        )
    return SetupError(f"{chain[0][0] if chain else COMMAND_LINE}: {' '.join(message.split())}")
