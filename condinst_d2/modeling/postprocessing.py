"""From network outputs on the padded batch to detections at each input's original size.

Shape shorthand: D: detections of one image, Hp x Wp: padded batch size, hm x wm: mask size
(Hp / f, f = MASK_OUT_STRIDE), h x w: the image's size in the batch, H x W: requested output size.

The authors' mask postprocessing is: `aligned_bilinear` by f to the padded size, crop (h, w),
bilinear resize (align_corners=False) to (H, W), threshold. Each step is separable and linear
with non-negative weights summing to 1, so every output pixel is a convex combination of (at most)
4 x 4 mask pixels: `Taps` holds those rows/columns and weights, computed once per image. An
output pixel can only exceed the threshold if one of its mask pixels does, so each mask is
evaluated only over the output rows and columns that reach its above-threshold pixels; the rest
is False. Same values as the step-by-step computation up to float rounding, without any
full-resolution float mask.
"""

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Instances

from .layers import aligned_bilinear

__all__ = [
    "Taps",
    "paste_masks",
    "paste_masks_by_steps",
    "paste_one_mask",
    "paste_taps",
    "postprocess",
    "rescale_detections",
]


class Taps(NamedTuple):
    """Per output row (or column): 4 mask indices (n, 4) and their weights (n, 4)."""

    index: torch.Tensor
    weight: torch.Tensor


def _lerp_taps(src: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps of fractional source positions `src` (n,) on an axis of `size` samples."""
    i0 = src.floor().long().clamp(max=size - 1)
    i1 = (i0 + 1).clamp(max=size - 1)
    frac = (src - i0).clamp(min=0, max=1)
    return i0, i1, frac


def _axis_taps(mask_len: int, factor: int, image_len: int, output_len: int, device) -> Taps:
    """The 4 mask samples behind each output row of the aligned-upsample / crop / resize chain."""
    # Resize image_len -> output_len, align_corners=False (as F.interpolate).
    out = torch.arange(output_len, dtype=torch.float64, device=device)
    src = ((out + 0.5) * (image_len / output_len) - 0.5).clamp(min=0)
    r0, r1, fr = _lerp_taps(src, image_len)

    # aligned_bilinear: image row i samples mask position max(i - factor // 2, 0) / factor,
    # the mask being replicate-padded at the end.
    def mask_taps(rows):
        return _lerp_taps((rows - factor // 2).clamp(min=0).double() / factor, mask_len)

    a0, a1, fa = mask_taps(r0)
    b0, b1, fb = mask_taps(r1)
    index = torch.stack([a0, a1, b0, b1], dim=1)
    weight = torch.stack([(1 - fr) * (1 - fa), (1 - fr) * fa, fr * (1 - fb), fr * fb], dim=1)
    return Taps(index, weight.float())


def _reach(taps: Taps, above: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[start, stop), as 0-d tensors, of the output positions whose taps (with weight > 0) touch
    a mask row (or column) where `above` (mask_len,) holds; (0, 0) when none does. Tensor ops
    only, so that a traced graph keeps them dynamic."""
    touches = (above[taps.index] & (taps.weight > 0)).any(dim=1)
    positions = torch.arange(touches.shape[0], device=touches.device)  # shape: dynamic in a trace
    stop = torch.where(touches, positions + 1, 0).max()
    return torch.where(touches, positions, stop).min(), stop


def _within(taps: Taps, start: torch.Tensor, stop: torch.Tensor) -> Taps:
    """The taps of output positions [start, stop)."""
    positions = torch.arange(start, stop, device=taps.index.device)
    return Taps(taps.index[positions], taps.weight[positions])


# Output pixels evaluated at once: bounds the temporary floats (x 4 taps) of one large mask.
_BLOCK_PIXELS = 1 << 20


def _evaluate(
    probs: torch.Tensor, rows: Taps, cols: Taps, threshold: float, blocks: bool = True
) -> torch.Tensor:
    """Thresholded output (n_rows, n_cols) of one (hm, wm) mask at the given rows and columns,
    computed in blocks of rows (or at once: `blocks` False, for a traced graph)."""
    row_mix = (probs[rows.index] * rows.weight[:, :, None]).sum(dim=1)  # (n_rows, wm)
    if not blocks:
        return (row_mix[:, cols.index] * cols.weight[None]).sum(dim=2) > threshold
    step = max(1, _BLOCK_PIXELS // len(cols.index))
    return torch.cat(
        [
            (row_mix[i : i + step, cols.index] * cols.weight[None]).sum(dim=2) > threshold
            for i in range(0, len(row_mix), step)
        ]
    )


def _upsample_factor(mask_probs: torch.Tensor, padded_size: Tuple[int, int]) -> int:
    """f such that (hm, wm) masks tile the padded canvas as (f*hm, f*wm)."""
    hm, wm = mask_probs.shape[2:]
    factor = padded_size[0] // hm
    if factor * hm != padded_size[0] or factor * wm != padded_size[1]:
        raise ValueError(f"masks of size {(hm, wm)} do not tile {tuple(padded_size)}")
    return factor


def paste_masks_by_steps(
    mask_probs: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """The authors' mask postprocessing, one full-resolution step after another: (D, 1, hm, wm)
    probabilities on the padded canvas -> `aligned_bilinear` to (D, 1, Hp, Wp) -> crop to the
    image's (h, w) -> bilinear resize (align_corners=False) to (H, W) -> threshold -> (D, H, W)
    bool.

    The reference that `paste_masks` is tested against. It holds D float masks of the padded and
    of the output size at once (`paste_masks` holds none), but is a few standard tensor ops, as
    an exported graph needs.
    """
    factor = _upsample_factor(mask_probs, padded_size)
    up = aligned_bilinear(mask_probs, factor)[:, :, : image_size[0], : image_size[1]]
    resized = F.interpolate(up, size=tuple(output_size), mode="bilinear", align_corners=False)
    return resized[:, 0] > threshold


def paste_masks(
    mask_probs: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """(D, 1, hm, wm) probabilities on the padded canvas -> (D, H, W) bool masks, as
    `paste_masks_by_steps` (up to float rounding) but evaluating only where a mask can be on."""
    factor = _upsample_factor(mask_probs, padded_size)
    out = torch.zeros((len(mask_probs), *output_size), dtype=torch.bool, device=mask_probs.device)
    if len(mask_probs) == 0:
        return out
    rows, cols = paste_taps(
        mask_probs.shape[2:], factor, image_size, output_size, mask_probs.device
    )
    above = mask_probs[:, 0] > threshold
    for d in torch.nonzero(above.flatten(1).any(dim=1)).squeeze(1).tolist():
        y0, y1 = _reach(rows, above[d].any(dim=1))
        x0, x1 = _reach(cols, above[d].any(dim=0))
        if y1 > y0 and x1 > x0:
            region_rows, region_cols = _within(rows, y0, y1), _within(cols, x0, x1)
            out[d, y0:y1, x0:x1] = _evaluate(mask_probs[d, 0], region_rows, region_cols, threshold)
    return out


def paste_taps(
    mask_size: Tuple, factor: int, image_size: Tuple, output_size: Tuple, device
) -> Tuple[Taps, Taps]:
    """The taps of every output row and of every output column: one image's, shared by all its
    (hm, wm) = `mask_size` masks. Sizes may be 0-d tensors (a trace keeps them dynamic)."""
    return (
        _axis_taps(mask_size[0], factor, image_size[0], output_size[0], device),
        _axis_taps(mask_size[1], factor, image_size[1], output_size[1], device),
    )


def paste_one_mask(
    probs: torch.Tensor,
    rows: Taps,
    cols: Taps,
    output_size: Tuple[torch.Tensor, torch.Tensor],
    threshold: float = 0.5,
) -> torch.Tensor:
    """`paste_masks` of one (hm, wm) mask -> (H, W) bool, given the image's `paste_taps`, in
    tensor ops only: sizes may be 0-d tensors, and a traced graph keeps them dynamic (the ONNX
    export). The mask is evaluated over the region it can be on, and zero-padded to (H, W)."""
    above = probs > threshold
    y0, y1 = _reach(rows, above.any(dim=1))
    x0, x1 = _reach(cols, above.any(dim=0))
    region = _evaluate(probs, _within(rows, y0, y1), _within(cols, x0, x1), threshold, False)
    return F.pad(region, (x0, output_size[1] - x1, y0, output_size[0] - y1))


def rescale_detections(
    detections: Instances, output_height: int, output_width: int
) -> Tuple[Instances, torch.Tensor]:
    """One image's detections with boxes scaled to (output_height, output_width), clipped, and
    empty boxes dropped.

    Args:
        detections: D detections with image_size (h, w), pred_boxes, scores, pred_classes.
    Returns:
        Instances of size (H, W) with pred_boxes, scores and pred_classes of the D' kept, and
        the (D,) bool mask of the kept detections.
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
    return result, keep


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
    result, keep = rescale_detections(detections, output_height, output_width)
    result.pred_masks = paste_masks(
        mask_probs[keep],
        padded_size,
        detections.image_size,
        (output_height, output_width),
        mask_threshold,
    )
    return result
