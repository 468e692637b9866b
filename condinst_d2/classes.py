"""The class names of a model, which travel with it.

Training records them twice: in the run's config (MODEL.FCOS.CLASS_NAMES, beside NUM_CLASSES, in
OUTPUT_DIR/config.yaml) and in every checkpoint it saves (a top-level "class_names" field, written
by `CondInstCheckpointer`). Every consumer (the demo, `condinst_d2.Predictor`, `train_net.py
--eval-only`, exporters) asks `get_class_names` and, before building a model for inference, applies
`inference_config`, so that a checkpoint brings its own number of classes and their names.
"""

import logging
from typing import Any, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

from .checkpoint.efficientnet_lite0 import IMAGENET_URI

__all__ = [
    "CHECKPOINT_FIELD",
    "checkpoint_class_names",
    "get_class_names",
    "inference_config",
    "is_backbone_init",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FIELD = "class_names"  # the checkpoint's top-level field that holds them
# MODEL.WEIGHTS of the training configs: the ImageNet backbones that training starts from.
_BACKBONE_INITS = ("detectron2://ImageNetPretrained/", IMAGENET_URI)


def is_backbone_init(weights: str) -> bool:
    """Whether MODEL.WEIGHTS `weights` is an ImageNet backbone (a training config's), not a
    CondInst model. Such files hold no class names; the paper's configs' are downloads."""
    return weights.startswith(_BACKBONE_INITS)


def checkpoint_class_names(checkpoint: Any) -> Optional[List[str]]:
    """The class names recorded in a checkpoint: a loaded dict, or a path / URL to read.

    Returns None for a checkpoint without them (the authors' files), an empty path, an ImageNet
    backbone (not read), or a file that cannot be read (loading it as weights reports why).
    """
    if isinstance(checkpoint, str):
        usable = checkpoint and not is_backbone_init(checkpoint)
        checkpoint = _read_checkpoint(checkpoint) if usable else None
    names = checkpoint.get(CHECKPOINT_FIELD) if isinstance(checkpoint, dict) else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


def _read_checkpoint(path: str) -> Optional[Any]:
    """The object saved in `path` (memory-mapped when it can be), or None if it cannot be read."""
    try:
        local = PathManager.get_local_path(path)
    except Exception:  # each path handler (http, detectron2://, ...) raises its own types
        return None
    for mmap in (True, False):  # files in the legacy (non-zip) format cannot be memory-mapped
        try:
            return torch.load(local, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception:  # torch, zipfile and pickle raise many unrelated types
            continue
    return None


def _dataset_class_names(cfg: CfgNode) -> Optional[List[str]]:
    """thing_classes of the first of DATASETS.TEST / TRAIN registered with NUM_CLASSES of them."""
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names is not None and len(names) == cfg.MODEL.FCOS.NUM_CLASSES:
            return list(names)
    return None


def get_class_names(cfg: CfgNode, read_checkpoint: bool = True) -> Optional[List[str]]:
    """The names of the model's classes, in class-index order (`pred_classes` indexes them).

    Looked up in this order: MODEL.FCOS.CLASS_NAMES; the checkpoint MODEL.WEIGHTS (when
    `read_checkpoint`); the metadata of the config's datasets (e.g. COCO's for the paper's configs).

    Returns:
        NUM_CLASSES names, or None when none is known.

    Raises:
        ValueError: MODEL.FCOS.CLASS_NAMES has another length than MODEL.FCOS.NUM_CLASSES.
    """
    names = list(cfg.MODEL.FCOS.CLASS_NAMES)
    if names and len(names) != cfg.MODEL.FCOS.NUM_CLASSES:
        raise ValueError(
            f"MODEL.FCOS.CLASS_NAMES has {len(names)} names but MODEL.FCOS.NUM_CLASSES is "
            f"{cfg.MODEL.FCOS.NUM_CLASSES}: give one name per class"
        )
    if not names and read_checkpoint:
        names = checkpoint_class_names(cfg.MODEL.WEIGHTS) or []
    return names or _dataset_class_names(cfg)


def inference_config(cfg: CfgNode) -> CfgNode:
    """`cfg` for a model that predicts with MODEL.WEIGHTS: its classes taken from the checkpoint.

    A checkpoint saved by condinst_d2 records its class names; when the config names none, they
    and their number (MODEL.FCOS.NUM_CLASSES) come from the checkpoint, so that e.g. the
    quick-start's YAML works with the quick-start's weights. Returns a copy, frozen as `cfg` was.

    Raises:
        ValueError: the config names other classes than the checkpoint (a dataset evaluated or a
            config written for another model).
    """
    recorded = checkpoint_class_names(cfg.MODEL.WEIGHTS)
    configured = list(cfg.MODEL.FCOS.CLASS_NAMES)
    if recorded is None or configured == recorded:
        return cfg
    if configured:
        raise ValueError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} was trained on the classes {_short(recorded)}, "
            f"but the config or dataset has {_short(configured)}: use the model's config "
            f"(OUTPUT_DIR/config.yaml) or a dataset with its classes, in its order"
        )
    if cfg.MODEL.FCOS.NUM_CLASSES != len(recorded):
        logger.info(
            "MODEL.FCOS.NUM_CLASSES %d -> %d, the classes of %s",
            cfg.MODEL.FCOS.NUM_CLASSES,
            len(recorded),
            cfg.MODEL.WEIGHTS,
        )
    cfg = cfg.clone()
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.FCOS.NUM_CLASSES = len(recorded)
    cfg.MODEL.FCOS.CLASS_NAMES = recorded
    if was_frozen:
        cfg.freeze()
    return cfg


def _short(names: Sequence[str]) -> str:
    """`names` for a one-line message: the first ten, and how many there are."""
    shown = ", ".join(names[:10])
    return f"[{shown}{', ...' if len(names) > 10 else ''}] ({len(names)})"
