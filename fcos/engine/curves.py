"""The training-curve PNG: losses, learning rate and AP per evaluation, drawn from ``metrics.json``.

``metrics.json`` (detectron2's JSONWriter, appended across ``--resume``) is the only complete record of a
run that was interrupted and resumed, so the plot reads it rather than the in-memory history.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402

from fcos.file_io import atomic_output  # noqa: E402

CURVE_FILE = "training_curves.png"
AP_KEYS = ("bbox/AP", "bbox/AP50", "bbox/AP75")

Series = Dict[str, List[Tuple[int, float]]]


def read_metrics(path: str | os.PathLike[str]) -> Dict[int, Dict[str, float]]:
    """Per iteration, the last value of each metric written for it.

    A resumed run rewrites the iterations after its checkpoint, so later lines win. A torn last line
    (the process was killed while writing) is skipped rather than failing the plot.
    """
    by_iter: Dict[int, Dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
                iteration = int(entry.pop("iteration"))
            except (ValueError, KeyError, TypeError):
                continue
            by_iter.setdefault(iteration, {}).update(
                {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
            )
    return by_iter


def archive_previous_metrics(output_dir: str | os.PathLike[str]) -> Optional[Path]:
    """Rename an earlier run's ``metrics.json`` before a fresh (not resumed) run in the same folder.

    detectron2's JSONWriter appends, so the new run's curve would otherwise mix in the old run's values.
    Returns the new name of the old file, or None if there was none.
    """
    metrics = Path(output_dir) / "metrics.json"
    if not metrics.is_file():
        return None
    archived = metrics.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.replace(metrics, archived)
    return archived


def _series(by_iter: Dict[int, Dict[str, float]], keys: List[str]) -> Series:
    return {k: [(i, m[k]) for i, m in sorted(by_iter.items()) if k in m] for k in keys}


def plot_training_curves(
    metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> bool:
    """Draw losses, lr and AP from ``metrics_path`` into ``out_path`` (written atomically).

    Returns False, writing nothing, when the file has no training metrics yet.
    """
    if not os.path.isfile(metrics_path):
        return False
    by_iter = read_metrics(metrics_path)
    names = sorted({k for m in by_iter.values() for k in m})
    loss_keys = [k for k in names if k.startswith("loss") or k == "total_loss"]
    if not loss_keys:
        return False
    panels = [
        ("loss", _series(by_iter, loss_keys), True),
        ("learning rate", _series(by_iter, ["lr"]), False),
    ]
    ap = {k: v for k, v in _series(by_iter, list(AP_KEYS)).items() if v}
    if ap:
        panels.append(("box AP (val)", ap, False))

    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (title, series, log_scale) in zip(axes[:, 0], panels):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if title.startswith("box AP") else None, label=name)
        if log_scale and all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()

    try:
        with atomic_output(out_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return True
