"""Which COCOeval computes the COCO metrics, and an evaluator that can run faster-coco-eval's.

detectron2's ``COCOEvaluator`` knows two implementations: pycocotools' ``COCOeval``, whose
per-image matching is pure Python (minutes on COCO val on a slow CPU), and its own
``COCOeval_opt``, which runs that matching in detectron2's compiled extension. Installs without
the extension (the patched sdist, source installs without a compiler, most Windows setups) only
have the slow one. faster-coco-eval ships the same C++ algorithm as wheels for Linux and Windows
with numpy as its only dependency, and its summary statistics equal pycocotools'
(``tests/test_coco_eval.py``), so it stands in for ``COCOeval_opt`` there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Dict, Iterator, List, Optional

from detectron2.evaluation import COCOEvaluator as _DetectronCOCOEvaluator
from detectron2.evaluation import coco_evaluation

logger = logging.getLogger(__name__)

FASTER_COCO_EVAL_HINT = "pip install faster-coco-eval (pinned in requirements.txt)"


def faster_cocoeval_class() -> Optional[type]:
    """faster-coco-eval's drop-in ``COCOeval`` (pycocotools' interface and output), or None."""
    try:
        from faster_coco_eval.core.faster_eval_api import COCOeval
    except ImportError:
        return None
    return COCOeval


def implementation_name(cocoeval_class: type) -> str:
    """``module.Class`` plus the distribution's version when it has one, for the log."""
    name = f"{cocoeval_class.__module__}.{cocoeval_class.__qualname__}"
    package = cocoeval_class.__module__.split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    return f"{name} ({package} {version})" if version else name


def _can_substitute_fast_cocoeval(evaluator: _DetectronCOCOEvaluator) -> bool:
    """Whether this detectron2 picks its fast COCOeval the way :func:`_fast_cocoeval` relies on.

    Both 0.6 and main read the module global ``COCOeval_opt`` when they evaluate and keep the
    choice in the evaluator's ``_use_fast_impl``; a detectron2 that stops doing so gets
    pycocotools instead of a substitution that silently does nothing.
    """
    return hasattr(coco_evaluation, "COCOeval_opt") and hasattr(evaluator, "_use_fast_impl")


@contextlib.contextmanager
def _fast_cocoeval(cocoeval_class: type) -> Iterator[None]:
    """Make ``cocoeval_class`` detectron2's fast COCOeval for the duration of the block.

    detectron2 has no argument for the class: 0.6 looks up ``COCOeval_opt`` in
    ``_evaluate_predictions_on_coco``, main in ``COCOEvaluator._eval_predictions``, both at call
    time. Rebinding that one name only while one evaluator evaluates leaves pycocotools and every
    other evaluator as they are; faster-coco-eval's own ``init_as_pycocotools()`` would instead
    replace the pycocotools modules for the whole process, including the ``COCO`` class datasets
    are loaded with.
    """
    saved = coco_evaluation.COCOeval_opt
    coco_evaluation.COCOeval_opt = cocoeval_class
    try:
        yield
    finally:
        coco_evaluation.COCOeval_opt = saved


class COCOEvaluator(_DetectronCOCOEvaluator):
    """detectron2's ``COCOEvaluator``, optionally on another fast COCOeval, reporting which one ran.

    ``fast_cocoeval`` (a class with pycocotools' ``COCOeval`` interface) replaces detectron2's
    ``COCOeval_opt``; None keeps detectron2's own choice from ``use_fast_impl``. After
    ``evaluate()``, ``implementations`` maps each task ("bbox") to the COCOeval that computed it
    (also logged), and ``summary_stats`` to its 12 summary numbers (detectron2's results keep only
    the six APs).
    """

    def __init__(
        self, dataset_name: str, *args, fast_cocoeval: Optional[type] = None, **kwargs
    ) -> None:
        super().__init__(dataset_name, *args, **kwargs)
        if fast_cocoeval is not None and not _can_substitute_fast_cocoeval(self):
            self._logger.warning(
                "This detectron2 does not pick its fast COCOeval through COCOeval_opt; "
                "%s is not used.",
                implementation_name(fast_cocoeval),
            )
            fast_cocoeval = None
        self.fast_cocoeval = fast_cocoeval
        if fast_cocoeval is not None:
            # detectron2 reads COCOeval_opt only on its fast path.
            self._use_fast_impl = True
        self.implementations: Dict[str, str] = {}
        self.summary_stats: Dict[str, List[float]] = {}

    def _eval_predictions(self, predictions, img_ids=None) -> None:
        if self.fast_cocoeval is None:
            super()._eval_predictions(predictions, img_ids=img_ids)
            return
        with _fast_cocoeval(self.fast_cocoeval):
            super()._eval_predictions(predictions, img_ids=img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is not None:
            name = implementation_name(type(coco_eval))
            self._logger.info("COCO %s metrics computed by %s", iou_type, name)
            self.implementations[iou_type] = name
            self.summary_stats[iou_type] = [float(v) for v in coco_eval.stats]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


def build_evaluator(dataset_name: str, output_dir: str, detectron2_fast: bool) -> COCOEvaluator:
    """Box AP evaluator on the fastest COCOeval available, all giving pycocotools' numbers.

    ``detectron2_fast`` says whether detectron2's compiled ``COCOeval_opt`` works; if not,
    faster-coco-eval's COCOeval is used, and pycocotools' only when that package is missing.
    """
    fast_cocoeval = None if detectron2_fast else faster_cocoeval_class()
    if not detectron2_fast and fast_cocoeval is None:
        logger.warning(
            "detectron2 has no compiled COCOeval and faster-coco-eval is not installed: COCO "
            "evaluation uses pycocotools' pure-Python COCOeval (slow on large datasets; %s).",
            FASTER_COCO_EVAL_HINT,
        )
    return COCOEvaluator(
        dataset_name,
        tasks=("bbox",),
        output_dir=output_dir,
        use_fast_impl=detectron2_fast,
        fast_cocoeval=fast_cocoeval,
    )
