"""How far an exported model's detections are from PyTorch's on the same input."""

from typing import Dict, Sequence

import numpy as np
from detectron2.structures import Instances

__all__ = ["detection_differences"]

# Scores closer than this count as tied: float rounding (ONNX Runtime's convolutions vs
# PyTorch's, ~1e-5) may order two such detections either way.
TIE_TOLERANCE = 1e-4


def _mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(D,) IoU of paired (D, H, W) bool masks; two empty masks agree fully (IoU 1)."""
    inter = (a & b).reshape(len(a), -1).sum(axis=1)
    union = (a | b).reshape(len(a), -1).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _pair(boxes, scores, classes, ref_boxes, ref_scores, ref_classes) -> np.ndarray:
    """For each of our D detections, the index of its reference detection (-1: none): the same
    class, a score within TIE_TOLERANCE and, among those left, the closest box."""
    taken = np.zeros(len(ref_scores), bool)
    pairs = np.full(len(scores), -1)
    for i in range(len(scores)):
        fits = (ref_classes == classes[i]) & (np.abs(ref_scores - scores[i]) <= TIE_TOLERANCE)
        candidates = np.nonzero(fits & ~taken)[0]
        if len(candidates):
            distance = np.abs(ref_boxes[candidates] - boxes[i]).max(axis=1)
            pairs[i] = candidates[np.argmin(distance)]
            taken[pairs[i]] = True
    return pairs


def detection_differences(onnx_outputs: Sequence[np.ndarray], reference: Instances) -> Dict:
    """Largest differences between ONNX Runtime's (boxes, scores, classes, masks) and PyTorch's
    Instances (pred_boxes, scores, pred_classes, pred_masks) of one image.

    Detections are paired as `_pair` says, so that two near-tied scores listed in the other
    order still compare with each other.

    Returns:
        count / count_torch; classes_equal (every detection paired: same classes);
        reordered (detections not at their reference's position); when classes_equal:
        max_box_diff (px), max_score_diff, min_mask_iou and mask_agreement (fraction of equal
        mask pixels).
    """
    boxes, scores, classes, masks = onnx_outputs
    ref = reference.to("cpu")
    ref_boxes, ref_scores = ref.pred_boxes.tensor.numpy(), ref.scores.numpy()
    out = {"count": len(scores), "count_torch": len(ref), "classes_equal": False}
    if len(scores) != len(ref):
        return out
    pairs = _pair(boxes, scores, classes, ref_boxes, ref_scores, ref.pred_classes.numpy())
    out["classes_equal"] = bool((pairs >= 0).all())
    out["reordered"] = int((pairs != np.arange(len(pairs))).sum())
    if not out["classes_equal"]:
        return out
    if len(ref) == 0:
        return {
            **out,
            "max_box_diff": 0.0,
            "max_score_diff": 0.0,
            "min_mask_iou": 1.0,
            "mask_agreement": 1.0,
        }
    ref_masks = ref.pred_masks.numpy()[pairs]
    out["max_box_diff"] = float(np.abs(boxes - ref_boxes[pairs]).max())
    out["max_score_diff"] = float(np.abs(scores - ref_scores[pairs]).max())
    out["min_mask_iou"] = float(_mask_ious(masks, ref_masks).min())
    out["mask_agreement"] = float((masks == ref_masks).mean())
    return out
