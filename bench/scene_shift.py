"""A small COCO-format dataset whose val scenes differ from its train scenes, to choose the
from-scratch recipe (configs/fcos_custom_scratch.yaml) by how it generalises, not by how well it
memorises.

    python -m bench.scene_shift --out datasets/generated/scene_shift [--num-train 320 --num-val 80]

The objects are the embedded dataset's shapes (fcos.data.shapes: the class is the shape, colours
random), but the scenes differ as a user's own photos of new places do:

* train: smooth backgrounds (fcos.data.shapes' gradients and blotches), mid to light colours, 1-4
  objects of 12-60 % of the image's shorter side;
* val: striped, noisy, darker backgrounds with other colour statistics, denser scenes of 3-7 objects
  of 8-45 %.

Images are 160x120 (a non-square size that no config here assumes). Deterministic for given
arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from fcos.data import shapes
from fcos.file_io import write_json_atomic

WIDTH, HEIGHT = 160, 120
PLACEMENT_ATTEMPTS = 40


def striped_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dark base colour + oriented sinusoidal stripes + strong pixel noise (the val scenes)."""
    base = rng.uniform(20.0, 120.0, size=3)
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(4.0, 14.0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    stripes = np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)
    amplitude = rng.uniform(10.0, 30.0, size=3)
    noise = rng.normal(0.0, rng.uniform(4.0, 12.0), size=(height, width, 3))
    image = base + stripes[..., None] * amplitude + noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def smooth_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The embedded dataset's background, lifted towards lighter colours (the train scenes)."""
    image = shapes.render_background(rng, (height, width)).astype(np.int16)
    return np.clip(image + 30, 0, 255).astype(np.uint8)


def _scene(
    rng: np.random.Generator, background: np.ndarray, count: int, fractions: tuple[float, float]
) -> list[shapes.PlacedShape]:
    """Place ``count`` shapes, largest first, longer sides ``fractions`` of the shorter side."""
    height, width = background.shape[:2]
    canvas = shapes._Canvas(background)  # the embedded generator's occlusion and contrast rules
    wanted = []
    for _ in range(count):
        longest = np.exp(rng.uniform(*np.log(np.asarray(fractions) * min(height, width))))
        aspect = np.exp(rng.uniform(np.log(0.7), np.log(1 / 0.7)))
        w, h = (longest, longest / aspect) if aspect >= 1 else (longest * aspect, longest)
        wanted.append((int(rng.integers(1, len(shapes.CLASS_NAMES) + 1)), max(w, 6.0), max(h, 6.0)))
    placed = []
    for category_id, w, h in sorted(wanted, key=lambda t: -t[1] * t[2]):
        for _ in range(PLACEMENT_ATTEMPTS):
            shape = shapes.Shape(
                category_id,
                float(rng.uniform(0, width - w)),
                float(rng.uniform(0, height - h)),
                float(w),
                float(h),
            )
            colour = canvas.try_place(rng, shape)
            if colour is not None:
                placed.append(shapes.PlacedShape(shape, colour))
                break
    return placed


SPLITS: dict[str, tuple[Callable[..., np.ndarray], tuple[int, int], tuple[float, float]]] = {
    "train": (smooth_background, (1, 4), (0.12, 0.60)),
    "val": (striped_background, (3, 7), (0.08, 0.45)),
}


def write_split(out: Path, split: str, num_images: int, seed: int) -> Path:
    """Render ``split`` into ``out/split/`` and ``out/split.json``; returns the JSON path."""
    render, (lo, hi), fractions = SPLITS[split]
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng(
            np.random.SeedSequence([seed, list(SPLITS).index(split), index])
        )
        background = render(rng, HEIGHT, WIDTH)
        placed = _scene(rng, background, int(rng.integers(lo, hi + 1)), fractions)
        file_name = f"{index:05d}.jpg"
        Image.fromarray(shapes.compose(background, placed)).save(
            out / split / file_name, **shapes.JPEG_OPTIONS
        )
        images.append({"id": index + 1, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
        for p in placed:
            mask, _, _ = p.shape.mask()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": p.shape.category_id,
                    "bbox": list(p.shape.tight_box()),
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(shapes.CLASS_NAMES)]
    ann_file = out / f"{split}.json"
    write_json_atomic(
        ann_file, {"images": images, "annotations": annotations, "categories": categories}
    )
    return ann_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="datasets/generated/scene_shift")
    parser.add_argument("--num-train", type=int, default=320)
    parser.add_argument("--num-val", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        print(write_split(out, split, count, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
