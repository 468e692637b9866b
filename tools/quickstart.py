#!/usr/bin/env python
"""Quick start: trains CondInst on a generated dataset, evaluates it and draws its predictions.

1. Generates (once) a deterministic synthetic dataset of shapes on textured backgrounds (COCO JSON
   + JPEGs: a training split and a held-out split) under OUTPUT/shapes.
2. Trains CondInst with the ImageNet-pretrained EfficientNet-Lite0 backbone (config
   configs/CondInst/QuickStart_Shapes_CPU.yaml) with Detectron2's trainer, logging progress.
3. Evaluates on the held-out split with COCOEvaluator (bbox and segm AP tables).
4. Draws the predictions on a few held-out images to OUTPUT/prediction_*.png.

    python tools/quickstart.py [--output DIR] [--config-file FILE] [KEY VALUE ...]
"""

import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from condinst_d2.data import read_image, write_coco_split
from condinst_d2.engine import Trainer, build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "CondInst", "QuickStart_Shapes_CPU.yaml")
logger = logging.getLogger("condinst_d2.quickstart")


def ensure_split(
    data_dir: str, split: str, num_images: int, size: Tuple[int, int], seed: int
) -> Tuple[str, str]:
    """(JSON, image folder) of a generated split, generated unless an identical one exists."""
    json_file = os.path.join(data_dir, f"{split}.json")
    stamp = {"num_images": num_images, "size": list(size), "seed": seed}
    stamp_file = os.path.join(data_dir, f"{split}.params.json")
    if os.path.isfile(json_file) and os.path.isfile(stamp_file):
        with open(stamp_file) as f:
            if json.load(f) == stamp:
                return json_file, os.path.join(data_dir, split)
    logger.info("Generating %d %s images in %s", num_images, split, data_dir)
    write_coco_split(data_dir, split, num_images, size, seed)
    with open(stamp_file, "w") as f:
        json.dump(stamp, f)
    return json_file, os.path.join(data_dir, split)


def draw_predictions(
    cfg: CfgNode, weights: str, test_dataset: Tuple[str, str], out_dir: str, count: int
) -> List[str]:
    """Draws the model's predictions on the first `count` held-out images; returns the paths."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    with open(test_dataset[0]) as f:
        images = json.load(f)["images"][:count]
    paths = []
    for image in images:
        bgr = read_image(os.path.join(test_dataset[1], image["file_name"]), format="BGR")
        instances = predictor(bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= 0.5]
        drawn = Visualizer(bgr[:, :, ::-1], metadata).draw_instance_predictions(instances)
        paths.append(os.path.join(out_dir, f"prediction_{image['id']:03d}.png"))
        drawn.save(paths[-1])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Generates the data, trains, evaluates and draws; returns the exit status (0)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "quickstart"))
    parser.add_argument("--num-train", type=int, default=300, help="generated training images")
    parser.add_argument("--num-test", type=int, default=50, help="generated held-out images")
    parser.add_argument("--num-drawn", type=int, default=4, help="held-out images to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_logger()
    setup_logger(name="condinst_d2")

    data_dir = os.path.join(args.output, "shapes")
    size = (256, 320)
    train = ensure_split(data_dir, "train", args.num_train, size, seed=0)
    test = ensure_split(data_dir, "test", args.num_test, size, seed=1)
    opts = ["OUTPUT_DIR", os.path.join(args.output, "model")] + list(args.opts)
    cfg = build_cfg(args.config_file, opts, train_dataset=train, test_dataset=test)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # evaluates on the held-out split at the end
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    drawn = draw_predictions(cfg, weights, test, args.output, args.num_drawn)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if results:
        segm, bbox = results["segm"]["AP"], results["bbox"]["AP"]
        summary = f"held-out segm AP {segm:.1f}, bbox AP {bbox:.1f}"
    else:  # COCOEvaluator returns nothing when the model predicts nothing
        summary = "no detections on the held-out split (train longer)"
    print(f"\nQuick start done: {summary}.\nModel: {weights}")
    print(f"Drawn predictions: {', '.join(drawn)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
