"""Training and evaluation on top of Detectron2's DefaultTrainer, shared by train_net.py and the
quick-start."""
import logging
import os
import weakref
from typing import Optional, Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .checkpoint import CondInstCheckpointer, make_saves_atomic
from .config import add_condinst_config
from .data import CondInstDatasetMapper, register_coco_dataset

__all__ = ["Trainer", "build_cfg", "check_num_classes", "configure_cpu_run", "enable_cpu_ddp"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCOEvaluator (bbox and segm) for every test set, a data mapper that
    names the image it cannot read (and reads 16-bit, grayscale, RGBA, EXIF-rotated images
    correctly), and a checkpointer that writes `model_*.pth` / `last_checkpoint` atomically and
    names the file it cannot load."""

    def __init__(self, cfg):
        check_num_classes(cfg)
        super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer has just made a DetectionCheckpointer; ours (clear errors on loading a
        # wrong or truncated file, atomic saves) replaces it before the periodic-checkpoint hook
        # takes it.
        self.checkpointer = make_saves_atomic(
            CondInstCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        )
        return super().build_hooks()

    def train(self):
        """Trains; returns the results of the evaluation that ends training (None without one).

        DefaultTrainer returns them only when TEST.EXPECTED_RESULTS is set.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=CondInstDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=CondInstDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def check_num_classes(cfg: CfgNode) -> None:
    """Fails at start-up when MODEL.FCOS.NUM_CLASSES differs from a dataset's number of classes."""
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.FCOS.NUM_CLASSES:
            raise ValueError(
                f"MODEL.FCOS.NUM_CLASSES is {cfg.MODEL.FCOS.NUM_CLASSES} but dataset {name!r} has "
                f"{len(classes)} classes; set it to {len(classes)} (--train-dataset does this)"
            )


def configure_cpu_run(cfg: CfgNode) -> None:
    """Process-wide settings for training on the CPU: DDP over gloo and flush-to-zero (denormal
    floats appear after a few iterations and make CPU steps many times slower)."""
    if cfg.MODEL.DEVICE == "cpu":
        enable_cpu_ddp()
        torch.set_flush_denormal(True)


def enable_cpu_ddp() -> None:
    """Lets DefaultTrainer wrap a CPU model in DistributedDataParallel (gloo processes).

    Detectron2 passes the process's GPU index as DDP's device_ids, which DDP rejects for a CPU
    module; for those, device_ids must be None.
    """
    create = d2_defaults.create_ddp_model
    if getattr(create, "handles_cpu", False):
        return

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
            logger.info("DistributedDataParallel over %d CPU processes (gloo)", comm.get_world_size())
        return create(model, **kwargs)

    create_ddp_model.handles_cpu = True
    d2_defaults.create_ddp_model = create_ddp_model


def build_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    train_dataset: Optional[Sequence[str]] = None,
    test_dataset: Optional[Sequence[str]] = None,
) -> CfgNode:
    """The frozen config of a run.

    Args:
        train_dataset, test_dataset: (COCO JSON, image folder) to register and use; they set
            MODEL.FCOS.NUM_CLASSES (and the class names) from the JSON. A training set given
            without a test set clears DATASETS.TEST (no evaluation).
    Without CUDA, a config asking for a GPU runs on the CPU.
    """
    cfg = get_cfg()
    add_condinst_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    for prefix, dataset, key in (("train", train_dataset, "TRAIN"), ("test", test_dataset, "TEST")):
        if dataset:
            name, num_classes = register_coco_dataset(prefix, *dataset)
            cfg.DATASETS[key] = (name,)
            cfg.MODEL.FCOS.NUM_CLASSES = num_classes
    if train_dataset and not test_dataset and cfg.DATASETS.TEST:
        # The config's test sets belong to other classes than the given training set.
        logger.info("No test dataset given with the training dataset: %s not evaluated", cfg.DATASETS.TEST)
        cfg.DATASETS.TEST = ()
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg
