#!/usr/bin/env python
"""CondInst demo: instance masks drawn on images, videos or a webcam stream.

    python demo/demo.py --config-file CONFIG --input IMAGES... [--output DIR] [--opts KEY VALUE ...]
    python demo/demo.py --config-file CONFIG --video-input VIDEO [--output OUT.mp4] [--max-frames N]
    python demo/demo.py --config-file CONFIG --webcam [--output OUT.mp4]
    python demo/demo.py --onnx MODEL.onnx --input IMAGES... (or --video-input / --webcam)

Without --output the results are shown in a window (Esc quits). The exit status is 1 when any
input could not be processed (the others still are) or an argument is invalid.
"""

import warnings

# Third-party deprecation warnings (detectron2's torch.jit.script, NumPy 2's __array__), filtered
# as pytest.ini does; they are raised while importing, hence before the imports.
# ruff: noqa: E402
warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "__array__ implementation doesn't accept", DeprecationWarning)

import argparse
import contextlib
import glob
import logging
import os
import signal
import sys
import tempfile
import time
from types import FrameType
from typing import Dict, Iterator, List, Optional, Protocol, Tuple

import cv2
import numpy as np
import tqdm
from detectron2.config import CfgNode
from detectron2.data.catalog import Metadata
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from condinst_d2.config import get_condinst_cfg
from condinst_d2.data import read_image

# The demo's own modules: demo/ is on sys.path when this file runs as a script.
from onnx_predictor import OnnxPredictor
from predictions_json import instances_to_record, write_json
from predictor import BatchPredictor
from video_io import (
    VIDEO_SUFFIXES,
    AtomicVideoWriter,
    browser_video_suffix,
    capture_fps,
    frame_batches,
    open_capture,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINDOW = "CondInst"
ESC = 27
# tqdm's default switches to seconds per frame below 1 frame/s: always show frames per second.
PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
PROGRESS_FORMAT_OPEN_ENDED = "{desc}: {n_fmt} frames [{elapsed}, {rate_noinv_fmt}]"

logger = logging.getLogger("demo")


class DemoError(Exception):
    """An input or output the demo cannot use; the message names it."""


class FrameSink(Protocol):
    """Where drawn video frames go: a video file or a window."""

    def write(self, frame: np.ndarray) -> bool:
        """Takes an (H, W, 3) uint8 BGR frame; False asks to stop."""

    def close(self, keep: bool = True) -> Optional[str]:
        """Finishes; `keep` is False after an error. Returns the file written, if any."""


def get_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE", help="a CondInst config")
    model.add_argument(
        "--onnx",
        metavar="FILE",
        help="instead of a config: a model exported by tools/export_onnx.py, run with ONNX "
        "Runtime (test size, channel order and class names come from the file; --opts unused)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images: files, folders (their images) or globs")
    source.add_argument("--video-input", metavar="VIDEO", help="a video file that OpenCV reads")
    source.add_argument("--webcam", action="store_true", help="camera 0")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="images: a folder (created), or a file for a single image; video/webcam: a file "
        f"({', '.join(VIDEO_SUFFIXES)}) or a folder. Omitted: show in a window",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="draw (and save) detections with score >= this. Scores are sqrt(cls * ctr) and "
        "MODEL.FCOS.INFERENCE_TH_TEST applies before the square root, so it is lowered to the "
        "square of this value when higher: no detection scoring >= this value is lost",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write the predictions kept by the threshold to FILE: per image or frame, "
        "category_id, score, bbox (XYXY pixels) and the mask as COCO RLE",
    )
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop a video after N frames")
    parser.add_argument(
        "--batch-size", type=int, default=1, metavar="B", help="video frames per model call"
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs"
    )
    return parser


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """The config from --config-file and --opts (`get_condinst_cfg`), frozen."""
    try:
        cfg = get_condinst_cfg(args.config_file, args.opts)
    except (OSError, KeyError, ValueError, AssertionError) as e:
        raise DemoError(f"invalid config {args.config_file} / --opts {args.opts}: {e}") from e
    cfg.MODEL.FCOS.INFERENCE_TH_TEST = min(
        cfg.MODEL.FCOS.INFERENCE_TH_TEST, args.confidence_threshold**2
    )
    if not cfg.MODEL.WEIGHTS:
        logger.warning(
            "MODEL.WEIGHTS is empty: the model has RANDOM weights, its predictions mean nothing"
        )
    cfg.freeze()
    return cfg


def check_args(args: argparse.Namespace) -> None:
    """Rejects invalid numbers, and a missing window when there is no --output."""
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise DemoError(
            f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}"
        )
    if args.batch_size < 1:
        raise DemoError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_frames is not None and args.max_frames < 1:
        raise DemoError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.output is None and not display_available():
        raise DemoError("no display to show the results in: pass --output")


def display_available() -> bool:
    """Whether OpenCV can open a window (its Qt backend aborts the process without a display)."""
    if sys.platform.startswith("linux") and not any(
        os.environ.get(k) for k in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    ):
        return False
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error:
        return False
    return True


def ensure_writable_folder(folder: str) -> None:
    """Creates `folder` if needed and checks that a file can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DemoError(f"output folder {folder} is not writable: {e}") from e


def resolve_images(inputs: List[str]) -> List[str]:
    """Image paths from files, folders (their images, sorted) and glob patterns, in order."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
            if not found:
                raise DemoError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
        elif os.path.isfile(item):
            found = [item]
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
            if not found:
                raise DemoError(f"no file matches {item}")
        else:
            raise DemoError(f"input not found: {item}")
        paths.extend(found)
    return paths


def image_destinations(paths: List[str], output: str) -> List[str]:
    """Where each input's drawing goes; an output with an image suffix is the file of one input."""
    if not os.path.isdir(output) and cv2.haveImageWriter(output):
        if len(paths) > 1:
            raise DemoError(
                f"--output {output} is a file name but there are {len(paths)} input images"
            )
        ensure_writable_folder(os.path.dirname(output) or ".")
        return check_not_inputs([output], paths)
    ensure_writable_folder(output)
    destinations, used = [], set()
    for path in paths:
        name = os.path.basename(path)
        if not cv2.haveImageWriter(name):
            name = os.path.splitext(name)[0] + ".png"
        stem, suffix = os.path.splitext(name)
        count = 1
        while name in used:  # same file name from different folders: keep both
            name = f"{stem}_{count}{suffix}"
            count += 1
        used.add(name)
        destinations.append(os.path.join(output, name))
    return check_not_inputs(destinations, paths)


def check_not_inputs(destinations: List[str], inputs: List[str]) -> List[str]:
    """`destinations`, unless one of them is an input file (which the demo would overwrite)."""
    for destination, source in zip(destinations, inputs):
        if os.path.realpath(destination) == os.path.realpath(source):
            raise DemoError(f"--output would overwrite the input {source}: choose another folder")
    return destinations


def video_destination(output: str, source_name: str) -> str:
    """The video file for --output: itself if it has a video suffix, else a file in that folder."""
    if not os.path.isdir(output) and output.lower().endswith(VIDEO_SUFFIXES):
        ensure_writable_folder(os.path.dirname(output) or ".")
        return output
    ensure_writable_folder(output)
    return os.path.join(output, source_name + browser_video_suffix())


def class_names(metadata: Metadata) -> Optional[List[str]]:
    """The metadata's thing_classes, if any."""
    return metadata.get("thing_classes", None)


def run_images(
    predictor: BatchPredictor,
    metadata: Metadata,
    paths: List[str],
    destinations: Optional[List[str]],
    records: Optional[List[Dict]],
) -> int:
    """Draws the predictions of each image; returns how many images failed (each one is logged)."""
    failures = 0
    for index, path in enumerate(paths):
        try:
            image = read_image(path, format="BGR")
        except (OSError, ValueError) as e:  # the message names the file
            logger.error("%s", e)
            failures += 1
            continue
        start = time.perf_counter()
        instances = predictor([image])[0]
        logger.info("%s: %d instances in %.2f s", path, len(instances), time.perf_counter() - start)
        if records is not None:
            records.append(instances_to_record(instances, path, class_names=class_names(metadata)))
        drawn = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        drawn = np.ascontiguousarray(
            drawn.draw_instance_predictions(instances).get_image()[:, :, ::-1]
        )
        if destinations is None:
            cv2.imshow(WINDOW, drawn)
            if cv2.waitKey(0) == ESC:
                break
        elif not cv2.imwrite(destinations[index], drawn):
            logger.error("cannot write %s (for %s)", destinations[index], path)
            failures += 1
    return failures


class WindowSink:
    """A FrameSink that shows frames in a window; write() is False once Esc is pressed."""

    def write(self, frame: np.ndarray) -> bool:
        cv2.imshow(WINDOW, frame)
        return cv2.waitKey(1) != ESC

    def close(self, keep: bool = True) -> None:
        cv2.destroyWindow(WINDOW)


def expected_frames(capture: cv2.VideoCapture, max_frames: Optional[int]) -> Optional[int]:
    """The number of frames to process if known (progress bar total), else None."""
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if count <= 0:
        return max_frames
    return count if max_frames is None else min(count, max_frames)


def drawn_frames(
    predictor: BatchPredictor,
    metadata: Metadata,
    batches: Iterator[List[np.ndarray]],
    source: str,
    records: Optional[List[Dict]],
) -> Iterator[np.ndarray]:
    """BGR frames with their predictions drawn; VideoVisualizer keeps colours across frames.

    Appends each frame's JSON record to `records` when given.
    """
    visualizer = VideoVisualizer(metadata, ColorMode.IMAGE)
    names = class_names(metadata)
    index = 0
    for batch in batches:
        for frame, instances in zip(batch, predictor(batch)):
            if records is not None:
                records.append(instances_to_record(instances, source, index, names))
            index += 1
            drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances).get_image()
            yield np.ascontiguousarray(drawn[:, :, ::-1])


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """In the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does (main thread only)."""

    def interrupt(signum: int, frame: Optional[FrameType]) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_frames(
    frames: Iterator[np.ndarray], sink: FrameSink, total: Optional[int], label: str
) -> Tuple[int, Optional[str]]:
    """Feeds frames to `sink` with a progress bar; returns (frames processed, file written or None).

    Esc in the window, Ctrl-C or SIGTERM (`kill`, a job scheduler) stops early and keeps what was
    written; any other error discards the output file.
    """
    count, completed, interrupted, written = 0, False, False, None
    bar_format = PROGRESS_FORMAT if total else PROGRESS_FORMAT_OPEN_ENDED
    progress = tqdm.tqdm(total=total, unit="frame", desc=label, bar_format=bar_format)
    try:
        with sigterm_as_interrupt():
            for frame in frames:
                count += 1
                progress.update()
                if not sink.write(frame):
                    break
        completed = True
    except KeyboardInterrupt:
        completed = interrupted = True
    finally:
        progress.close()
        written = sink.close(keep=completed)
    if interrupted:
        logger.warning("interrupted after %d frames", count)
    return count, written


def process_stream(
    predictor: BatchPredictor,
    metadata: Metadata,
    capture: cv2.VideoCapture,
    video_path: Optional[str],
    args: argparse.Namespace,
    records: Optional[List[Dict]],
) -> None:
    """--video-input or --webcam: draws every frame into the file `video_path` (None: a window)."""
    label = "camera 0" if args.webcam else args.video_input
    sink: FrameSink
    if video_path is None:
        sink = WindowSink()
    else:
        sink = AtomicVideoWriter(video_path, capture_fps(capture))
    batches = frame_batches(capture, args.batch_size, args.max_frames)
    frames = drawn_frames(predictor, metadata, batches, label, records)
    count, written = write_frames(
        frames, sink, expected_frames(capture, args.max_frames), stream_name(args)
    )
    if count == 0:
        raise DemoError(f"could not read any frame from {label}")
    if written is not None:
        logger.info("wrote %d frames to %s", count, written)


def stream_name(args: argparse.Namespace) -> str:
    """The name of the video file written for --webcam or --video-input into a folder."""
    return "webcam" if args.webcam else os.path.splitext(os.path.basename(args.video_input))[0]


def build_predictor(args: argparse.Namespace) -> Tuple[BatchPredictor, Metadata]:
    """(BatchPredictor, metadata with the model's class names) from the arguments."""
    if args.onnx:
        return build_onnx_predictor(args)
    cfg = setup_cfg(args)
    try:
        predictor = BatchPredictor(cfg, args.confidence_threshold)
    except (OSError, AssertionError, KeyError, ValueError) as e:
        raise DemoError(
            f"cannot build the model or load MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}"
        ) from e
    if predictor.class_names is None:
        logger.warning(
            "the model's class names are unknown: classes are drawn as numbers "
            "(set MODEL.FCOS.CLASS_NAMES, or use the config.yaml of the model's training run)"
        )
    return predictor, predictor.metadata


def build_onnx_predictor(args: argparse.Namespace) -> Tuple[OnnxPredictor, Metadata]:
    """--onnx: (OnnxPredictor, metadata with the file's class names)."""
    try:
        predictor = OnnxPredictor(args.onnx, args.confidence_threshold)
    except ValueError as e:  # the message names the file
        raise DemoError(str(e)) from e
    names = predictor.runtime.class_names
    return predictor, Metadata(name=args.onnx, **({"thing_classes": names} if names else {}))


def output_paths(
    args: argparse.Namespace, paths: List[str]
) -> Tuple[Optional[List[str]], Optional[str]]:
    """(image destinations, video file): None for a window; checks that every folder is writable."""
    if args.json:
        ensure_writable_folder(os.path.dirname(args.json) or ".")
    if args.output is None:
        return None, None
    if paths:
        return image_destinations(paths, args.output), None
    video_path = video_destination(args.output, stream_name(args))
    if args.video_input:
        check_not_inputs([video_path], [args.video_input])
    return None, video_path


def missing_folders(paths: List[Optional[str]]) -> List[str]:
    """The paths, and their parents, that do not exist yet (deepest first): folders the run may
    create."""
    missing = []
    for path in filter(None, paths):
        path = os.path.abspath(path)
        while not os.path.exists(path) and path not in missing:
            missing.append(path)
            path = os.path.dirname(path)
    return sorted(missing, key=len, reverse=True)


def remove_empty(folders: List[str]) -> None:
    """Removes those of `folders` that are empty folders, deepest first."""
    for folder in folders:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def run(args: argparse.Namespace) -> int:
    """Checks every input and output before building the model, then processes the inputs.

    Returns:
        The exit status: 1 if an image could not be read or written, else 0.
    """
    check_args(args)
    paths = resolve_images(args.input) if args.input else []
    capture = None if paths else open_capture("0" if args.webcam else args.video_input)
    records: Optional[List[Dict]] = [] if args.json else None
    failures = 0
    try:
        destinations, video_path = output_paths(args, paths)
        predictor, metadata = build_predictor(args)
        if capture is None:
            failures = run_images(predictor, metadata, paths, destinations, records)
        else:
            process_stream(predictor, metadata, capture, video_path, args, records)
    finally:
        if capture is not None:
            capture.release()
        if records:
            write_json(records, args.json)
            logger.info("wrote the predictions of %d images/frames to %s", len(records), args.json)
    return 1 if failures else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: returns 0 on success, 1 if anything could not be processed."""
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="condinst_d2")
    setup_logger(name="demo", abbrev_name="demo")
    created = missing_folders([args.output, args.json])
    try:
        return run(args)
    except (DemoError, OSError) as e:
        logger.error("%s", e)
        return 1
    finally:
        remove_empty(created)  # no empty output folder is left behind by a failed run


if __name__ == "__main__":
    sys.exit(main())
