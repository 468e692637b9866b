"""The demo's predictor: `condinst_d2.Predictor` on lists of BGR images (video batches).

`condinst_d2.Predictor` does the work (weights through CondInstCheckpointer, the model's class
names, Detectron2's test-time resizing and channel order); this keeps the demo's interface: a list
of images in, a list of `Instances` out, detections below the threshold dropped.
"""

from typing import List, Optional, Sequence

import numpy as np
from detectron2.config import CfgNode
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances

from condinst_d2 import Predictor

__all__ = ["BatchPredictor"]


class BatchPredictor:
    """Predicts instances on BGR images, a batch at a time, keeping those scoring >= threshold."""

    def __init__(self, cfg: CfgNode, score_threshold: float = 0.0):
        """
        Args:
            cfg: a CondInst config; MODEL.WEIGHTS is loaded when set (random weights otherwise).
            score_threshold: detections scoring below it are dropped from the outputs.
        """
        self.predictor = Predictor(cfg, score_threshold)

    @property
    def metadata(self) -> Metadata:
        """Metadata with the model's class names (`thing_classes`), for the visualizers."""
        return self.predictor.metadata

    @property
    def class_names(self) -> Optional[List[str]]:
        """The model's class names in class-index order, None when unknown."""
        return self.predictor.class_names

    def __call__(self, bgr_images: Sequence[np.ndarray]) -> List[Instances]:
        """Predicts on (H, W, 3) uint8 BGR images of any sizes.

        Returns:
            One Instances per image, on the CPU, at the image's size: pred_boxes, scores,
            pred_classes and pred_masks (D, H, W) bool.
        """
        return [p.instances for p in self.predictor.predict_batch(bgr_images)]
