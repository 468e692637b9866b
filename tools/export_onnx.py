#!/usr/bin/env python
"""Exports a CondInst model to one ONNX file: image -> boxes, scores, classes, masks.

    python tools/export_onnx.py --config-file CFG [--output model.onnx] [--test-image IMG] \
        [KEY VALUE ...]        (config overrides, MODEL.WEIGHTS included)

The graph is checked with onnx.checker and run once with ONNX Runtime on a test image (--test-image,
or a generated scene of shapes) next to PyTorch; the largest differences are printed, and the
file is written only when the detections agree (same count and classes). Run the file with the
torch-free runtime `condinst_onnx.CondInstOnnx` or `demo/demo.py --onnx`.
"""

import argparse
import logging
import os
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.classes import get_class_names, inference_config
from condinst_d2.config import get_condinst_cfg
from condinst_d2.data import read_image, render_scene
from condinst_d2.export import OnnxExportError, config_metadata, export_onnx
from condinst_d2.export.compare import detection_differences
from condinst_d2.utils import atomic_write
from condinst_onnx import CondInstOnnx

logger = logging.getLogger("condinst_d2.export_onnx")
TEST_SCENE_SIZE = (480, 640)


class ExportFailure(Exception):
    """An input, output or result the exporter cannot accept; the message names it."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a CondInst config")
    parser.add_argument("--output", default="model.onnx", metavar="FILE", help="the ONNX file")
    parser.add_argument(
        "--test-image",
        metavar="IMG",
        help="image of the PyTorch check (default: a generated scene)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser


def check_output(path: str) -> None:
    """Fails unless a file can be created in the folder of `path` (before the slow export)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportFailure(f"--output {path} is a folder; give a file name such as model.onnx")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ExportFailure(f"cannot write --output {path}: {e}") from e


def build(args: argparse.Namespace):
    """(config, CPU model in eval mode with MODEL.WEIGHTS loaded)."""
    try:
        cfg = get_condinst_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    except (OSError, KeyError, ValueError, AssertionError) as e:
        raise ExportFailure(
            f"invalid config {args.config_file} / overrides {args.opts}: {e}"
        ) from e
    if cfg.MODEL.META_ARCHITECTURE != "CondInst":
        raise ExportFailure(
            f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; "
            "only CondInst exports"
        )
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ExportFailure(f"MODEL.WEIGHTS file not found: {weights}")
    try:
        cfg = inference_config(cfg)  # the checkpoint's classes, their number and names
    except ValueError as e:
        raise ExportFailure(str(e)) from e
    try:
        model = build_model(cfg).eval()
    except (KeyError, ValueError, AssertionError) as e:
        raise ExportFailure(f"{args.config_file}: cannot build the model: {e}") from e
    if weights:
        try:
            CondInstCheckpointer(model, for_inference=True).load(weights)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ExportFailure(f"cannot load MODEL.WEIGHTS {weights}: {e}") from e
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting RANDOM weights")
    if model.bf16:
        logger.warning(
            "MODEL.CONDINST.BF16 does not export: the graph and its check run in float32"
        )
        model.bf16 = False
    return cfg, model


def test_image(path: Optional[str]) -> np.ndarray:
    """(H, W, 3) uint8 BGR image of the PyTorch check."""
    if path is None:
        return render_scene(np.random.default_rng(0), *TEST_SCENE_SIZE)[0]
    try:
        return read_image(path, format="BGR")
    except (OSError, ValueError) as e:
        raise ExportFailure(f"cannot read --test-image {path}: {e}") from e


def compare(model: torch.nn.Module, onnx_path: str, bgr_image: np.ndarray) -> Dict:
    """Detections of the ONNX file (ONNX Runtime) and of `model` on the same prepared input."""
    runtime = CondInstOnnx(onnx_path)
    image_chw = runtime.model_input(bgr_image)
    height, width = bgr_image.shape[:2]
    ours = runtime.run(image_chw, (height, width))
    inputs = [{"image": torch.as_tensor(image_chw).float(), "height": height, "width": width}]
    with torch.no_grad():
        reference = model(inputs)[0]["instances"]
    return detection_differences(ours, reference)


def run(args: argparse.Namespace) -> Dict:
    check_output(args.output)
    cfg, model = build(args)
    image = test_image(args.test_image)
    metadata = config_metadata(cfg, get_class_names(cfg, read_checkpoint=False) or [])
    sample = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    try:
        onnx_model = export_onnx(model, sample, metadata)
    except OnnxExportError as e:
        raise ExportFailure(f"{args.config_file}: {e}") from e
    logger.info("graph checked with onnx.checker; running it with ONNX Runtime")
    with atomic_write(args.output, "wb") as f:
        f.write(onnx_model.SerializeToString())
        f.flush()
        differences = compare(model, f.name, image)
        logger.info("ONNX Runtime vs PyTorch on the test image: %s", differences)
        if not differences["classes_equal"]:
            raise ExportFailure(
                f"ONNX Runtime and PyTorch disagree on the test image ({differences}); "
                f"nothing written to {args.output}"
            )
    return differences


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="condinst_d2")
    try:
        differences = run(args)
    except ExportFailure as e:
        logger.error("%s", e)
        return 1
    print(
        f"wrote {args.output}: {differences['count']} detections on the test image, "
        f"max |box diff| {differences.get('max_box_diff', 0):.2g} px, "
        f"max |score diff| {differences.get('max_score_diff', 0):.2g}, "
        f"min mask IoU {differences.get('min_mask_iou', 1):.4f}, "
        f"mask pixel agreement {differences.get('mask_agreement', 1):.6f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
