"""How the applications end on an error: one line on stderr, an exit status, no traceback.

Every command line (train_net.py, demo/demo.py, tools/export.py, tools/convert.py, dataset/check.py,
dataset/voc2coco.py) runs its body through :func:`run`. The project's exceptions for bad input
(config, data, weights, process layout) become ``prog: error: <message>`` and exit status 2, as
argparse does for a bad flag; a training run that diverged (NaN/Inf) exits with 1. Any other
exception is a bug and keeps its traceback. ``FCOS_DEBUG=1`` prints the traceback of the handled
errors as well, and keeps it in the training log (:func:`quiet_expected_errors`).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, Iterable, Tuple, Type

from fcos.checkpoint import CheckpointMismatchError, ResumeError
from fcos.checkpoint_layouts import UnknownLayoutError
from fcos.config import FCOSConfigError
from fcos.data.common import DatasetError
from fcos.errors import NonFiniteLossError
from fcos.safe_pickle import CorruptCheckpointError, UnsafeCheckpointError

from .config import SetupError
from .launch import LaunchError

DEBUG_ENV = "FCOS_DEBUG"
USER_ERRORS: Tuple[Type[BaseException], ...] = (
    SetupError,
    DatasetError,
    FCOSConfigError,
    LaunchError,
    CheckpointMismatchError,
    UnknownLayoutError,
    UnsafeCheckpointError,
    CorruptCheckpointError,
    ResumeError,
)
RUN_FAILURES: Tuple[Type[BaseException], ...] = (NonFiniteLossError,)
EXPECTED_ERRORS = USER_ERRORS + RUN_FAILURES
# detectron2's training loop logs every exception with its traceback before re-raising it.
TRAIN_LOOP_LOGGER = "detectron2.engine.train_loop"


def debug_enabled() -> bool:
    """Whether ``FCOS_DEBUG`` asks for tracebacks (set and not "0" or empty)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_status(error: BaseException) -> int:
    """2 for bad input, 1 for a run that failed on its own (divergence)."""
    return 2 if isinstance(error, USER_ERRORS) else 1


def report(prog: str, error: BaseException) -> int:
    """Print ``prog: error: <message>`` (continuation lines indented) and return the exit status."""
    if debug_enabled():
        traceback.print_exception(type(error), error, error.__traceback__)
    first, *rest = str(error).splitlines() or [type(error).__name__]
    print(f"{prog}: error: {first}", *(f"  {line}" for line in rest), sep="\n", file=sys.stderr)
    return exit_status(error)


def run(prog: str, main: Callable[[], int]) -> int:
    """``main()``'s exit status, or the one :func:`report` gives for an expected error."""
    try:
        return main()
    except EXPECTED_ERRORS as error:
        return report(prog, error)


class _StripExpectedTraceback(logging.Filter):
    """Log an expected error as its message on the record's line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, EXPECTED_ERRORS) and not debug_enabled():
            record.msg = f"{record.getMessage()} {error}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_expected_errors(logger_names: Iterable[str] = (TRAIN_LOOP_LOGGER,)) -> None:
    """Keep tracebacks of expected errors out of these loggers (idempotent; for every process)."""
    for name in logger_names:
        target = logging.getLogger(name)
        if not any(isinstance(f, _StripExpectedTraceback) for f in target.filters):
            target.addFilter(_StripExpectedTraceback())
