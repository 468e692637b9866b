"""BoxInst trained from boxes only: user data with degenerate boxes (tiny, huge, overlapping, on
the image border) keeps every loss finite."""

import json

import numpy as np

from condinst_d2.data import write_coco_split
from condinst_d2.engine import Trainer, build_cfg

from helpers import ROOT, write_boxes_only

SMALL = str(ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml")
LOSSES = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_prj", "loss_pairwise")


def _train(config_file, opts, train_dataset, test_dataset=None):
    cfg = build_cfg(config_file, opts, train_dataset=train_dataset, test_dataset=test_dataset)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer, trainer.train()


def _degenerate_boxes_dataset(tmp_path) -> tuple:
    """Generated images with boxes only, among them tiny, huge, overlapping and border boxes."""
    json_file = write_coco_split(str(tmp_path), "train", 4, (96, 128), seed=2)
    data = json.loads(open(json_file).read())
    extra = [
        [0.0, 0.0, 1.0, 1.0],  # tiny, in the corner
        [60.2, 40.7, 0.6, 0.5],  # under a pixel
        [0.0, 0.0, 128.0, 96.0],  # the whole image
        [-20.0, 50.0, 60.0, 80.0],  # beyond the left and bottom borders
        [100.0, 0.0, 28.0, 96.0],  # along the right border
        [30.0, 20.0, 50.0, 50.0],  # two nearly identical, overlapping boxes
        [31.0, 21.0, 50.0, 50.0],
    ]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for image in data["images"]:
        for k, box in enumerate(extra):
            data["annotations"].append(
                {
                    "id": next_id,
                    "image_id": image["id"],
                    "category_id": 1 + k % 4,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
            next_id += 1
    return write_boxes_only(data, tmp_path), str(tmp_path / "train")


def test_degenerate_boxes_keep_every_loss_finite(tmp_path):
    """The trainer stops on a non-finite loss; this run must not, and every loss must be finite
    at every iteration, with the pairwise loss at full weight from the start."""
    opts = {
        "MODEL.BOXINST.ENABLED": True,
        "MODEL.CONDINST.MAX_PROPOSALS": -1,
        "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM": 64,
        "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS": 1,
        "SOLVER.MAX_ITER": 12,
        "SOLVER.BASE_LR": 0.02,
        "SOLVER.WARMUP_ITERS": 2,
        "INPUT.MIN_SIZE_TRAIN": "(96, 128)",
        "OUTPUT_DIR": str(tmp_path / "out"),
    }
    trainer, _ = _train(
        SMALL, [str(x) for kv in opts.items() for x in kv], _degenerate_boxes_dataset(tmp_path)
    )
    for key in LOSSES:
        values = [v for v, _ in trainer.storage.history(key).values()]
        assert len(values) == 12 and np.isfinite(values).all(), key
