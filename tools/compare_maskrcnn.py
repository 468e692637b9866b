#!/usr/bin/env python
"""CondInst vs Detectron2's Mask R-CNN on your data: same backbone, schedule, batch, sizes and
augmentation; both evaluated with COCOEvaluator on the same held-out set, printed side by side.

    python tools/compare_maskrcnn.py --train-dataset train.json images/ \
        --test-dataset val.json images/ [--seeds 1 2 3] [--json results.json] [KEY VALUE ...]
    python tools/compare_maskrcnn.py --split instances.json person OUT_DIR

CondInst is the config given (default configs/CondInst/EfficientNetLite0_CPU.yaml). Mask R-CNN is
the same config with the MODEL section of Detectron2's model-zoo Base-RCNN-FPN.yaml (RPN and
anchors on P2-P6, box and mask RoI heads on P2-P5) in place of CondInst's heads, on the config's
own backbone builder with FPN inputs c2-c5: P2-P5, and P6 (with P7, unused) computed from P5 as in
CondInst. Its box head has 2 FC of 256, its mask head 4 convs of 64 channels (--box-fc-dim,
--mask-conv-dim). Everything else (backbone weights and freezing, FPN width, SOLVER, INPUT,
DATALOADER) is the config's, for both. KEY VALUE overrides apply to both models after that; a key
of one model's heads (MODEL.FCOS.*, MODEL.ROI_HEADS.*) changes only that model.

Each model and seed trains in OUTPUT/<model>/seed<k> (config.yaml, log.txt, metrics.json,
model_final.pth, results.json); seconds per iteration are the mean of Detectron2's per-iteration
times (data loading included, the first 2 iterations left out). With several seeds the table ends
with the mean and the sample standard deviation over them. A run that diverges (a non-finite loss
or box) is marked so in its row, without APs, and the comparison goes on; the means of its model
are then left out ("-").

--split writes OUT_DIR/<class>_train.json and <class>_val.json of one class of a COCO JSON
(`condinst_d2.data.splits`): its images sorted by id, every 4th held out; the images stay in place.

A mistake in the inputs ends with one line `error: ...` and exit status 1 (--debug: traceback).
"""

import warnings

# Third-party deprecation warnings (detectron2's torch.jit.script, NumPy 2's __array__), filtered
# as pytest.ini does; they are raised while importing, hence before the imports.
# ruff: noqa: E402
warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "__array__ implementation doesn't accept", DeprecationWarning)
warnings.filterwarnings(
    "ignore", "pkg_resources is deprecated", UserWarning
)  # detectron2.model_zoo

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml
from detectron2 import model_zoo
from detectron2.config import CfgNode
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from condinst_d2.data.splits import write_one_class_split
from condinst_d2.engine import Trainer, build_cfg, check_solver, save_config, save_results
from condinst_d2.utils import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_net import reporting  # its one-line report of a user's mistake, exit status 1

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "CondInst", "EfficientNetLite0_CPU.yaml")
MASK_RCNN_BASE = "Base-RCNN-FPN.yaml"  # Detectron2's FPN R-CNN: its MODEL section (heads, RPN)
BACKBONE_SECTIONS = ("BACKBONE", "RESNETS", "FPN")  # of the CondInst config instead
MODELS = {"condinst": "CondInst", "mask_rcnn": "Mask R-CNN"}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = ("segm", "bbox")
logger = logging.getLogger("condinst_d2.compare_maskrcnn")


def _flatten(tree: Dict[str, Any], prefix: str) -> List[Any]:
    """KEY VALUE ... of the leaves of a nested YAML mapping, keys prefixed ("MODEL.RPN...")."""
    opts: List[Any] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            opts += _flatten(value, f"{prefix}{key}.")
        else:
            opts += [f"{prefix}{key}", value]
    return opts


def mask_rcnn_opts(num_classes: int, box_fc_dim: int = 256, mask_conv_dim: int = 64) -> List[Any]:
    """The overrides that turn a CondInst config into Mask R-CNN on the same backbone builder.

    Returns:
        KEY VALUE ...: Base-RCNN-FPN.yaml's MODEL section without its backbone sections, FPN on
        c2-c5 (P2 is Mask R-CNN's finest level), the RPN, masks on, `num_classes` and the head widths.
    """
    with open(model_zoo.get_config_file(MASK_RCNN_BASE)) as f:
        model = yaml.safe_load(f)["MODEL"]
    heads = {k: v for k, v in model.items() if k not in BACKBONE_SECTIONS}
    return _flatten(heads, "MODEL.") + [
        "MODEL.PROPOSAL_GENERATOR.NAME", "RPN",  # Detectron2's default, which CondInst's replace
        "MODEL.FPN.IN_FEATURES", ["c2", "c3", "c4", "c5"],
        "MODEL.MASK_ON", True,
        "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
        "MODEL.ROI_BOX_HEAD.FC_DIM", box_fc_dim,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", mask_conv_dim,
    ]  # fmt: skip


def build_configs(args: argparse.Namespace, seed: int) -> Dict[str, CfgNode]:
    """The frozen config of each model for `seed`, checked as train_net.py checks its own."""
    datasets = {"train_dataset": args.train_dataset, "test_dataset": args.test_dataset}

    def run_opts(model: str) -> List[Any]:
        out = os.path.join(args.output_dir, model, f"seed{seed}")
        return ["SEED", seed, "OUTPUT_DIR", out, *args.opts]

    condinst = build_cfg(args.config_file, run_opts("condinst"), **datasets)
    heads = mask_rcnn_opts(condinst.MODEL.FCOS.NUM_CLASSES, args.box_fc_dim, args.mask_conv_dim)
    # The user's overrides come last, so that they can change Mask R-CNN's heads too.
    mask_rcnn = build_cfg(args.config_file, heads + run_opts("mask_rcnn"), **datasets)
    for cfg in (condinst, mask_rcnn):
        check_solver(cfg)
    return {"condinst": condinst, "mask_rcnn": mask_rcnn}


def train_and_evaluate(cfg: CfgNode) -> Dict[str, Any]:
    """Trains the model of `cfg` from cfg.SEED and evaluates it on its test set.

    Returns:
        {"segm": {metric: value}, "bbox": {...}, "seconds_per_iter": float, "diverged": None};
        a metric that COCOeval leaves undefined (no object of that size, no detection) is NaN.
        A run whose training diverges (Detectron2's FloatingPointError: a non-finite loss or
        box) has NaN metrics and "diverged": what and at which iteration; the others go on.
    """
    save_config(cfg)
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    diverged = None
    try:
        results = trainer.train() or {}
        save_results(results, os.path.join(cfg.OUTPUT_DIR, "results.json"))
    except FloatingPointError as e:
        results, diverged = {}, f"diverged at iteration {trainer.iter}: {e}"
        logger.warning("%s: %s", cfg.OUTPUT_DIR, diverged)
    histories = trainer.storage.histories()
    seconds = histories["time"].global_avg() if "time" in histories else math.nan
    row = {task: {m: results.get(task, {}).get(m, math.nan) for m in METRICS} for task in TASKS}
    return {**row, "seconds_per_iter": seconds, "diverged": diverged}


def summarize(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per model: {"segm/AP": {"mean", "spread"}, ..., "seconds_per_iter": {...}} over its runs;
    spread is the sample standard deviation (0 for one run), NaN where a run's value is."""
    summary = {}
    for model in MODELS:
        rows = [r for r in runs if r["model"] == model]
        columns = {f"{t}/{m}": [r[t][m] for r in rows] for t in TASKS for m in METRICS}
        columns["seconds_per_iter"] = [r["seconds_per_iter"] for r in rows]
        summary[model] = {k: _mean_spread(v) for k, v in columns.items()}
    return summary


def _mean_spread(values: Sequence[float]) -> Dict[str, float]:
    if any(math.isnan(v) for v in values):
        return {"mean": math.nan, "spread": math.nan}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "spread": spread}


def _cell(value: float, spread: Optional[float] = None, digits: int = 1) -> str:
    if math.isnan(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def format_table(runs: Sequence[Dict[str, Any]], summary: Dict[str, Dict]) -> str:
    """A Markdown table: one row per run, then (several seeds) one mean ± spread row per model."""
    header = ["model"] + [f"{t} {m}" for t in TASKS for m in METRICS] + ["s/iter"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [_cell(r[t][m]) for t in TASKS for m in METRICS]
        cells.append(_cell(r["seconds_per_iter"], digits=2))
        name = f"{MODELS[r['model']]}, seed {r['seed']}"
        if r["diverged"]:
            name += f" ({r['diverged'].split(':')[0]})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(runs) > len(MODELS):
        for model, stats in summary.items():
            keys = [f"{t}/{m}" for t in TASKS for m in METRICS]
            cells = [_cell(stats[k]["mean"], stats[k]["spread"]) for k in keys]
            s = stats["seconds_per_iter"]
            cells.append(_cell(s["mean"], s["spread"], digits=2))
            lines.append(f"| {MODELS[model]}, mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite_or_none(tree: Any) -> Any:
    """`tree` with NaN as None: strict JSON has no NaN."""
    if isinstance(tree, dict):
        return {k: _finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite_or_none(v) for v in tree]
    return None if isinstance(tree, float) and math.isnan(tree) else tree


def compare(args: argparse.Namespace) -> Dict[str, Any]:
    """Trains and evaluates both models for every seed; returns the runs and their summary."""
    configs = {seed: build_configs(args, seed) for seed in args.seeds}  # all mistakes first
    runs = []
    for seed, by_model in configs.items():
        for model, cfg in by_model.items():
            logger.info("Training %s, seed %d, in %s", MODELS[model], seed, cfg.OUTPUT_DIR)
            runs.append({"model": model, "seed": seed, **train_and_evaluate(cfg)})
            logger.info(
                "%s, seed %d: segm AP %.1f, bbox AP %.1f, %.2f s/iter",
                MODELS[model],
                seed,
                runs[-1]["segm"]["AP"],
                runs[-1]["bbox"]["AP"],
                runs[-1]["seconds_per_iter"],
            )
    return {
        "config_file": args.config_file,
        "train_dataset": args.train_dataset,
        "test_dataset": args.test_dataset,
        "opts": list(args.opts),
        "mask_rcnn_heads": {"box_fc_dim": args.box_fc_dim, "mask_conv_dim": args.mask_conv_dim},
        "runs": runs,
        "summary": summarize(runs),
    }


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="the CondInst config")
    for split in ("train", "test"):
        parser.add_argument(
            f"--{split}-dataset",
            nargs=2,
            metavar=("JSON", "IMAGE_ROOT"),
            help=f"a COCO-format instance JSON and its image folder: the {split} set of both",
        )
    parser.add_argument(
        "--seeds", nargs="+", default=["1"], help="integers: one run of each model per seed"
    )
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output", "compare_maskrcnn"))
    parser.add_argument("--json", help="write the runs and their mean and spread to this file")
    parser.add_argument("--box-fc-dim", type=int, default=256, help="Mask R-CNN's 2 box FCs")
    parser.add_argument("--mask-conv-dim", type=int, default=64, help="its 4 mask convs")
    parser.add_argument(
        "--split",
        nargs=3,
        metavar=("JSON", "CLASS", "OUT_DIR"),
        help="only write the one-class train/val split of JSON to OUT_DIR, and exit",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments, with --seeds' integers as ints: the tokens after them are the overrides
    (`--seeds 1 2 SOLVER.MAX_ITER 20`)."""
    args = argument_parser().parse_args(argv)
    count = next((i for i, x in enumerate(args.seeds) if not re.fullmatch(r"-?\d+", x)), None)
    if count is not None:
        args.seeds, args.opts = args.seeds[:count], args.seeds[count:] + args.opts
    args.seeds = [int(x) for x in args.seeds]
    return args


def run(args: argparse.Namespace) -> int:
    """The split, or the comparison: prints the table (and writes --json); returns 0."""
    if args.split:
        json_file, class_name, out_dir = args.split
        train, val = write_one_class_split(json_file, class_name, out_dir)
        print(f"Wrote {train} and {val}; their image folder is the one of {json_file}")
        return 0
    if not args.train_dataset or not args.test_dataset:
        raise ValueError("give --train-dataset JSON IMAGE_ROOT and --test-dataset JSON IMAGE_ROOT")
    if not args.seeds:
        raise ValueError("--seeds needs at least one integer")
    misplaced = [x for x in args.opts if x.startswith("--")]
    if misplaced:
        raise ValueError(f"option {misplaced[0]} after the KEY VALUE overrides: put it before them")
    os.makedirs(args.output_dir, exist_ok=True)
    for name in (
        "detectron2",
        "condinst_d2",
    ):  # the full logs go to the file, progress to the console
        setup_logger(os.path.join(args.output_dir, "log.txt"), name=name, configure_stdout=False)
    setup_logger(name="condinst_d2.compare_maskrcnn", abbrev_name="compare")
    results = compare(args)
    print(format_table(results["runs"], results["summary"]))
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(_finite_or_none(results), f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the tool; a user's mistake is one line on stderr and exit status 1 (SystemExit)."""
    args = parse_args(argv)
    return reporting(run, args)


if __name__ == "__main__":
    sys.exit(main())
