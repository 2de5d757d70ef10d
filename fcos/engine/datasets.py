"""Which datasets a run uses, and the checks that stop a bad one before training starts.

Three sources, all ending as names in ``DATASETS.TRAIN``/``DATASETS.TEST``:

* detectron2's built-in COCO names (``coco_2017_train`` ...), found under ``$DETECTRON2_DATASETS``;
* the embedded synthetic shapes (``shapes_train``/``shapes_val``), generated on first use;
* custom COCO-format files given on the command line, which replace the config's datasets **only when
  given** (so plain COCO training needs no annotation flags).

``MODEL.FCOS.NUM_CLASSES`` follows the datasets' categories unless the user set it; a mismatch is the most
common FCOS mistake (it trains, then evaluates garbage), so it is an error here, before any iteration.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

from fcos.data import shapes
from fcos.data.check import check_coco_dataset, degenerate_box
from fcos.data.common import DatasetError, coco_category_names
from fcos.data.sizes import SizeStats, size_stats, suggest_sizes

from .config import SetupError, get_fcos_cfg

logger = logging.getLogger(__name__)

NUM_CLASSES_KEY = "MODEL.FCOS.NUM_CLASSES"


@dataclass(frozen=True)
class CustomDataset:
    """One COCO-format dataset given on the command line."""

    name: str
    ann_file: str
    image_dir: str


def custom_datasets_from_args(
    ann_file_train: Optional[str],
    image_dir_train: Optional[str],
    name_train: str,
    ann_file_val: Optional[str],
    image_dir_val: Optional[str],
    name_val: str,
) -> Tuple[Optional[CustomDataset], Optional[CustomDataset]]:
    """Pair each annotation file with its image folder; a file without a folder (or vice versa) is an error."""
    pairs = []
    for split, ann_file, image_dir, name in (
        ("train", ann_file_train, image_dir_train, name_train),
        ("val", ann_file_val, image_dir_val, name_val),
    ):
        if (ann_file is None) != (image_dir is None):
            raise SetupError(
                f"--ann_file_{split} and --image_dir_{split} go together: give both or neither"
            )
        pairs.append(None if ann_file is None else CustomDataset(name, ann_file, image_dir))
    if pairs[0] is not None and pairs[1] is not None and pairs[0].name == pairs[1].name:
        raise SetupError(
            f"--name_train and --name_val are both {pairs[0].name!r}; give them different names"
        )
    return pairs[0], pairs[1]


def empty_images_note(split: str, filter_empty: bool) -> str:
    """What this run does with a dataset's images without annotations, for the checker's warning."""
    if split == "val":
        return (
            "they are evaluated as images without objects "
            "(every detection on them is a false positive)"
        )
    if filter_empty:
        return (
            "they are dropped from training (DATALOADER.FILTER_EMPTY_ANNOTATIONS is True); "
            "set it False to train on them as images without objects"
        )
    return "they train as images without objects (DATALOADER.FILTER_EMPTY_ANNOTATIONS is False)"


def check_custom_dataset(
    dataset: CustomDataset, empty_note: str, strict_boxes: bool = False
) -> None:
    """Run the dataset checker (image headers only: fast) and turn its errors into one exception.

    Catches non-COCO JSON, missing/unreadable images and unknown category ids before minutes of
    model building and training are spent. The checker's messages already name the file;
    ``empty_note`` says what the run does with images without annotations. Degenerate boxes are one
    warning (the loader drops them), or errors with ``strict_boxes`` (``DATASETS.STRICT_BOXES``).
    """
    report = check_coco_dataset(
        dataset.ann_file, dataset.image_dir, strict_boxes=strict_boxes, empty_images_note=empty_note
    )
    if not report.ok:
        raise SetupError(f"dataset {dataset.name!r} is not usable:\n{report.format()}")
    for warning in report.warnings:
        logger.warning(warning)


def register_custom_dataset(dataset: CustomDataset) -> None:
    """Register ``dataset`` as COCO instances; registering the same files again is a no-op."""
    ann_file = os.path.abspath(dataset.ann_file)
    image_dir = os.path.abspath(dataset.image_dir)
    if dataset.name in DatasetCatalog.list():
        meta = MetadataCatalog.get(dataset.name)
        if meta.get("json_file") == ann_file and meta.get("image_root") == image_dir:
            return
        raise SetupError(
            f"dataset name {dataset.name!r} is already registered (for {meta.get('json_file')}); "
            "choose another --name_train/--name_val"
        )
    register_coco_instances(
        dataset.name, {"thing_classes": coco_category_names(ann_file)}, ann_file, image_dir
    )


def use_custom_datasets(
    cfg: CfgNode, train: Optional[CustomDataset], val: Optional[CustomDataset], check: bool
) -> None:
    """Register the given custom datasets and point ``DATASETS.TRAIN``/``TEST`` at them (cfg unfrozen).

    Nothing changes when no custom dataset is given. A custom training set without a validation set
    disables evaluation: evaluating a custom model on the config's dataset (e.g. COCO) is meaningless.
    """
    given = [d for d in (train, val) if d is not None]
    if check:
        for split, dataset in (("train", train), ("val", val)):
            if dataset is not None:
                note = empty_images_note(split, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
                check_custom_dataset(dataset, note, strict_boxes=cfg.DATASETS.STRICT_BOXES)
    for dataset in given:
        register_custom_dataset(dataset)
    if train is not None:
        cfg.DATASETS.TRAIN = (train.name,)
        if val is None:
            logger.warning(
                "--ann_file_train without --ann_file_val: no evaluation (DATASETS.TEST is empty)"
            )
            cfg.DATASETS.TEST = ()
    if val is not None:
        cfg.DATASETS.TEST = (val.name,)


def uses_shapes(cfg: CfgNode) -> bool:
    """Whether the config names the embedded dataset (shapes_train/shapes_val) in DATASETS.TRAIN or TEST."""
    names = {f"shapes_{split}" for split in shapes.SPLITS}
    return bool(names & set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST))


def prepare_shapes(cfg: CfgNode) -> None:
    """Generate the embedded dataset as ``DATASETS.SHAPES`` describes (if not already there) and register it.

    Safe in every process of a multi-process run: generation is locked and skipped when up to date.
    """
    sc = cfg.DATASETS.SHAPES
    root = sc.ROOT or shapes.DEFAULT_ROOT
    logger.info(
        f"Embedded shapes dataset in {root} (generated on first use, or when DATASETS.SHAPES changes)"
    )
    shapes.ensure_shapes_dataset(root, sc.NUM_TRAIN, sc.NUM_VAL, tuple(sc.IMAGE_SIZE), sc.SEED)
    shapes.register_shapes_datasets(root)


def _datasets_root_hint() -> str:
    value = os.environ.get("DETECTRON2_DATASETS")
    if value is None:
        where = f"DETECTRON2_DATASETS is not set, so detectron2 looked in ./datasets under {os.getcwd()}"
    else:
        where = f"DETECTRON2_DATASETS={value}"
    return (
        f"{where}. Set DETECTRON2_DATASETS to the folder that contains coco/annotations/instances_*2017.json "
        "and coco/train2017, coco/val2017 (export DETECTRON2_DATASETS=/path/to/datasets), "
        "or train on your own files with --ann_file_train/--image_dir_train"
    )


def check_datasets_exist(names: Iterable[str], config_key: str) -> None:
    """Every name is registered and its annotation file and image folder exist (fails with a fix)."""
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise SetupError(
                f"{config_key}: dataset {name!r} is not registered; use a detectron2 built-in name "
                "(e.g. coco_2017_train), shapes_train/shapes_val, or --ann_file_train/--ann_file_val"
            )
        meta = MetadataCatalog.get(name)
        for field, is_ok in (("json_file", os.path.isfile), ("image_root", os.path.isdir)):
            path = meta.get(field)
            if path is not None and not is_ok(path):
                hint = _datasets_root_hint() if name.startswith("coco_") else "check the path"
                raise SetupError(
                    f"{config_key}: dataset {name!r} needs {path}, which does not exist. {hint}"
                )


def dataset_classes(name: str) -> Optional[List[str]]:
    """Class names of a registered dataset from its metadata or its COCO file; None if neither says."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes")
    if classes is not None:
        return list(classes)
    json_file = meta.get("json_file")
    return coco_category_names(json_file) if json_file else None


def num_classes_set_explicitly(cfg: CfgNode, opts: Sequence[str]) -> bool:
    """Whether the user chose NUM_CLASSES: on the command line, or in the config with a non-default value.

    80, the default that Base-FCOS.yaml repeats for COCO, counts as "not chosen", so every config built
    on it follows the training data unless it says otherwise.
    """
    default = get_fcos_cfg().MODEL.FCOS.NUM_CLASSES
    return NUM_CLASSES_KEY in list(opts)[::2] or cfg.MODEL.FCOS.NUM_CLASSES != default


def resolve_num_classes(cfg: CfgNode, names: Sequence[str], explicit: bool) -> None:
    """Set ``MODEL.FCOS.NUM_CLASSES`` from the datasets' categories, or check the user's value (cfg unfrozen).

    All datasets of the run must have the same classes: a model trained on one category list and
    evaluated against another would report meaningless AP.
    """
    known: Dict[str, List[str]] = {}
    for name in names:
        classes = dataset_classes(name)
        if classes is not None:
            known[name] = classes
    if not known:
        return
    first_name, first = next(iter(known.items()))
    for name, classes in known.items():
        if classes != first:
            raise SetupError(
                f"datasets {first_name!r} and {name!r} have different categories "
                f"({len(first)}: {first[:5]}... vs {len(classes)}: {classes[:5]}...); "
                "train and evaluate on files with the same 'categories' list"
            )
    count = len(first)
    configured = cfg.MODEL.FCOS.NUM_CLASSES
    if explicit and configured != count:
        raise SetupError(
            f"{NUM_CLASSES_KEY} is {configured} but dataset {first_name!r} has {count} categories {first}; "
            f"set {NUM_CLASSES_KEY} {count}, or leave it at its default (80) to follow the dataset"
        )
    if configured != count:
        logger.info(f"{NUM_CLASSES_KEY} = {count}, from the categories of dataset {first_name!r}")
    cfg.MODEL.FCOS.NUM_CLASSES = count


def drop_degenerate_boxes(
    dataset_dicts: List[dict], dataset_names: Sequence[str], strict: bool = False
) -> List[dict]:
    """Remove annotations whose box has no area inside its image (``fcos.data.check``'s test).

    Custom datasets were checked before training, which warned about these boxes by annotation id,
    so the count here is logged at INFO level. With ``strict`` (``DATASETS.STRICT_BOXES``) any such
    box is a DatasetError instead, for datasets the checker does not see (COCO, the embedded data).
    """
    removed: List[str] = []
    for record in dataset_dicts:
        kept = []
        for anno in record.get("annotations", []):
            box = BoxMode.convert(list(anno["bbox"]), anno["bbox_mode"], BoxMode.XYXY_ABS)
            reason = degenerate_box(*box, record.get("width"), record.get("height"))
            if reason is None:
                kept.append(anno)
            else:
                removed.append(f"{record.get('file_name', '?')} box {list(anno['bbox'])}: {reason}")
        if "annotations" in record:
            record["annotations"] = kept
    if removed and strict:
        raise DatasetError(
            f"{len(removed)} training box(es) in {list(dataset_names)} have no area inside their "
            f"image, e.g. {'; '.join(removed[:3])}; set DATASETS.STRICT_BOXES False to drop them"
        )
    if removed:
        logger.info(
            f"Dropped {len(removed)} degenerate box(es) (no area inside their image) "
            f"from {list(dataset_names)}"
        )
    return dataset_dicts


def _dataset_size_stats(names: Sequence[str]) -> Optional[SizeStats]:
    """Image and box sizes of the named datasets' COCO files together; None if none has a file."""
    parts = []
    for name in names:
        json_file = MetadataCatalog.get(name).get("json_file")
        if json_file:
            with open(json_file, encoding="utf-8") as f:
                parts.append(size_stats(json.load(f)))
    if not parts:
        return None
    return SizeStats(
        *(
            np.concatenate([getattr(p, k) for p in parts])
            for k in ("short_sides", "long_sides", "box_sides", "box_image_shorts")
        )
    )


def apply_sizes_from_data(cfg: CfgNode, names: Sequence[str], opts: Sequence[str]) -> None:
    """With ``INPUT.SIZES_FROM_DATA``, set input sizes and level ranges from ``names``' data.

    ``cfg`` must be unfrozen. Keys given in ``opts`` win. The flag is then cleared, so the run's
    config.yaml reproduces the values without the data (e.g. for ``--eval-only`` or the demo).
    """
    if not cfg.INPUT.SIZES_FROM_DATA:
        return
    stats = _dataset_size_stats(names)
    strides = list(cfg.MODEL.FCOS.FPN_STRIDES)
    suggestion = suggest_sizes(stats, strides) if stats is not None else None
    if suggestion is None:
        raise SetupError(
            f"INPUT.SIZES_FROM_DATA: datasets {list(names)} have no COCO file with images and "
            "boxes to take sizes from; set INPUT.SIZES_FROM_DATA False and INPUT.*_SIZE_* yourself"
        )
    given = set(list(opts)[::2])
    chosen = {k: v for k, v in suggestion.as_config().items() if k not in given}
    for key, value in chosen.items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    cfg.INPUT.SIZES_FROM_DATA = False
    shares = ", ".join(f"{share:.0%}" for share in suggestion.level_shares)
    logger.info(
        f"INPUT.SIZES_FROM_DATA, from {list(names)} (median image shorter side "
        f"{np.median(stats.short_sides):.0f} px; objects per level of strides {strides}: "
        f"{shares}): " + ", ".join(f"{k} {v}" for k, v in chosen.items())
    )
