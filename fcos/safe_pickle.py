"""Reading untrusted checkpoint files without running code from them.

A pickle can name any importable callable and have the unpickler call it; a downloaded ``.pkl``/``.pth``
is therefore executable. ``.pth`` files go through ``torch.load(weights_only=True)``; ``.pkl`` files
(detectron2/Caffe2 ImageNet backbones: dicts of numpy arrays) through an unpickler that only admits
numpy arrays and plain containers/scalars. Anything else is refused unless the caller opts in with
``allow_unsafe`` (``CHECKPOINT.ALLOW_UNSAFE_PICKLE`` / ``tools/convert.py --allow-unsafe-pickle``).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, FrozenSet, List, Tuple, Union

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct, scalar

logger = logging.getLogger(__name__)

OPT_IN_HINT = (
    "if you trust this file, set CHECKPOINT.ALLOW_UNSAFE_PICKLE True "
    "(or pass --allow-unsafe-pickle to tools/convert.py)"
)

# (module, name) pairs a numpy-array pickle needs, in both numpy 1 ("numpy.core") and numpy 2
# ("numpy._core") spelling, plus Python 2's "__builtin__" (Caffe2-era files) for the plain containers.
_ALLOWED_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
    }
)


# The same admission for torch.load(weights_only=True), which refuses numpy arrays by default. The
# (object, name) pairs also admit files written with numpy 1, which spell the module "numpy.core".
_TORCH_NUMPY_GLOBALS: List[Union[Any, Tuple[Any, str]]] = [
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    scalar,
    (scalar, "numpy.core.multiarray.scalar"),
    np.ndarray,
    np.dtype,
    *(type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64)),
    *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)),
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to import something other than arrays and plain containers."""


class CorruptCheckpointError(ValueError):
    """A file that is no readable checkpoint: truncated (e.g. a download cut short), or not one."""


# What torch.load and pickle raise for a truncated or foreign file (measured with torch 2.x: a cut
# zip raises RuntimeError, an empty file EOFError, text KeyError or UnpicklingError, random bytes
# UnpicklingError, a cut legacy-format file RuntimeError).
_CORRUPT_FILE_ERRORS = (
    RuntimeError,
    EOFError,
    KeyError,
    IndexError,
    ValueError,
    TypeError,
    pickle.UnpicklingError,
)


def _first_sentence(error: BaseException) -> str:
    """``Type: first sentence`` of an error, on one line (torch's zip errors run to a paragraph)."""
    text = " ".join(str(error).split()).split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _corrupt(path: str, reason: str) -> CorruptCheckpointError:
    if os.path.getsize(path) == 0:
        reason = "the file is empty"
    return CorruptCheckpointError(
        f"{path}: not a complete checkpoint file ({reason}): it is truncated (an interrupted "
        "download or copy) or not a PyTorch/pickle checkpoint at all"
    )


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays and plain containers are made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{module}.{name}")


def load_pickle(path: str, *, allow_unsafe: bool = False) -> Any:
    """Unpickle a ``.pkl`` checkpoint (Python 2 pickles included: ``encoding="latin1"``).

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list and ``allow_unsafe`` is off.
        CorruptCheckpointError: the file is truncated or not a pickle.
    """
    with open(path, "rb") as f:
        try:
            if allow_unsafe:
                logger.warning(f"{path}: unpickling without restrictions (ALLOW_UNSAFE_PICKLE on)")
                return pickle.load(f, encoding="latin1")
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle {e}: only numpy arrays and plain containers are allowed in a "
                f"checkpoint, because unpickling anything else can run code; {OPT_IN_HINT}"
            ) from None
        except _CORRUPT_FILE_ERRORS as e:
            raise _corrupt(path, _first_sentence(e)) from e


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    """The one informative paragraph of torch's multi-paragraph weights-only error."""
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    for paragraph in paragraphs:
        if "GLOBAL" in paragraph or "Unsupported" in paragraph:
            return paragraph
    return paragraphs[-1] if paragraphs else type(error).__name__


def load_torch(path: str, *, allow_unsafe: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (numpy arrays admitted); a refusal names the global.

    torch's weights-only unpickler reports a refused global and a corrupt byte stream with the same
    exception type; only the former names the pickle opcode ("... GLOBAL module.name ...").

    Raises:
        UnsafeCheckpointError: the file holds objects ``weights_only`` refuses and ``allow_unsafe`` is off.
        CorruptCheckpointError: the file is truncated or not a checkpoint.
    """
    try:
        with torch.serialization.safe_globals(_TORCH_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):
            raise _corrupt(path, _weights_only_reason(e)) from e
        if not allow_unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused by torch.load(weights_only=True): {_weights_only_reason(e)} "
                f"A checkpoint should hold only tensors and plain containers; {OPT_IN_HINT}"
            ) from None
    except _CORRUPT_FILE_ERRORS as e:
        raise _corrupt(path, _first_sentence(e)) from e
    logger.warning(
        f"{path}: loading with torch.load(weights_only=False) (ALLOW_UNSAFE_PICKLE is on)"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except _CORRUPT_FILE_ERRORS as e:
        raise _corrupt(path, _first_sentence(e)) from e
