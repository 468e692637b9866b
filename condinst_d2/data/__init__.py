"""Datasets: COCO-format registration from files, the generated quick-start dataset, and the
image reader of the whole project (`read_image`)."""

from .coco import drop_masks, register_coco_dataset
from .dataset_mapper import CondInstDatasetMapper, read_image
from .synthetic import SHAPE_CLASSES, render_scene, write_coco_split

__all__ = [
    "CondInstDatasetMapper",
    "drop_masks",
    "read_image",
    "register_coco_dataset",
    "SHAPE_CLASSES",
    "render_scene",
    "write_coco_split",
]
