"""fcos.data.sizes: image/box size statistics and the input sizes and level ranges suggested from
them, and train_net.py's INPUT.SIZES_FROM_DATA that applies them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import numpy as np
import pytest
import yaml
from train_helpers import REPO, simple_categories, write_coco

import train_net
from dataset.check import main as check_main
from fcos.data.sizes import size_stats, suggest_sizes

SCRATCH = REPO / "configs" / "fcos_custom_scratch.yaml"


def _data(box_sides: List[float], width: int = 400, height: int = 300) -> dict:
    images = [
        {"id": 1, "file_name": "a.jpg", "width": width, "height": height},
        {"id": 2, "file_name": "b.jpg", "width": height, "height": width},
    ]  # portrait
    annotations = [
        {
            "id": i + 1,
            "image_id": 1 + i % 2,
            "category_id": 1,
            "bbox": [0, 0, s / 2, s],
            "iscrowd": 0,
        }
        for i, s in enumerate(box_sides)
    ]
    annotations.append(
        {"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 300, 300], "iscrowd": 1}
    )
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}


def test_statistics_use_the_longer_box_side_and_skip_crowd_boxes() -> None:
    stats = size_stats(_data([30.0, 60.0, 90.0]))
    assert stats.short_sides.tolist() == [300, 300] and stats.long_sides.tolist() == [400, 400]
    assert stats.box_sides.tolist() == [30.0, 60.0, 90.0]
    assert stats.relative_box_sides.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_suggestion_keeps_the_native_size_and_splits_levels_by_quantile_within_4_to_8_strides() -> (
    None
):
    # 300 px shorter side -> test size 304 (16 px steps); widest image 4:3 -> 304 * 4 / 3 = 405.3
    # -> 416.
    # Half longer sides at 304 px: 30 px boxes -> 15.2, ..., 240 px -> 121.6.
    sides = [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0]
    s = suggest_sizes(size_stats(_data(sides)), [8, 16, 32])
    assert s is not None
    assert s.min_size_test == 304 and s.max_size_test == 416
    assert s.min_size_train == (304,)  # single scale, the test size
    assert s.max_size_train == 416
    distances = np.asarray(sides) * 304 / 300 / 2
    q1, q2 = np.quantile(distances, 1 / 3), np.quantile(distances, 2 / 3)
    assert 32 <= q1 <= 64 and 64 <= q2 <= 128  # inside the clamps, so the quantiles themselves
    assert s.object_sizes_of_interest == (
        (-1.0, float(round(q1))),
        (float(round(q1)), float(round(q2))),
        (float(round(q2)), math.inf),
    )
    assert sum(s.level_shares) == pytest.approx(1.0)


def test_level_bounds_are_clamped_to_4_and_8_strides() -> None:
    tiny = suggest_sizes(size_stats(_data([10.0, 12.0, 14.0])), [8, 16])
    huge = suggest_sizes(size_stats(_data([280.0, 290.0, 300.0])), [8, 16])
    assert tiny.object_sizes_of_interest == ((-1.0, 32.0), (32.0, math.inf))  # 4 x 8
    assert huge.object_sizes_of_interest == ((-1.0, 64.0), (64.0, math.inf))  # 8 x 8
    assert tiny.level_shares == (1.0, 0.0) and huge.level_shares == (0.0, 1.0)


def test_large_images_are_capped_and_no_boxes_gives_no_suggestion() -> None:
    s = suggest_sizes(size_stats(_data([500.0], width=4000, height=3000)), [8, 16, 32])
    assert s.min_size_test == 800 and s.max_size_test == 1072  # 800 * 4 / 3 = 1066.7 -> 1072
    assert suggest_sizes(size_stats(_data([])), [8, 16]) is None


def test_checker_prints_percentiles_and_the_suggestion(tmp_path: Path, capsys) -> None:
    ann, images = write_coco(
        tmp_path, "d", simple_categories(1), [[(1, [4.0, 6.0, 14.0, 12.0])]] * 3, size=64
    )
    assert check_main(["--ann_file", str(ann), "--image_dir", str(images)]) == 0
    out = capsys.readouterr().out
    # 64 px images, one 14 px box each (0.219 of the shorter side); levels of the scratch config.
    assert "box longer side                          14     14     14     14     14" in out
    assert "suggested for FCOS levels of strides [8, 16, 32]" in out
    assert "  INPUT.MIN_SIZE_TEST 64\n" in out
    assert "  MODEL.FCOS.OBJECT_SIZES_OF_INTEREST [[-1, 32], [32, 64], [64, 100000000]]" in out
    assert (
        check_main(
            ["--ann_file", str(ann), "--image_dir", str(images), "--config-file", "nope.yaml"]
        )
        == 2
    )


def test_sizes_from_data_set_the_config_and_command_line_values_win(
    tmp_path: Path, catalog: List[str]
) -> None:
    boxes = [[(1, [0.0, 0.0, 20.0, 40.0]), (1, [10.0, 10.0, 80.0, 90.0])]] * 2
    train, train_dir = write_coco(tmp_path, "train", simple_categories(1), boxes, size=96)
    catalog += [f"t_{tmp_path.name}", f"v_{tmp_path.name}"]
    argv = [
        "--config-file",
        str(SCRATCH),
        "--ann_file_train",
        str(train),
        "--image_dir_train",
        str(train_dir),
        "--name_train",
        catalog[0],
        "--ann_file_val",
        str(train),
        "--image_dir_val",
        str(train_dir),
        "--name_val",
        catalog[1],
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    cfg = train_net.setup_config(
        train_net.build_parser().parse_args(argv + ["INPUT.MAX_SIZE_TEST", "500"]), 1
    )
    # 96 px images; half longer sides 20 and 45 px: the P3/P4 split is clamped to 4 x 8 = 32 px,
    # the P4/P5 split (median, 32.5) to 4 x 16 = 64 px.
    assert cfg.INPUT.MIN_SIZE_TEST == 96 and cfg.INPUT.MIN_SIZE_TRAIN == (96,)
    assert cfg.INPUT.MAX_SIZE_TEST == 500  # given on the command line
    assert cfg.MODEL.FCOS.OBJECT_SIZES_OF_INTEREST == [[-1.0, 32.0], [32.0, 64.0], [64.0, math.inf]]
    assert cfg.INPUT.SIZES_FROM_DATA is False  # resolved: config.yaml reproduces the values
    dumped = yaml.safe_load(cfg.dump())
    assert dumped["INPUT"]["MIN_SIZE_TEST"] == 96 and dumped["INPUT"]["SIZES_FROM_DATA"] is False
