"""From network outputs on the padded batch to detections at each input's original size.

Shape shorthand: D: detections of one image, Hp x Wp: padded batch size, hm x wm: mask size
(Hp / MASK_OUT_STRIDE), h x w: the image's size in the batch, H x W: requested output size.
"""
import torch
import torch.nn.functional as F
from detectron2.structures import Instances

from .layers import aligned_bilinear

__all__ = ["postprocess"]

# Instances whose masks are resized together; bounds the memory of the full-resolution floats.
MASK_CHUNK = 16


def paste_masks(
    mask_probs: torch.Tensor,
    padded_size: tuple,
    image_size: tuple,
    output_size: tuple,
    threshold: float = 0.5,
) -> torch.Tensor:
    """(D, 1, hm, wm) probabilities on the padded canvas -> (D, H, W) bool masks.

    Upsamples to the padded size with `aligned_bilinear`, crops the image's own (h, w), resizes
    bilinearly (align_corners=False) to the output size and thresholds. Works on MASK_CHUNK
    instances at a time, so no float mask of every instance exists at full resolution at once.
    """
    factor = padded_size[0] // mask_probs.shape[2]
    if factor * mask_probs.shape[2] != padded_size[0] or factor * mask_probs.shape[3] != padded_size[1]:
        raise ValueError(f"masks of size {tuple(mask_probs.shape[2:])} do not tile {tuple(padded_size)}")
    out = torch.empty((len(mask_probs), *output_size), dtype=torch.bool, device=mask_probs.device)
    for start in range(0, len(mask_probs), MASK_CHUNK):
        chunk = aligned_bilinear(mask_probs[start : start + MASK_CHUNK], factor)
        chunk = chunk[:, :, : image_size[0], : image_size[1]]
        chunk = F.interpolate(chunk, size=output_size, mode="bilinear", align_corners=False)
        out[start : start + MASK_CHUNK] = chunk[:, 0] > threshold
    return out


def postprocess(
    detections: Instances,
    mask_probs: torch.Tensor,
    padded_size: tuple,
    output_height: int,
    output_width: int,
    mask_threshold: float = 0.5,
) -> Instances:
    """Rescales one image's detections to (output_height, output_width).

    Args:
        detections: D detections with image_size (h, w), pred_boxes, scores, pred_classes.
        mask_probs: (D, 1, hm, wm) mask probabilities on the padded canvas.
    Returns:
        Instances of size (H, W) with pred_boxes (scaled, clipped; empty boxes dropped), scores,
        pred_classes and pred_masks (D', H, W) bool.
    """
    image_size = detections.image_size
    boxes = detections.pred_boxes.clone()
    boxes.scale(output_width / image_size[1], output_height / image_size[0])
    boxes.clip((output_height, output_width))
    keep = boxes.nonempty()
    result = Instances((output_height, output_width))
    result.pred_boxes = boxes[keep]
    result.scores = detections.scores[keep]
    result.pred_classes = detections.pred_classes[keep]
    result.pred_masks = paste_masks(
        mask_probs[keep], padded_size, image_size, (output_height, output_width), mask_threshold
    )
    return result
