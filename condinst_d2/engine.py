"""Training and evaluation on top of Detectron2's DefaultTrainer, shared by train_net.py and the
quick-start."""

import contextlib
import logging
import os
import weakref
from typing import Any, Iterator, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .checkpoint import CondInstCheckpointer, make_saves_atomic
from .config import get_condinst_cfg
from .data import CondInstDatasetMapper, register_coco_dataset

__all__ = ["Trainer", "build_cfg", "check_num_classes"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCOEvaluator (bbox and segm) for every test set, a data mapper that
    names the image it cannot read (and reads 16-bit, grayscale, RGBA, EXIF-rotated images
    correctly), and a checkpointer that writes `model_*.pth` / `last_checkpoint` atomically and
    names the file it cannot load.

    On the CPU, several processes (`--num-gpus N` without CUDA) train with DDP over gloo, and
    training runs with flush-to-zero; both only while this trainer needs them.
    """

    def __init__(self, cfg: CfgNode):
        check_num_classes(cfg)
        with _ddp_accepts_cpu_models():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer has just made a DetectionCheckpointer; ours (clear errors on loading a
        # wrong or truncated file, atomic saves) replaces it before the periodic-checkpoint hook
        # takes it.
        checkpointer = CondInstCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.checkpointer = make_saves_atomic(checkpointer)
        return super().build_hooks()

    def train(self) -> Optional[dict]:
        """Trains; returns the results of the evaluation that ends training (None without one).

        DefaultTrainer returns them only when TEST.EXPECTED_RESULTS is set.
        """
        with _flush_denormal(self.cfg.MODEL.DEVICE == "cpu"):
            super().train()
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=CondInstDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = CondInstDatasetMapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # A box-only test set (BoxInst's data) has no masks to compute segm AP against.
        tasks = None if MetadataCatalog.get(dataset_name).get("has_masks", True) else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)


def check_num_classes(cfg: CfgNode) -> None:
    """Fails at start-up when MODEL.FCOS.NUM_CLASSES differs from a dataset's number of classes."""
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.FCOS.NUM_CLASSES:
            raise ValueError(
                f"MODEL.FCOS.NUM_CLASSES is {cfg.MODEL.FCOS.NUM_CLASSES} but dataset {name!r} has "
                f"{len(classes)} classes; set it to {len(classes)} (--train-dataset does this)"
            )


@contextlib.contextmanager
def _ddp_accepts_cpu_models() -> Iterator[None]:
    """For the duration of the block, lets DefaultTrainer wrap a CPU model in DDP (gloo).

    DefaultTrainer calls `detectron2.engine.defaults.create_ddp_model`, which passes the process's
    GPU index as DDP's device_ids; DDP rejects those for a CPU module, which needs None. Detectron2
    offers no other way in, so that function is replaced here and restored on leaving.
    """
    create = d2_defaults.create_ddp_model

    def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        world_size = comm.get_world_size()
        if world_size > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
            logger.info("DistributedDataParallel over %d CPU processes (gloo)", world_size)
        return create(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create


@contextlib.contextmanager
def _flush_denormal(enabled: bool) -> Iterator[None]:
    """Flush-to-zero in the block when `enabled`, then the calling thread's previous setting.

    Denormal floats appear after a few training iterations and make CPU steps many times slower.
    torch has no getter for the setting: a denormal float32 reads back as 0 when it is on.
    """
    if not enabled:
        yield
        return
    was_enabled = torch.tensor([1e-39]).mul(1.0).item() == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_enabled)


def build_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    train_dataset: Optional[Sequence[str]] = None,
    test_dataset: Optional[Sequence[str]] = None,
) -> CfgNode:
    """The frozen config of a run: `get_condinst_cfg`, then the datasets given.

    Args:
        config_file: a CondInst YAML config.
        opts: config overrides, KEY VALUE ...
        train_dataset, test_dataset: (COCO JSON, image folder) to register and use; they set
            MODEL.FCOS.NUM_CLASSES (and the class names) from the JSON. A training set given
            without a test set clears DATASETS.TEST (no evaluation).
    """
    cfg = get_condinst_cfg(config_file, opts)
    for prefix, dataset, key in (("train", train_dataset, "TRAIN"), ("test", test_dataset, "TEST")):
        if dataset:
            name, num_classes = register_coco_dataset(prefix, *dataset)
            cfg.DATASETS[key] = (name,)
            cfg.MODEL.FCOS.NUM_CLASSES = num_classes
    if train_dataset and not test_dataset and cfg.DATASETS.TEST:
        # The config's test sets belong to other classes than the given training set.
        logger.info(
            "No test dataset given with the training dataset: %s not evaluated", cfg.DATASETS.TEST
        )
        cfg.DATASETS.TEST = ()
    cfg.freeze()
    return cfg
