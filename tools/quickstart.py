#!/usr/bin/env python
"""Quick start: trains CondInst on a generated dataset, evaluates it and draws its predictions.

1. Generates (once) a deterministic synthetic dataset of shapes on textured backgrounds (COCO JSON
   + JPEGs: a training split and a held-out split) under OUTPUT/shapes.
2. Trains CondInst with the ImageNet-pretrained EfficientNet-Lite0 backbone (config
   configs/CondInst/QuickStart_Shapes_CPU.yaml) with Detectron2's trainer, logging progress.
3. Evaluates on the held-out split with COCOEvaluator (bbox and segm AP tables).
4. Draws the predictions on a few held-out images to OUTPUT/prediction_*.png.

The trained model is OUTPUT/model (config.yaml with the class names, model_final.pth, log.txt,
metrics.json, TensorBoard events): `condinst_d2.Predictor.from_output_dir` and the demo use it.

    python tools/quickstart.py [--output DIR] [--config-file FILE] [KEY VALUE ...]
"""

import warnings

# Third-party deprecation warnings (detectron2's torch.jit.script, NumPy 2's __array__), filtered
# as pytest.ini does; they are raised while importing, hence before the imports.
# ruff: noqa: E402
warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "__array__ implementation doesn't accept", DeprecationWarning)

import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from condinst_d2 import Predictor
from condinst_d2.data import read_image, write_coco_split
from condinst_d2.engine import Trainer, build_cfg, save_config, save_results

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
    model_dir: str, test_dataset: Tuple[str, str], out_dir: str, count: int
) -> List[str]:
    """Draws the predictions of the model in `model_dir` (a training run's OUTPUT_DIR) on the
    first `count` held-out images, with the model's class names; returns the paths."""
    predictor = Predictor.from_output_dir(model_dir, score_threshold=0.5)
    with open(test_dataset[0]) as f:
        images = json.load(f)["images"][:count]
    paths = []
    for image in images:
        bgr = read_image(os.path.join(test_dataset[1], image["file_name"]), format="BGR")
        instances = predictor.predict(bgr).instances
        drawn = Visualizer(bgr[:, :, ::-1], predictor.metadata).draw_instance_predictions(instances)
        paths.append(os.path.join(out_dir, f"prediction_{image['id']:03d}.png"))
        drawn.save(paths[-1])
    return paths


class _NoModelDump(logging.Filter):
    """Keeps Detectron2's "Model:" record (hundreds of lines) out of the console; log.txt has it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Model:\n")


def setup_logging(log_file: str) -> None:
    """Detectron2's and condinst_d2's logs to the console (without the model dump) and `log_file`."""
    for name in ("detectron2", "condinst_d2"):
        for handler in setup_logger(log_file, name=name).handlers:
            if getattr(handler, "stream", None) is sys.stdout:
                handler.addFilter(_NoModelDump())


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
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file} does not exist")
    model_dir = os.path.join(args.output, "model")
    os.makedirs(model_dir, exist_ok=True)
    setup_logging(os.path.join(model_dir, "log.txt"))

    data_dir = os.path.join(args.output, "shapes")
    size = (256, 320)
    train = ensure_split(data_dir, "train", args.num_train, size, seed=0)
    test = ensure_split(data_dir, "test", args.num_test, size, seed=1)
    opts = ["OUTPUT_DIR", model_dir] + list(args.opts)
    cfg = build_cfg(args.config_file, opts, train_dataset=train, test_dataset=test)
    save_config(cfg)  # as train_net.py's default_setup does: the model describes itself

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # evaluates on the held-out split at the end
    save_results(results, os.path.join(args.output, "results.json"))
    drawn = draw_predictions(cfg.OUTPUT_DIR, test, args.output, args.num_drawn)
    if results:
        segm, bbox = results["segm"]["AP"], results["bbox"]["AP"]
        summary = f"held-out segm AP {segm:.1f}, bbox AP {bbox:.1f}"
    else:  # COCOEvaluator returns nothing when the model predicts nothing
        summary = "no detections on the held-out split (train longer)"
    print(f"\nQuick start done: {summary}.\nModel: {cfg.OUTPUT_DIR} (model_final.pth, config.yaml)")
    print(f"Drawn predictions: {', '.join(drawn)}")
    print(
        f"Curves: python tools/plot_metrics.py {cfg.OUTPUT_DIR}, or tensorboard --logdir {cfg.OUTPUT_DIR}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
