#!/usr/bin/env python
"""Trains and evaluates CondInst with Detectron2's DefaultTrainer and COCOEvaluator.

    python train_net.py --config-file configs/CondInst/MS_R_50_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/CondInst/EfficientNetLite0_CPU.yaml \
        --train-dataset data/train.json data/train --test-dataset data/val.json data/val
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth

On a machine without CUDA, --num-gpus N runs N CPU processes over gloo.
"""

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.engine import Trainer, build_cfg


def main(args):
    cfg = build_cfg(args.config_file, args.opts, args.train_dataset, args.test_dataset)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="condinst_d2")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = CondInstCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
