"""A batched predictor for the demo: Detectron2's test-time preprocessing, then one model call.

`DefaultPredictor` takes one image per call; videos with `--batch-size` need several, so this
predictor builds the model itself, applies the same resizing (INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST)
and channel order (INPUT.FORMAT), and hands the model a list of images that may differ in size.
"""

from typing import List, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from condinst_d2.checkpoint import CondInstCheckpointer

__all__ = ["BatchPredictor"]


class BatchPredictor:
    """Predicts instances on BGR images, a batch at a time, keeping those scoring >= threshold."""

    def __init__(self, cfg: CfgNode, score_threshold: float = 0.0):
        """
        Args:
            cfg: a CondInst config; MODEL.WEIGHTS is loaded when set (random weights otherwise).
            score_threshold: detections scoring below it are dropped from the outputs.
        """
        self.model = build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            CondInstCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        # Detectron2's convention: MIN_SIZE_TEST 0 disables test-time resizing.
        self.resize = T.ResizeShortestEdge([min_size, min_size], max_size) if min_size > 0 else None
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {cfg.INPUT.FORMAT!r}")
        self.input_format = cfg.INPUT.FORMAT
        self.score_threshold = score_threshold

    def model_input(self, bgr_image: np.ndarray) -> dict:
        """One (H, W, 3) uint8 BGR image -> the model's input dict, output size (H, W)."""
        image = bgr_image[:, :, ::-1] if self.input_format == "RGB" else bgr_image
        height, width = image.shape[:2]
        if self.resize is not None:
            image = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, bgr_images: Sequence[np.ndarray]) -> List[Instances]:
        """Predicts on (H, W, 3) uint8 BGR images of any sizes.

        Returns:
            One Instances per image, on the CPU, at the image's size: pred_boxes, scores,
            pred_classes and pred_masks (D, H, W) bool.
        """
        outputs = self.model([self.model_input(image) for image in bgr_images])
        results = []
        for output in outputs:
            instances = output["instances"].to("cpu")
            results.append(instances[instances.scores >= self.score_threshold])
        return results
