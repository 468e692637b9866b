"""BoxInst (Tian, Zhang, Chen, Shen, CVPR 2021): CondInst's masks learned from GT boxes alone.

Two losses replace CondInst's dice loss against GT masks: a projection loss (the mask's max along
x and along y must match the box's) and a pairwise loss (neighbouring pixels of similar colour,
inside the box, should get the same label). Both are pure functions below; `BoxInstLoss` builds
their targets from what the data mapper gives (boxes, the un-normalised image) and applies them.

Shape shorthand: N: images, G: GTs of the batch, R: instances, Hp x Wp: padded batch size,
h x w = Hp/s x Wp/s: mask resolution (s = MASK_OUT_STRIDE), E = K*K - 1: neighbours of a pixel in a
K x K window (centre excluded).
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n

from .dynamic_mask_head import dice_loss

__all__ = [
    "BoxInstLoss",
    "box_bitmasks",
    "neighbours",
    "neighbour_offsets",
    "rgb_to_lab",
    "color_similarity",
    "projection_loss",
    "pairwise_loss",
    "warmup_factor",
]

# sRGB (D65) -> XYZ and the D65 white point (2 degree observer), as scikit-image's rgb2lab.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def box_bitmasks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (G, height, width) uint8 masks of G xyxy boxes: ones at rows int(y0) .. int(y1 + 1) - 1
    and columns int(x0) .. int(x1 + 1) - 1 (int truncates), as the authors fill them."""
    start = boxes[:, :2].trunc()  # (G, 2) x0, y0
    stop = (boxes[:, 2:] + 1).trunc()  # (G, 2) x1 + 1, y1 + 1
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    rows = (ys >= start[:, 1:2]) & (ys < stop[:, 1:2])  # (G, height)
    cols = (xs >= start[:, 0:1]) & (xs < stop[:, 0:1])  # (G, width)
    return (rows[:, :, None] & cols[:, None, :]).to(torch.uint8)


def neighbours(x: torch.Tensor, size: int, dilation: int) -> torch.Tensor:
    """The E neighbours of every pixel of (N, C, H, W) in a `size` x `size` window of the given
    dilation, zero outside the map, in row-major window order without the centre: (N, C, E, H, W).
    """
    if size % 2 != 1:
        raise ValueError(f"MODEL.BOXINST.PAIRWISE.SIZE must be odd, got {size}")
    n, c, h, w = x.shape
    unfolded = F.unfold(x, kernel_size=size, padding=dilation * (size - 1) // 2, dilation=dilation)
    unfolded = unfolded.reshape(n, c, size * size, h, w)
    centre = size * size // 2
    return torch.cat([unfolded[:, :, :centre], unfolded[:, :, centre + 1 :]], dim=2)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65, 2 degree observer) of a (3, H, W) uint8 sRGB image, as float32 (3, H, W).

    scikit-image's `rgb2lab` formula, computed in float64 like it, then cast to float32.
    """
    c = rgb.to(torch.float64) / 255.0
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=torch.float64, device=rgb.device)
    xyz = torch.einsum("ij,jhw->ihw", matrix, linear) / white[:, None, None]
    f = torch.where(xyz > 0.008856, xyz ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    lab = torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])
    return lab.to(torch.float32)


def color_similarity(
    lab: torch.Tensor, valid: torch.Tensor, size: int, dilation: int
) -> torch.Tensor:
    """exp(-||lab(p) - lab(q)|| / 2) * valid(q) for every pixel p of one image and each of its E
    neighbours q (0 for neighbours outside the map).

    Args:
        lab: (3, h, w) colours; valid: (h, w) 1 where a pixel may be a neighbour, else 0.
    Returns:
        (E, h, w).
    """
    diff = lab[None, :, None] - neighbours(lab[None], size, dilation)  # (1, 3, E, h, w)
    similarity = torch.exp(-torch.norm(diff, dim=1) * 0.5)[0]
    return similarity * neighbours(valid[None, None].to(lab.dtype), size, dilation)[0, 0]


def projection_loss(scores: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """Mean over R instances of dice(max over rows) + dice(max over columns) between the mask
    probabilities and the box masks, both (R, 1, h, w)."""
    along_x = dice_loss(scores.max(dim=2).values, box_masks.max(dim=2).values)
    along_y = dice_loss(scores.max(dim=3).values, box_masks.max(dim=3).values)
    return (along_x + along_y).mean()


def neighbour_offsets(size: int, dilation: int) -> List[Tuple[int, int]]:
    """The (dy, dx) of the E neighbours in `neighbours`' order: the dilated `size` x `size`
    window, row-major, without its centre."""
    radius = size // 2
    window = [
        (dilation * (i - radius), dilation * (j - radius)) for i in range(size) for j in range(size)
    ]
    return window[: len(window) // 2] + window[len(window) // 2 + 1 :]


def pairwise_loss(
    logits: torch.Tensor, supervised: torch.Tensor, size: int, dilation: int
) -> torch.Tensor:
    """Mean over the supervised pairs of -log P(p and q get the same label) =
    -log(sigma(l_p) sigma(l_q) + sigma(-l_p) sigma(-l_q)), computed in log space; 0 without any.

    A pair is a pixel p and its neighbour q = p + offset_e (`neighbour_offsets`). Only the
    supervised pairs are evaluated (the authors evaluate all and weight them by 0 or 1: same sum,
    a few times the work). A neighbour outside the map has zero log-probabilities (the authors'
    zero-padded unfold), so such a pair costs 0 but counts.

    Args:
        logits: (R, 1, h, w) mask logits.
        supervised: (R, E, h, w) bool, the pairs to count.
    Returns:
        A scalar.
    """
    _, _, h, w = logits.shape
    r, e, y, x = supervised.nonzero(as_tuple=True)
    if len(r) == 0:
        return logits.sum() * 0.0
    offsets = torch.tensor(neighbour_offsets(size, dilation), device=logits.device)  # (E, 2)
    qy, qx = y + offsets[e, 0], x + offsets[e, 1]
    inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
    p = (r * h + y) * w + x
    q = (r * h + qy.clamp(0, h - 1)) * w + qx.clamp(0, w - 1)
    log_fg, log_bg = F.logsigmoid(logits).flatten(), F.logsigmoid(-logits).flatten()
    zero = log_fg.new_zeros(())
    same_fg = log_fg[p] + torch.where(inside, log_fg[q], zero)
    same_bg = log_bg[p] + torch.where(inside, log_bg[q], zero)
    return -torch.logaddexp(same_fg, same_bg).sum() / len(r)


def warmup_factor(iteration: Optional[int], warmup_iters: int) -> float:
    """The pairwise loss's weight at 0-based training step `iteration`: (iteration + 1) /
    warmup_iters, at most 1 (the authors count the calls, this one included). 1 without warm-up
    (warmup_iters <= 0) or without an iteration (None: outside a trainer)."""
    if iteration is None or warmup_iters <= 0:
        return 1.0
    return min((iteration + 1) / float(warmup_iters), 1.0)


def _training_iteration() -> Optional[int]:
    """The trainer's current (0-based) iteration from Detectron2's event storage, None outside
    one (a bare model call)."""
    try:
        return get_event_storage().iter
    except AssertionError:  # get_event_storage's way of saying there is none
        log_first_n(
            logging.WARNING,
            "BoxInst losses computed outside a trainer (no EventStorage): the pairwise loss "
            "gets its full weight (no warm-up)",
            n=1,
        )
        return None


class BoxInstLoss:
    """BoxInst's mask supervision: targets from the GT boxes and the input images, and the
    `loss_prj` / `loss_pairwise` losses. Plain object (no parameters, no state)."""

    names = ("loss_prj", "loss_pairwise")

    def __init__(
        self,
        *,
        mask_out_stride: int,
        input_format: str,
        bottom_pixels_removed: float,
        pairwise_size: int,
        pairwise_dilation: int,
        color_thresh: float,
        warmup_iters: int,
    ):
        """
        Args:
            mask_out_stride: s, the stride of the mask logits the losses compare.
            input_format: INPUT.FORMAT of the images ("BGR" or "RGB").
            bottom_pixels_removed: at the input's "height", rows at the bottom of each image
                that are never anyone's neighbour in the pairwise loss (<= 0: none).
            pairwise_size, pairwise_dilation: K and D of the neighbourhood.
            color_thresh: pairs of colour similarity >= this are supervised.
            warmup_iters: iterations of the pairwise loss's linear warm-up.
        """
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"BoxInst needs INPUT.FORMAT 'BGR' or 'RGB', got {input_format!r}")
        if pairwise_size % 2 != 1:
            raise ValueError(f"MODEL.BOXINST.PAIRWISE.SIZE must be odd, got {pairwise_size}")
        self.mask_out_stride = mask_out_stride
        self.to_rgb = [2, 1, 0] if input_format == "BGR" else [0, 1, 2]
        self.bottom_pixels_removed = bottom_pixels_removed
        self.pairwise_size = pairwise_size
        self.pairwise_dilation = pairwise_dilation
        self.color_thresh = color_thresh
        self.warmup_iters = warmup_iters

    @classmethod
    def from_config(cls, cfg) -> "BoxInstLoss":
        box = cfg.MODEL.BOXINST
        return cls(
            mask_out_stride=cfg.MODEL.CONDINST.MASK_OUT_STRIDE,
            input_format=cfg.INPUT.FORMAT,
            bottom_pixels_removed=box.BOTTOM_PIXELS_REMOVED,
            pairwise_size=box.PAIRWISE.SIZE,
            pairwise_dilation=box.PAIRWISE.DILATION,
            color_thresh=box.PAIRWISE.COLOR_THRESH,
            warmup_iters=box.PAIRWISE.WARMUP_ITERS,
        )

    def add_targets(
        self, gt_instances: List[Instances], batched_inputs: List[Dict], padded_size: Sequence[int]
    ) -> None:
        """Adds to each image's GTs gt_bitmasks_full (G, Hp, Wp) uint8 box masks on the padded
        canvas, gt_bitmasks (G, h, w) sampled from them at [s//2::s], and the image's
        image_color_similarity (E, h, w) (stored with its GTs; every GT of an image shares it)."""
        s = self.mask_out_stride
        for gt, inputs in zip(gt_instances, batched_inputs):
            device = gt.gt_boxes.device
            full = box_bitmasks(gt.gt_boxes.tensor, *padded_size).to(device)
            gt.gt_bitmasks_full = full
            gt.gt_bitmasks = full[:, s // 2 :: s, s // 2 :: s]
            lab, valid = self.image_lab(inputs, padded_size, device)
            gt.image_color_similarity = color_similarity(
                lab, valid, self.pairwise_size, self.pairwise_dilation
            )[None].expand(len(gt), -1, -1, -1)

    def image_lab(
        self, inputs: Dict, padded_size: Sequence[int], device: torch.device
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One input's colours (3, h, w) in LAB and validity (h, w) at the mask resolution.

        The un-normalised image, zero-padded to `padded_size`, is average-pooled over s x s,
        truncated to uint8 and converted to LAB; the validity mask (0 in the padding and in the
        BOTTOM_PIXELS_REMOVED rows) is sampled at [s//2::s].
        """
        s = self.mask_out_stride
        image = inputs["image"].to(device=device, dtype=torch.float32)
        h, w = image.shape[-2:]
        pad = (0, padded_size[1] - w, 0, padded_size[0] - h)
        pooled = F.avg_pool2d(F.pad(image, pad)[None], kernel_size=s, stride=s)[0]
        lab = rgb_to_lab(pooled[self.to_rgb].to(torch.uint8))
        valid = torch.ones((h, w), dtype=torch.float32, device=device)
        removed = int(self.bottom_pixels_removed * float(h) / float(inputs.get("height", h)))
        if removed > 0:
            valid[-removed:, :] = 0
        valid = F.pad(valid, pad)[s // 2 :: s, s // 2 :: s]
        return lab, valid

    def __call__(
        self, mask_logits: torch.Tensor, instances: Instances, gt_instances: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            mask_logits: (R, 1, h, w) logits of R > 0 instances.
            instances: with gt_inds into the batch's concatenated GTs.
            gt_instances: each image's GTs, after `add_targets`.
        Returns:
            loss_prj and loss_pairwise (the latter times the warm-up factor).
        """
        box_masks = torch.cat([gt.gt_bitmasks for gt in gt_instances])[instances.gt_inds]
        box_masks = box_masks[:, None].to(mask_logits.dtype)  # (R, 1, h, w)
        similar = torch.cat([gt.image_color_similarity >= self.color_thresh for gt in gt_instances])
        supervised = similar[instances.gt_inds] & (box_masks > 0)  # (R, E, h, w)
        pairwise = pairwise_loss(
            mask_logits, supervised, self.pairwise_size, self.pairwise_dilation
        )
        factor = warmup_factor(_training_iteration(), self.warmup_iters)
        return {
            "loss_prj": projection_loss(mask_logits.sigmoid(), box_masks),
            "loss_pairwise": pairwise * factor,
        }
