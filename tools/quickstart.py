#!/usr/bin/env python
"""Quick start: builds CondInst from a config and runs it on a generated scene, end to end.

With no weights given the model is randomly initialised (a smoke test of the whole pipeline: the
detections are meaningless); pass MODEL.WEIGHTS to use a checkpoint. Writes the 10 best predictions,
drawn, to OUTPUT/quickstart_prediction.png and prints a summary.

    python tools/quickstart.py [--config-file FILE] [--output DIR] [KEY VALUE ...]
"""
import argparse
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from condinst_d2 import add_condinst_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "CondInst", "QuickStart_R_18_CPU.yaml")


def generated_scene(height: int = 320, width: int = 480, seed: int = 0) -> np.ndarray:
    """A deterministic BGR image: filled circles, rectangles and triangles on a noisy gradient."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 180, width, dtype=np.float32)[None, :, None]
    image = np.clip(ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = int(rng.integers(40, width - 40)), int(rng.integers(40, height - 40))
        size = int(rng.integers(20, 60))
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(image, (x, y), size, color, -1)
        elif kind == 1:
            cv2.rectangle(image, (x - size, y - size // 2), (x + size, y + size // 2), color, -1)
        else:
            pts = np.array([[x, y - size], [x - size, y + size], [x + size, y + size]], dtype=np.int32)
            cv2.fillPoly(image, [pts], color)
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "quickstart"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_logger(name="condinst_d2", abbrev_name="condinst")
    logger = logging.getLogger("condinst_d2")

    cfg = get_cfg()
    add_condinst_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS:
        # Random weights score every location near the prior (~0.01): drop the threshold so the
        # run still exercises the mask head and drawing on its (meaningless) top detections.
        logger.warning("MODEL.WEIGHTS is empty: random weights, score threshold lowered to 0")
        cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)

    image = generated_scene()
    tensor = torch.as_tensor(image.transpose(2, 0, 1).copy()).float()
    if cfg.INPUT.FORMAT == "RGB":
        tensor = tensor.flip(0)
    start = time.perf_counter()
    with torch.no_grad():
        instances = model([{"image": tensor}])[0]["instances"].to("cpu")
    elapsed = time.perf_counter() - start

    os.makedirs(args.output, exist_ok=True)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances[:10])
    path = os.path.join(args.output, "quickstart_prediction.png")
    drawn.save(path)
    print(
        f"CondInst ({os.path.basename(args.config_file)}, {cfg.MODEL.DEVICE}): "
        f"{len(instances)} detections on a {image.shape[0]}x{image.shape[1]} image in {elapsed:.2f} s; "
        f"masks {tuple(instances.pred_masks.shape)}; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
