"""Training and evaluation on top of Detectron2's DefaultTrainer, shared by train_net.py and the
quick-start."""

import contextlib
import errno
import json
import logging
import os
import weakref
from typing import Any, Iterator, Optional, Sequence

import torch
import yaml
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
from .classes import get_class_names
from .config import get_condinst_cfg
from .data import CondInstDatasetMapper, register_coco_dataset
from .utils import atomic_write

__all__ = [
    "Trainer",
    "build_cfg",
    "check_num_classes",
    "check_solver",
    "save_config",
    "save_results",
    "user_error_message",
]

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
        check_solver(cfg)
        with _ddp_accepts_cpu_models():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer has just made a DetectionCheckpointer; ours (clear errors on loading a
        # wrong or truncated file, atomic saves) replaces it before the periodic-checkpoint hook
        # takes it.
        checkpointer = CondInstCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        checkpointer.class_names = self.cfg.MODEL.FCOS.CLASS_NAMES  # travel with every file
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
    """Fails at start-up when a dataset's classes differ from the model's: their number
    (MODEL.FCOS.NUM_CLASSES) or, when the config names them, their names and order."""
    configured = list(cfg.MODEL.FCOS.CLASS_NAMES)
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.FCOS.NUM_CLASSES:
            raise ValueError(
                f"MODEL.FCOS.NUM_CLASSES is {cfg.MODEL.FCOS.NUM_CLASSES} but dataset {name!r} has "
                f"{len(classes)} classes; set it to {len(classes)} (--train-dataset does this)"
            )
        if classes is not None and configured and list(classes) != configured:
            raise ValueError(
                f"dataset {name!r} has the classes {list(classes)}, the model {configured} "
                "(MODEL.FCOS.CLASS_NAMES): the same classes, in the same order, are needed"
            )


def check_solver(cfg: CfgNode) -> None:
    """Fails at start-up on solver (and mask format) values that Detectron2 would only trip over
    during training."""
    for key in ("MAX_ITER", "CHECKPOINT_PERIOD", "IMS_PER_BATCH"):
        if cfg.SOLVER[key] < 1:
            raise ValueError(
                f"SOLVER.{key} is {cfg.SOLVER[key]}; it must be >= 1"
                + (
                    " (to save only the final model, make it larger than SOLVER.MAX_ITER)"
                    if key == "CHECKPOINT_PERIOD"
                    else ""
                )
            )
    if cfg.INPUT.MASK_FORMAT not in ("polygon", "bitmask"):
        raise ValueError(f"INPUT.MASK_FORMAT is {cfg.INPUT.MASK_FORMAT!r}; use polygon or bitmask")
    if not 0 < cfg.SOLVER.BASE_LR < float("inf"):
        raise ValueError(f"SOLVER.BASE_LR is {cfg.SOLVER.BASE_LR}; it must be a positive number")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(
            f"SOLVER.AMP.ENABLED needs a CUDA GPU (Detectron2's AMPTrainer); MODEL.DEVICE is "
            f"{cfg.MODEL.DEVICE!r}: set SOLVER.AMP.ENABLED False (on a CPU with bf16 "
            f"arithmetic, MODEL.CONDINST.BF16 True trains in bf16)"
        )
    if cfg.SOLVER.IMS_PER_BATCH % comm.get_world_size():
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
            f"{comm.get_world_size()} processes; make it a multiple of --num-gpus"
        )


def _bitmasks_for_rle(cfg: CfgNode) -> None:
    """Switches INPUT.MASK_FORMAT to bitmask when a training set has RLE masks (polygon, the
    default, fails on them late in the data loader)."""
    rle = [n for n in cfg.DATASETS.TRAIN if MetadataCatalog.get(n).get("rle_masks", False)]
    if rle and cfg.INPUT.MASK_FORMAT == "polygon":
        logger.warning("%s has RLE masks: INPUT.MASK_FORMAT polygon -> bitmask", rle[0])
        cfg.INPUT.MASK_FORMAT = "bitmask"


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


def _read_config(config_file: str, opts: Sequence[str]) -> CfgNode:
    """`get_condinst_cfg`, with every mistake in the file or the overrides as a ValueError (or
    FileNotFoundError) that names the file or key."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(errno.ENOENT, "config file not found", config_file)
    where = f"config {config_file!r}" + (f" with overrides {list(opts)}" if opts else "")
    try:
        return get_condinst_cfg(config_file, opts)
    except FileNotFoundError:
        raise
    except (AttributeError, TypeError) as e:  # yacs on a YAML that is not a mapping
        raise ValueError(f"{where}: not a YAML mapping of config keys ({e})") from e
    except (KeyError, AssertionError, ValueError, yaml.YAMLError) as e:
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) else e).split())
        if len(message) > 300:
            message = message[:300] + " ..."
        raise ValueError(
            f"{where}: {message} (keys and types: configs/CondInst/, condinst_d2/config.py)"
        ) from e


def user_error_message(error: BaseException) -> Optional[str]:
    """The one line that reports `error` if it is a user's foreseeable mistake, else None.

    Those are the OSError, ValueError and FloatingPointError (non-finite loss) that condinst_d2
    and Detectron2 raise for bad inputs, configs and files; their messages name the input.
    """
    if not isinstance(error, (OSError, ValueError, FloatingPointError)):
        return None
    message = " ".join(_without_worker_traceback(str(error)).split())
    if isinstance(error, FloatingPointError):
        message += " (lower SOLVER.BASE_LR, or check the data of the last batches)"
    return f"error: {message}"


def _without_worker_traceback(message: str) -> str:
    """The message of an error raised in a DataLoader worker process, which torch re-raises with
    the worker's traceback in the message: only the last exception's own message is kept."""
    _, found, trace = message.partition("Original Traceback (most recent call last):")
    if not found:
        return message
    lines = trace.splitlines()
    ends = [
        i for i in range(1, len(lines)) if lines[i][:1] not in ("", " ") and lines[i - 1][:1] == " "
    ]
    if not ends:
        return message
    error = "\n".join(lines[ends[-1] :])
    name, colon, text = error.partition(": ")
    return text if colon and " " not in name else error


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
            MODEL.FCOS.NUM_CLASSES and MODEL.FCOS.CLASS_NAMES from the JSON (the training set's
            when both are given). A training set given without a test set clears DATASETS.TEST
            (no evaluation). Without either, the class names come from the config's datasets
            when they are registered with names (`get_class_names`). A training set with RLE
            masks sets INPUT.MASK_FORMAT to bitmask.
    """
    cfg = _read_config(config_file, opts)
    # The training set defines the model's classes; a test set alone (eval-only) does.
    for prefix, dataset, key in (("test", test_dataset, "TEST"), ("train", train_dataset, "TRAIN")):
        if dataset:
            name, num_classes = register_coco_dataset(prefix, *dataset)
            cfg.DATASETS[key] = (name,)
            cfg.MODEL.FCOS.NUM_CLASSES = num_classes
            cfg.MODEL.FCOS.CLASS_NAMES = list(MetadataCatalog.get(name).thing_classes)
    if not cfg.MODEL.FCOS.CLASS_NAMES:  # e.g. the builtin COCO datasets of the paper's configs
        cfg.MODEL.FCOS.CLASS_NAMES = get_class_names(cfg, read_checkpoint=False) or []
    if train_dataset and not test_dataset and cfg.DATASETS.TEST:
        # The config's test sets belong to other classes than the given training set.
        logger.info(
            "No test dataset given with the training dataset: %s not evaluated", cfg.DATASETS.TEST
        )
        cfg.DATASETS.TEST = ()
    _bitmasks_for_rle(cfg)
    cfg.freeze()
    return cfg


def save_config(cfg: CfgNode) -> str:
    """Writes `cfg` to OUTPUT_DIR/config.yaml (as Detectron2's `default_setup` does); returns it.

    The file describes the trained model: `get_condinst_cfg` reads it back, class names included.
    """
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    with atomic_write(path) as f:
        f.write(cfg.dump())
    return path


def save_results(results: Optional[dict], path: str) -> None:
    """Writes the evaluation results (task -> metric -> value, e.g. results["segm"]["AP"]) to
    `path` as JSON; `{}` when there are none (no test set, or no detections)."""
    with atomic_write(path) as f:
        json.dump(results or {}, f, indent=1)
