"""Tests of the embedded synthetic shapes dataset (fcos.data.shapes): geometry, determinism, COCO validity,
atomic/conditional regeneration, CLI and detectron2 registration. All generations are tiny (<= 20 images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dataset.shapes import main as shapes_main
from fcos.data import shapes
from fcos.data.shapes import CLASS_NAMES, Shape

SIZE = (128, 128)
NUM_TRAIN, NUM_VAL = 20, 6


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shapes.generate_shapes_dataset(
        tmp_path_factory.mktemp("gen") / "shapes", NUM_TRAIN, NUM_VAL, SIZE, seed=3
    )


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO box of a boolean image mask under the module's convention (columns a..b -> x=a, w=b-a+1)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return (
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    )


def _recreate(split: str, index: int, num_images: int, seed: int = 3):
    empty = index in shapes.empty_indices(seed, split, num_images)
    return shapes.sample_image(seed, split, index, SIZE, empty)


# --- geometry and the box convention, hand-computed -------------------------------------------------------


def test_square_box_is_its_pixel_columns_and_rows() -> None:
    # Pixel centres 10.5 .. 19.5 lie in [10, 20] -> columns 10..19 -> x = 10, w = 19 - 10 + 1 = 10.
    assert Shape(2, 10.0, 5.0, 10.0, 4.0).tight_box() == (10.0, 5.0, 10.0, 4.0)
    # [10.2, 13.9]: centres 10.5, 11.5, 12.5, 13.5 -> columns 10..13.
    assert Shape(2, 10.2, 0.0, 3.7, 8.0).tight_box() == (10.0, 0.0, 4.0, 8.0)


def test_circle_box() -> None:
    # Centre (16, 16), radius 5: column 10 (centre 10.5, dx 5.5) is out; column 20 (dx 4.5) is in with
    # the row whose centre is 16.5 (dy 0.5: 4.5² + 0.5² = 20.5 <= 25) -> columns and rows 11..20.
    assert Shape(1, 11.0, 11.0, 10.0, 10.0).tight_box() == (11.0, 11.0, 10.0, 10.0)


def test_triangle_box_skips_the_empty_apex_row() -> None:
    # Apex (4, 0), base y = 8 from x = 0 to 8: row r is in where |c + .5 - 4| <= (r + .5) / 2.
    # Row 0: half-width .25 catches no pixel centre; row 1 (.75) catches columns 3, 4; row 7 all 8.
    mask, c0, r0 = Shape(3, 0.0, 0.0, 8.0, 8.0).mask()
    assert (c0, r0) == (0, 0)
    assert mask[0].sum() == 0 and list(np.flatnonzero(mask[1])) == [3, 4] and mask[7].all()
    assert Shape(3, 0.0, 0.0, 8.0, 8.0).tight_box() == (0.0, 1.0, 8.0, 7.0)


def test_cross_mask_is_a_plus_sign() -> None:
    # 9x9 box, centre 4.5, arm half-width 0.34 * 9 / 2 = 1.53 -> columns/rows 3..5 form the arms.
    mask, _, _ = Shape(4, 0.0, 0.0, 9.0, 9.0).mask()
    expected = np.zeros((9, 9), dtype=bool)
    expected[3:6, :] = True
    expected[:, 3:6] = True
    np.testing.assert_array_equal(mask, expected)


# --- the generated files ----------------------------------------------------------------------------------


def test_json_is_valid_coco(generated: dict[str, Path]) -> None:
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = COCO(str(generated[f"{split}_json"]))
        assert len(coco.getImgIds()) == count
        assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == list(
            enumerate(CLASS_NAMES, 1)
        )
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(generated[f"{split}_images"] / image["file_name"]) as img:
                assert (img.format, img.size) == ("JPEG", (image["width"], image["height"]))
        ann_ids = coco.getAnnIds()
        assert sorted(ann_ids) == list(range(1, len(ann_ids) + 1))
        for ann in coco.loadAnns(ann_ids):
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"]) and ann["iscrowd"] == 0
            assert 0 <= x and 0 <= y and x + w <= SIZE[1] and y + h <= SIZE[0] and min(w, h) >= 1
            assert 0 < ann["area"] <= w * h


def test_boxes_are_tight_extents_of_the_drawn_pixels(generated: dict[str, Path]) -> None:
    data = _load(generated["train_json"])
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    single = 0
    for image in data["images"]:
        background, placed = _recreate("train", image["id"] - 1, NUM_TRAIN)
        anns = by_image.get(image["id"], [])
        assert [a["bbox"] for a in anns] == [list(p.shape.tight_box()) for p in placed]
        assert [a["category_id"] for a in anns] == [p.shape.category_id for p in placed]
        drawn = shapes.compose(background, placed)
        changed = (drawn != background).any(axis=-1)
        union = np.zeros(SIZE, dtype=bool)
        for p in placed:
            mask, c0, r0 = p.shape.mask()
            union[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]] |= mask
        np.testing.assert_array_equal(
            changed, union
        )  # every shape pixel differs from the background
        if len(anns) == 1:
            single += 1
            assert _extent(changed) == tuple(anns[0]["bbox"])
        saved = np.asarray(
            Image.open(generated["train_images"] / image["file_name"]), dtype=np.float64
        )
        psnr = 10 * np.log10(255.0**2 / np.mean((saved - drawn) ** 2))
        assert (
            psnr > 38.0
        ), f"{image['file_name']}: saved JPEG far from the rendered image ({psnr:.1f} dB)"
    assert single > 0


def test_occluded_shapes_stay_mostly_visible(generated: dict[str, Path]) -> None:
    overlapping = 0
    for index in range(NUM_TRAIN):
        _, placed = _recreate("train", index, NUM_TRAIN)
        owner = np.full(SIZE, -1)
        areas = []
        for k, p in enumerate(placed):
            mask, c0, r0 = p.shape.mask()
            owner[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]][mask] = k
            areas.append(mask.sum())
        visible = np.bincount(owner[owner >= 0], minlength=len(placed))
        assert all(v >= shapes.MIN_VISIBLE_FRACTION * a for v, a in zip(visible, areas))
        overlapping += sum(v < a for v, a in zip(visible, areas))
    assert overlapping > 0


def test_every_shape_contrasts_with_all_pixels_it_covers() -> None:
    for index in range(NUM_TRAIN):
        background, placed = _recreate("train", index, NUM_TRAIN)
        for k, p in enumerate(placed):
            below = shapes.compose(background, placed[:k])
            mask, c0, r0 = p.shape.mask()
            covered = below[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]][mask].astype(float)
            assert np.sqrt(((covered - p.colour) ** 2).sum(axis=1)).min() >= shapes.MIN_CONTRAST


def test_empty_images_and_size_range(generated: dict[str, Path]) -> None:
    data = _load(generated["train_json"])
    with_boxes = {a["image_id"] for a in data["annotations"]}
    assert len(data["images"]) - len(with_boxes) == 1  # round(5% of 20)
    longest = [max(a["bbox"][2:]) for a in data["annotations"]]
    assert min(longest) <= 12 and max(longest) >= 0.6 * SIZE[0]
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4}


def test_empty_count_follows_the_fraction() -> None:
    assert [len(shapes.empty_indices(0, "train", n)) for n in (9, 10, 20, 800)] == [0, 1, 1, 40]


def test_same_arguments_give_identical_files(generated: dict[str, Path], tmp_path: Path) -> None:
    again = shapes.generate_shapes_dataset(tmp_path / "again", NUM_TRAIN, NUM_VAL, SIZE, seed=3)
    for key in ("train_json", "val_json", "manifest"):
        assert again[key].read_bytes() == generated[key].read_bytes()
    for split in ("train", "val"):
        files = sorted(p.name for p in generated[f"{split}_images"].iterdir())
        assert files == sorted(p.name for p in again[f"{split}_images"].iterdir())
        for name in files:
            assert (again[f"{split}_images"] / name).read_bytes() == (
                generated[f"{split}_images"] / name
            ).read_bytes()
    other = shapes.generate_shapes_dataset(tmp_path / "other", NUM_TRAIN, NUM_VAL, SIZE, seed=4)
    assert other["train_json"].read_bytes() != generated["train_json"].read_bytes()


# --- regeneration, atomicity, validation, CLI -------------------------------------------------------------


def test_ensure_skips_matching_and_redoes_changed(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    paths = shapes.ensure_shapes_dataset(root, 3, 2, (64, 64))
    sentinel = root / "sentinel"
    sentinel.write_text("kept while parameters match")
    assert shapes.ensure_shapes_dataset(root, 3, 2, (64, 64)) == paths
    assert sentinel.exists()
    shapes.ensure_shapes_dataset(root, 3, 4, (64, 64))
    assert not sentinel.exists()
    assert len(_load(paths["val_json"])["images"]) == 4
    assert _load(paths["manifest"])["params"] == {
        "num_train": 3,
        "num_val": 4,
        "image_size": [64, 64],
        "seed": 0,
    }
    sentinel.write_text("x")
    paths["manifest"].write_text("{not json")
    shapes.ensure_shapes_dataset(root, 3, 4, (64, 64))
    assert not sentinel.exists() and _load(paths["manifest"])["version"] == shapes.GENERATOR_VERSION


def test_interrupted_generation_keeps_the_previous_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shapes"
    paths = shapes.generate_shapes_dataset(root, 2, 2, (64, 64))
    before = paths["train_json"].read_bytes()
    real_write_split = shapes._write_split

    def failing(out_dir: Path, split: str, params: shapes.ShapesParams) -> dict:
        if split == "val":
            raise KeyboardInterrupt
        return real_write_split(out_dir, split, params)

    monkeypatch.setattr(shapes, "_write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate_shapes_dataset(root, 5, 2, (64, 64))
    assert paths["train_json"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock", "shapes"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": 2.5}, "num_val"),
        ({"image_size": (16, 64)}, "image_size"),
        ({"image_size": (64,)}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_named(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        shapes.generate_shapes_dataset(tmp_path / "shapes", **kwargs)
    assert not (tmp_path / "shapes").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cli"
    assert (
        shapes_main(
            ["--root", str(root), "--num-train", "3", "--num-val", "2", "--size", "48", "64"]
        )
        == 0
    )
    assert "train: 3 images" in capsys.readouterr().out
    image = _load(root / "annotations" / "instances_val.json")["images"][0]
    assert (image["height"], image["width"]) == (48, 64)
    with pytest.raises(SystemExit):
        shapes_main(["--root", str(root), "--num-train", "0"])
    assert "num_train" in capsys.readouterr().err


# --- detectron2 registration ------------------------------------------------------------------------------


def test_register_is_idempotent_and_follows_the_latest_root(
    generated: dict[str, Path], tmp_path: Path
) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    prefix = "test_shapes_registry"
    try:
        names = shapes.register_shapes_datasets(generated["root"], prefix=prefix)
        assert names == (f"{prefix}_train", f"{prefix}_val")
        assert shapes.register_shapes_datasets(generated["root"], prefix=prefix) == names
        meta = MetadataCatalog.get(names[0])
        assert meta.thing_classes == list(CLASS_NAMES) and meta.evaluator_type == "coco"
        dicts = DatasetCatalog.get(names[0])
        assert len(dicts) == NUM_TRAIN
        assert sum(len(d["annotations"]) for d in dicts) == len(
            _load(generated["train_json"])["annotations"]
        )
        other = shapes.generate_shapes_dataset(tmp_path / "other", 2, 1, (64, 64))
        shapes.register_shapes_datasets(other["root"], prefix=prefix)
        assert len(DatasetCatalog.get(names[1])) == 1
        assert MetadataCatalog.get(names[1]).json_file == str(other["val_json"])
    finally:
        for name in (f"{prefix}_train", f"{prefix}_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


def test_register_without_data_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="instances_train.json"):
        shapes.register_shapes_datasets(tmp_path / "missing", prefix="test_shapes_missing")
