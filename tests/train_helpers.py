"""Tiny datasets, configs and a train_net.py runner shared by the training tests (tests/test_train_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "train_net.py"
SHAPES_CONFIG = REPO / "configs" / "fcos_shapes.yaml"

# The embedded config shrunk to seconds: 64 px images, ResNet-18 cut after res4 (P3-P4 only, ~2.8 M
# parameters, small checkpoints), one head conv, batch 2.
TINY_SIZE = 64
TINY_OPTS: List[str] = [
    "MODEL.RESNETS.OUT_FEATURES",
    "['res3', 'res4']",
    "MODEL.FPN.IN_FEATURES",
    "['res3', 'res4']",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.FCOS.IN_FEATURES",
    "['p3', 'p4']",
    "MODEL.FCOS.FPN_STRIDES",
    "[8, 16]",
    "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
    "[[-1, 32], [32, 100000]]",
    "MODEL.FCOS.NUM_CONVS",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    f"({TINY_SIZE},)",
    "INPUT.MAX_SIZE_TRAIN",
    str(TINY_SIZE),
    "INPUT.MIN_SIZE_TEST",
    str(TINY_SIZE),
    "INPUT.MAX_SIZE_TEST",
    str(TINY_SIZE),
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.REFERENCE_WORLD_SIZE",
    "0",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.STEPS",
    "()",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def tiny_shapes_opts(root: Path, num_train: int = 8, num_val: int = 4) -> List[str]:
    """Opts that make the embedded config generate a tiny shapes dataset under ``root``."""
    return [
        "DATASETS.SHAPES.ROOT",
        str(root),
        "DATASETS.SHAPES.NUM_TRAIN",
        str(num_train),
        "DATASETS.SHAPES.NUM_VAL",
        str(num_val),
        "DATASETS.SHAPES.IMAGE_SIZE",
        f"({TINY_SIZE}, {TINY_SIZE})",
    ]


def shapes_run(tmp_path: Path, out: Path, *opts: str, flags: Sequence[str] = ()) -> List[str]:
    """train_net.py arguments for the tiny embedded job: ``flags`` (e.g. --eval-only) before the config ``opts``."""
    return [
        "--config-file",
        str(SHAPES_CONFIG),
        *flags,
        *TINY_OPTS,
        *tiny_shapes_opts(tmp_path / "shapes"),
        "OUTPUT_DIR",
        str(out),
        *opts,
    ]


def ap_rows(output: str) -> Dict[str, List[str]]:
    """Rows of the final AP table that train_net.py prints: label -> [AP, AP50, AP75, APs, APm, APl]."""
    table = output[output.rindex("Box AP on") :]
    rows = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7:
            break
        rows[cells[0]] = cells[1:]
    return rows


def write_image(path: Path, width: int = TINY_SIZE, height: int = TINY_SIZE, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def write_coco(
    root: Path,
    name: str,
    categories: Sequence[Dict],
    boxes_per_image: Sequence[Sequence[tuple]],
    size: int = TINY_SIZE,
) -> tuple[Path, Path]:
    """COCO JSON ``root/{name}.json`` and images ``root/{name}/i.png``; ``boxes_per_image`` holds
    ``(category_id, [x, y, w, h])`` pairs. Returns (annotation file, image folder)."""
    image_dir = root / name
    images, annotations = [], []
    for i, boxes in enumerate(boxes_per_image):
        file_name = f"{i}.png"
        write_image(image_dir / file_name, size, size, seed=i)
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for category_id, bbox in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category_id,
                    "bbox": list(bbox),
                    "area": float(bbox[2] * bbox[3]),
                    "iscrowd": 0,
                }
            )
    ann_file = root / f"{name}.json"
    ann_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": list(categories)})
    )
    return ann_file, image_dir


def simple_categories(count: int) -> List[Dict]:
    return [{"id": i + 1, "name": f"class{i + 1}"} for i in range(count)]


def simple_boxes(num_images: int, num_classes: int) -> List[List[tuple]]:
    """Two boxes per image (one small, one large), cycling through the classes."""
    return [
        [
            (1 + i % num_classes, [4.0, 6.0, 14.0, 12.0]),
            (1 + (i + 1) % num_classes, [20.0, 16.0, 40.0, 44.0]),
        ]
        for i in range(num_images)
    ]


def run_train_net(
    args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run ``train_net.py`` in a fresh process (cwd = repo root), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(TRAIN_NET), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# IoU quality, a deformable tower and a P2 level (res2-res4), all together: the options of
# docs/MODEL.md in one config (tiny-config overrides for train_net.py and merge_from_list).
OPTIONS_OPTS = [
    "MODEL.RESNETS.OUT_FEATURES",
    "['res2', 'res3', 'res4']",
    "MODEL.FPN.IN_FEATURES",
    "['res2', 'res3', 'res4']",
    "MODEL.FCOS.IN_FEATURES",
    "['p2', 'p3', 'p4']",
    "MODEL.FCOS.FPN_STRIDES",
    "[4, 8, 16]",
    "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST",
    "[[-1, 16], [16, 32], [32, 100000]]",
    "MODEL.FCOS.BOX_QUALITY",
    "iou",
    "MODEL.FCOS.USE_DCN_IN_TOWER",
    "True",
]
