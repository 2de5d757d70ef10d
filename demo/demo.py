"""FCOS demo: detect objects in images, a video or a webcam stream, draw them, optionally save COCO JSON.

    python demo/demo.py --config-file output/fcos_shapes/config.yaml \
        --input datasets/generated/shapes/val --output output/demo \
        --opts MODEL.WEIGHTS output/fcos_shapes/model_final.pth

``--input`` takes files, folders (their images, sorted) and quoted glob patterns, in any mix. An
input that is missing or cannot be read is reported by name and skipped; the run still processes the
others and exits with status 1 at the end. A bad config, key, weights file or ``--ann_file`` is one
line and exit status 2 (``fcos.engine.cli``). detectron2's demo conventions otherwise:
``--confidence-threshold``, ``--video-input``, ``--webcam``, ``--opts KEY VALUE ...`` (e.g.
``MODEL.DEVICE cpu``, ``TEST.AUG.ENABLED True`` for test-time augmentation).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image
from predictor import FCOSPredictor

from fcos.engine.cli import run
from fcos.engine.config import SetupError
from fcos.engine.defaults import class_names, load_config
from fcos.file_io import atomic_output, write_json_atomic

logger = logging.getLogger("fcos.demo")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
# What reading a broken, truncated, non-image or missing file raises (PIL, detectron2's read_image).
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def get_parser() -> argparse.ArgumentParser:
    """detectron2's demo flags, plus ``--json`` and ``--ann_file``."""
    parser = argparse.ArgumentParser(
        description="FCOS demo: draw detections on images, a video or a webcam"
    )
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="model config (e.g. OUTPUT_DIR/config.yaml)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", help="image files, folders or quoted glob patterns ('dir/*.jpg')"
    )
    source.add_argument("--video-input", help="a video file")
    source.add_argument(
        "--webcam", action="store_true", help="the first webcam (needs an OpenCV build with GUI)"
    )
    parser.add_argument(
        "--output",
        help="folder for the drawn images (created), or a file name when --input is one image; "
        "the output video file for --video-input (.mp4, .avi or .mkv)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write the detections as a COCO results JSON"
    )
    parser.add_argument(
        "--ann_file", metavar="FILE", help="COCO JSON of the training data: class names and ids"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.3,
        help="minimum score drawn and written (default %(default)s)",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


@dataclass
class InputList:
    """Expanded ``--input``: image files in order, plus the specs that matched nothing."""

    files: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)


def expand_inputs(specs: Sequence[str]) -> InputList:
    """Files as given; folders -> their image files, sorted; anything else is a glob pattern.

    A folder contributes only files with an image suffix; a file named explicitly is kept whatever its
    suffix (it fails later, by name, if it is not an image). A file reached twice is processed once.
    """
    result = InputList()
    seen = set()
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(spec, name)
                for name in os.listdir(spec)
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(spec)) if os.path.isfile(p))
        if found:
            for path in found:
                key = os.path.realpath(path)
                if key not in seen:
                    seen.add(key)
                    result.files.append(path)
        else:
            result.missing.append(spec)
    return result


def output_paths(files: Sequence[str], output: Optional[str]) -> Dict[str, str]:
    """Where each drawn image goes: ``output`` itself for one image with an image suffix, else
    ``output/<basename>`` (``<stem>_<n><suffix>`` when two inputs share a base name)."""
    if not output:
        return {}
    if output.lower().endswith(IMAGE_SUFFIXES) and not os.path.isdir(output):
        if len(files) != 1:
            raise SetupError(
                f"--output {output} is a file name, but there are {len(files)} input images; give a folder"
            )
        return {files[0]: output}
    paths: Dict[str, str] = {}
    used = set()
    for path in files:
        stem, suffix = os.path.splitext(os.path.basename(path))
        name, n = stem + suffix, 0
        while name in used:
            n += 1
            name = f"{stem}_{n}{suffix}"
        used.add(name)
        paths[path] = os.path.join(output, name)
    return paths


@dataclass
class CocoIds:
    """Ids for the COCO results JSON: contiguous class -> category id, image base name -> image id."""

    category_ids: List[int]
    image_ids: Dict[str, int]

    @classmethod
    def from_sources(
        cls, num_classes: int, ann_file: Optional[str], dataset: Optional[str]
    ) -> "CocoIds":
        """From ``--ann_file`` when given (so the JSON can be scored against it), else the dataset's
        metadata, else category id = class + 1 and no known image ids."""
        if ann_file:
            try:
                with open(ann_file, encoding="utf-8") as f:
                    data = json.load(f)
                category_ids = sorted(int(c["id"]) for c in data["categories"])
                image_ids = {
                    os.path.basename(str(im["file_name"])): int(im["id"])
                    for im in data.get("images", [])
                }
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SetupError(
                    f"{ann_file}: cannot read COCO 'categories'/'images' ids ({err})"
                ) from err
            return cls(category_ids, image_ids)
        mapping = (
            MetadataCatalog.get(dataset).get("thing_dataset_id_to_contiguous_id")
            if dataset
            else None
        )
        if mapping:
            inverse = {contiguous: dataset_id for dataset_id, contiguous in mapping.items()}
            return cls([inverse[i] for i in range(num_classes)], {})
        return cls(list(range(1, num_classes + 1)), {})

    def image_id(self, path: str, index: int) -> int:
        """The annotation file's id for this image, else its 1-based position among the inputs."""
        return self.image_ids.get(os.path.basename(path), index + 1)


def coco_results(instances: Instances, image_id: int, category_ids: Sequence[int]) -> List[dict]:
    """COCO results records (``bbox`` as x, y, width, height) for one image, with dataset category ids.

    detectron2's own converter, whose ``category_id`` is the contiguous class; mapped here as
    ``COCOEvaluator`` maps it.
    """
    records = instances_to_coco_json(instances.to("cpu"), image_id)
    for record in records:
        record["category_id"] = category_ids[record["category_id"]]
    return records


def save_image(path: str, image_rgb: np.ndarray) -> None:
    """Write an RGB picture; the file type follows the suffix of ``path``."""

    with atomic_output(path, keep_extension=True) as tmp:
        if not cv2.imwrite(tmp, np.ascontiguousarray(image_rgb[:, :, ::-1])):
            raise OSError(f"cannot write {path} (unknown image type?)")


class Demo:
    """The model, its class names and drawing, shared by the image, video and webcam paths."""

    def __init__(self, cfg: CfgNode, names: Optional[List[str]], threshold: float) -> None:
        self.cfg = cfg
        self.predictor = FCOSPredictor(cfg)
        self.threshold = threshold
        self.input_format = cfg.INPUT.FORMAT
        if names is None:
            names = [f"class {i}" for i in range(cfg.MODEL.FCOS.NUM_CLASSES)]
            logger.warning(
                "no class names known for this config: labels are 'class N' (give --ann_file)"
            )
        self.metadata = Metadata(name="fcos_demo", thing_classes=names)

    def detect(self, image: np.ndarray) -> Instances:
        """Detections on an image in ``INPUT.FORMAT`` order, scores >= the confidence threshold."""
        instances = self.predictor(image).to("cpu")
        return instances[instances.scores >= self.threshold]

    def draw(self, image: np.ndarray, instances: Instances) -> np.ndarray:
        """The image (``INPUT.FORMAT`` order) with boxes, class names and scores drawn; RGB."""
        rgb = convert_image_to_rgb(image, self.input_format)
        visualizer = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
        return visualizer.draw_instance_predictions(instances).get_image()

    def frames_to_model_format(self, frame_bgr: np.ndarray) -> np.ndarray:
        """OpenCV frames are BGR; the model wants ``INPUT.FORMAT``."""
        return frame_bgr[:, :, ::-1] if self.input_format == "RGB" else frame_bgr


def run_images(
    demo: Demo,
    inputs: InputList,
    destinations: Dict[str, str],
    ids: CocoIds,
    json_file: Optional[str],
) -> int:
    """Process every input image; returns the number of inputs that failed (missing or unreadable)."""
    for spec in inputs.missing:
        logger.error(f"input not found: {spec}")
    if not destinations:
        logger.info("no --output: drawn images are not saved")
    failed = list(inputs.missing)
    records: List[dict] = []
    for index, path in enumerate(tqdm.tqdm(inputs.files, desc="images", disable=None)):
        try:
            image = read_image(path, format=demo.input_format)
        except READ_ERRORS as err:
            logger.error(f"cannot read {path}: {err}")
            failed.append(path)
            continue
        start = time.perf_counter()
        instances = demo.detect(image)
        elapsed = time.perf_counter() - start
        logger.info(f"{path}: {len(instances)} detections in {elapsed:.3f} s")
        records.extend(coco_results(instances, ids.image_id(path, index), ids.category_ids))
        if path in destinations:
            save_image(destinations[path], demo.draw(image, instances))
    if json_file:
        write_json_atomic(json_file, records)
        logger.info(f"wrote {len(records)} detections to {json_file}")
    if failed:
        logger.error(
            f"{len(failed)} of {len(inputs.files) + len(inputs.missing)} inputs failed: {', '.join(failed)}"
        )
    return len(failed)


def _frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    """The frames of an open capture until it ends."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _draw_frame(
    demo: Demo, visualizer: VideoVisualizer, frame_bgr: np.ndarray
) -> Tuple[np.ndarray, int]:
    """(the BGR frame with detections drawn, the number of detections)."""
    instances = demo.detect(demo.frames_to_model_format(frame_bgr))
    drawn = visualizer.draw_instance_predictions(frame_bgr[:, :, ::-1], instances).get_image()
    return np.ascontiguousarray(drawn[:, :, ::-1]), len(instances)


def run_video(demo: Demo, args: argparse.Namespace) -> int:
    """Draw detections on every frame of ``--video-input`` into ``--output``; returns 1 if unreadable."""
    capture = cv2.VideoCapture(args.video_input)
    if not capture.isOpened():
        logger.error(f"cannot read video {args.video_input}")
        return 1
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(
        capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    )
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    suffix = os.path.splitext(args.output)[1].lower()
    visualizer = VideoVisualizer(demo.metadata, ColorMode.IMAGE)
    frames = 0

    def write(tmp: str) -> None:
        nonlocal frames
        writer = cv2.VideoWriter(
            tmp, cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix]), fps, (width, height)
        )
        if not writer.isOpened():
            raise OSError(f"cannot write video {args.output} with codec {VIDEO_CODECS[suffix]}")
        try:
            for frame in tqdm.tqdm(_frames(capture), total=total, desc="frames", disable=None):
                start = time.perf_counter()
                drawn, count = _draw_frame(demo, visualizer, frame)
                logger.debug(
                    f"frame {frames}: {count} detections in {time.perf_counter() - start:.3f} s"
                )
                writer.write(drawn)
                frames += 1
        finally:
            writer.release()

    try:
        with atomic_output(args.output, keep_extension=True) as tmp:
            write(tmp)
    finally:
        capture.release()
    logger.info(f"wrote {frames} frames to {args.output}")
    return 0


def run_webcam(demo: Demo) -> int:
    """Show detections on the webcam stream until Esc is pressed."""
    capture = cv2.VideoCapture(0)
    if not capture.isOpened():
        logger.error("cannot open the webcam (device 0)")
        return 1
    visualizer = VideoVisualizer(demo.metadata, ColorMode.IMAGE)
    window = "FCOS (Esc to quit)"
    try:
        for frame in _frames(capture):
            cv2.imshow(window, _draw_frame(demo, visualizer, frame)[0])
            if cv2.waitKey(1) == 27:
                break
    except cv2.error as err:
        logger.error(
            f"cannot show the webcam window ({err.msg.strip()}); this needs opencv-python with GUI support"
        )
        return 1
    finally:
        capture.release()
        cv2.destroyAllWindows()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 when every input was processed, 1 when some failed, 2 for a setup error."""
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="fcos")
    logger.info(f"arguments: {args}")
    if args.video_input and not args.output:
        parser.error("--video-input needs --output FILE (.mp4, .avi or .mkv)")
    if args.video_input and os.path.splitext(args.output)[1].lower() not in VIDEO_CODECS:
        parser.error(
            f"--output {args.output}: the video file name must end in one of {sorted(VIDEO_CODECS)}"
        )
    return run("demo.py", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """Build the model from the config and weights, then process the chosen source."""
    cfg = load_config(args.config_file, args.opts, args.ann_file)
    names = class_names(cfg, args.ann_file)
    if args.input:
        inputs = expand_inputs(args.input)
        destinations = output_paths(inputs.files, args.output)
        dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        ids = CocoIds.from_sources(cfg.MODEL.FCOS.NUM_CLASSES, args.ann_file, dataset)
    demo = Demo(cfg, names, args.confidence_threshold)
    if args.input:
        return 1 if run_images(demo, inputs, destinations, ids, args.json) else 0
    if args.video_input:
        return run_video(demo, args)
    return run_webcam(demo)


if __name__ == "__main__":
    sys.exit(main())
