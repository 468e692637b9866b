#!/usr/bin/env python
"""Trains and evaluates CondInst with Detectron2's DefaultTrainer and COCOEvaluator.

    python train_net.py --config-file configs/CondInst/MS_R_50_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/CondInst/EfficientNetLite0_CPU.yaml \
        --train-dataset data/train.json data/train --test-dataset data/val.json data/val
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth

On a machine without CUDA, --num-gpus N runs N CPU processes over gloo. OUTPUT_DIR gets
config.yaml (with the class names), the checkpoints, log.txt, metrics.json, TensorBoard events and
results.json (the final AP tables). A mistake in the inputs (config, datasets, checkpoints, disk)
ends with one line `error: ...` and exit status 1; --debug (or CONDINST_DEBUG=1) shows the
traceback instead.
"""

import warnings

# Third-party deprecation warnings (detectron2's torch.jit.script, NumPy 2's __array__), filtered
# as pytest.ini does; they are raised while importing, hence before the imports.
# ruff: noqa: E402
warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "__array__ implementation doesn't accept", DeprecationWarning)

import logging
import os
import sys

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.classes import inference_config
from condinst_d2.engine import Trainer, build_cfg, check_solver, save_results, user_error_message

logger = logging.getLogger("condinst_d2.train_net")


def main(args):
    cfg = build_cfg(args.config_file, args.opts, args.train_dataset, args.test_dataset)
    if args.eval_only:  # the checkpoint's classes, checked against the test set's
        cfg = inference_config(cfg)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="condinst_d2")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = CondInstCheckpointer(model, save_dir=cfg.OUTPUT_DIR, for_inference=True)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
    else:
        logger.info("Curves: tensorboard --logdir %s (or tools/plot_metrics.py)", cfg.OUTPUT_DIR)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process() and cfg.DATASETS.TEST:
        path = os.path.join(cfg.OUTPUT_DIR, "results.json")
        save_results(results, path)
        logger.info("AP tables written to %s", path)
    return results


def check_inputs(args):
    """Reads the config and the datasets, so that their mistakes are reported once by the
    launching process rather than by every worker."""
    check_solver(build_cfg(args.config_file, args.opts, args.train_dataset, args.test_dataset))


def reporting(func, args):
    """`func(args)`, with a user's mistake as one line on stderr and exit status 1."""
    try:
        return func(args)
    except Exception as e:
        message = None if args.debug else user_error_message(e)
        if message is None:
            raise
        sys.stderr.write(message + "\n")
        sys.exit(1)


def argument_parser():
    parser = default_argument_parser(__doc__)
    for split in ("train", "test"):
        parser.add_argument(
            f"--{split}-dataset",
            nargs=2,
            metavar=("JSON", "IMAGE_ROOT"),
            help=f"a COCO-format instance JSON and its image folder, used as the {split} set "
            "(sets MODEL.FCOS.NUM_CLASSES and the class names from the JSON)",
        )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("CONDINST_DEBUG", "") not in ("", "0"),
        help="show the traceback of every error (default: one line for a mistake in the "
        "inputs); also CONDINST_DEBUG=1",
    )
    return parser


def parse_args(argv=None):
    """The arguments; options written after the config overrides (`KEY VALUE ... --resume`) are
    read as options too, not as overrides."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    while True:  # each round consumes at least the option found
        at = next((i for i, x in enumerate(args.opts) if x.startswith("--") and x != "--"), None)
        if at is None:
            return args
        overrides = args.opts[:at]
        args = parser.parse_args(args.opts[at:], namespace=args)
        args.opts = overrides + args.opts


if __name__ == "__main__":
    args = parse_args()
    if args.num_gpus * args.num_machines > 1:
        reporting(check_inputs, args)
    try:
        launch(
            reporting,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, args),
        )
    except ProcessExitedException as e:  # a worker failed; it has reported why
        if args.debug:
            raise
        sys.exit(e.exit_code or 1)
