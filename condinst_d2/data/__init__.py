"""Datasets: COCO-format registration from files, and the generated quick-start dataset."""
from .coco import register_coco_dataset
from .synthetic import SHAPE_CLASSES, render_scene, write_coco_split

__all__ = ["register_coco_dataset", "SHAPE_CLASSES", "render_scene", "write_coco_split"]
