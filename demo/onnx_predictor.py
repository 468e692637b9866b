"""The demo's predictor for an exported ONNX model: `BatchPredictor`'s interface on top of the
torch-free runtime `condinst_onnx.CondInstOnnx` (which resizes and orders channels as the
exported config says)."""

from typing import List, Sequence

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

from condinst_onnx import CondInstOnnx

__all__ = ["OnnxPredictor"]


class OnnxPredictor:
    """Predicts instances on BGR images with an ONNX file, keeping those scoring >= threshold."""

    def __init__(self, path: str, score_threshold: float = 0.0):
        """
        Args:
            path: an .onnx file written by tools/export_onnx.py.
            score_threshold: detections scoring below it are dropped from the outputs.
        """
        self.runtime = CondInstOnnx(path)
        self.score_threshold = score_threshold

    def __call__(self, bgr_images: Sequence[np.ndarray]) -> List[Instances]:
        """As `BatchPredictor.__call__`: one Instances per (H, W, 3) uint8 BGR image, at its
        size, with pred_boxes, scores, pred_classes and pred_masks (D, H, W) bool."""
        results = []
        for image in bgr_images:
            boxes, scores, classes, masks = self.runtime(image)
            keep = scores >= self.score_threshold
            results.append(
                Instances(
                    image.shape[:2],
                    pred_boxes=Boxes(torch.from_numpy(boxes[keep])),
                    scores=torch.from_numpy(scores[keep]),
                    pred_classes=torch.from_numpy(classes[keep]),
                    pred_masks=torch.from_numpy(masks[keep]),
                )
            )
        return results
