"""CondInst's dynamic mask head: a tiny FCN whose weights are generated per instance.

Shape shorthand: N: images, Cm: mask feature channels, h x w: mask feature size (stride s),
R: instances, P: dynamic parameters per instance, Ch: hidden channels of the dynamic head,
f = s / MASK_OUT_STRIDE.
"""

from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Instances, PolygonMasks, polygons_to_bitmask
from torch import nn

from .fcos.targets import level_sizes_of_interest
from .layers import aligned_bilinear, compute_locations
from .mask_branch import MaskBranch

__all__ = [
    "DynamicMaskHead",
    "MaskLoss",
    "DiceMaskLoss",
    "parse_dynamic_params",
    "pack_dynamic_params",
    "dice_loss",
    "relative_coordinates",
]


def parse_dynamic_params(
    params: torch.Tensor, weight_nums: Sequence[int], bias_nums: Sequence[int]
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Splits (R, P) parameters into per-layer weights (R, out, in) and biases (R, out, 1).

    Layout along P: all layers' weights first (each row-major out x in), then all biases.
    """
    if params.dim() != 2 or params.shape[1] != sum(weight_nums) + sum(bias_nums):
        raise ValueError(
            f"expected (R, {sum(weight_nums) + sum(bias_nums)}) dynamic parameters, "
            f"got {tuple(params.shape)}"
        )
    num_layers = len(weight_nums)
    splits = torch.split(params, list(weight_nums) + list(bias_nums), dim=1)
    biases = [b.unsqueeze(2) for b in splits[num_layers:]]
    weights = [
        w.reshape(params.shape[0], b.shape[1], w.shape[1] // b.shape[1])
        for w, b in zip(splits[:num_layers], biases)
    ]
    return weights, biases


def pack_dynamic_params(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The inverse of `parse_dynamic_params`: per-layer weights (R, out, in) and biases (R, out)
    or (R, out, 1) -> (R, P) parameters, all weights (row-major) first, then all biases."""
    return torch.cat([w.flatten(1) for w in weights] + [b.flatten(1) for b in biases], dim=1)


def relative_coordinates(
    instance_locations: torch.Tensor, grid: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """((x_i - x) / s_i, (y_i - y) / s_i) of each of R instances over the (h*w, 2) grid.

    Args:
        instance_locations: (R, 2); grid: (h*w, 2); scales: (R,) normaliser per instance.
    Returns:
        (R, 2, h*w).
    """
    rel = instance_locations[:, None, :] - grid[None, :, :]  # (R, h*w, 2)
    return rel.permute(0, 2, 1) / scales[:, None, None]


def dice_loss(scores: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - 2*sum(p*t) / (sum(p^2) + sum(t^2) + eps) for each of R masks; inputs (R, ...)."""
    scores, targets = scores.flatten(1), targets.flatten(1)
    intersection = (scores * targets).sum(dim=1)
    union = (scores**2.0).sum(dim=1) + (targets**2.0).sum(dim=1) + eps
    return 1.0 - 2 * intersection / union


class MaskLoss(Protocol):
    """What supervises the mask head: CondInst's `DiceMaskLoss` (GT masks) or BoxInst's
    `BoxInstLoss` (GT boxes). `names` are the keys of the losses it returns."""

    names: Tuple[str, ...]

    def add_targets(
        self, gt_instances: List[Instances], batched_inputs: List[Dict], padded_size: Sequence[int]
    ) -> None:
        """Adds gt_bitmasks_full (G, Hp, Wp) on the padded canvas (FCOS's centre sampling and
        the semantic loss read it) and what the loss needs to each image's GTs."""

    def __call__(
        self, mask_logits: torch.Tensor, instances: Instances, gt_instances: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """The losses of R > 0 instances' (R, 1, h, w) mask logits (instances have gt_inds)."""


class DiceMaskLoss:
    """CondInst's mask supervision: dice loss against the GT masks (`loss_mask`)."""

    names = ("loss_mask",)

    def __init__(self, mask_out_stride: int):
        self.mask_out_stride = mask_out_stride

    def add_targets(
        self, gt_instances: List[Instances], batched_inputs: List[Dict], padded_size: Sequence[int]
    ) -> None:
        """Adds gt_bitmasks_full (G, Hp, Wp) uint8 (the GT masks on the padded canvas) and
        gt_bitmasks (G, Hp/s, Wp/s) sampled at [s//2::s], s = MASK_OUT_STRIDE."""
        stride = self.mask_out_stride
        h, w = padded_size
        for gt in gt_instances:
            if not gt.has("gt_masks"):
                if len(gt) > 0:
                    raise ValueError(
                        "CondInst needs gt_masks in training instances (set MODEL.MASK_ON)"
                    )
                # Detectron2's mapper leaves gt_masks out for an image without annotations.
                gt.gt_masks = PolygonMasks([])
            masks = gt.gt_masks
            if isinstance(masks, PolygonMasks):
                full = [polygons_to_bitmask(p, h, w) for p in masks.polygons]
                full = (
                    torch.from_numpy(np.stack(full))
                    if full
                    else torch.zeros((0, h, w), dtype=torch.bool)
                )
                full = full.to(device=gt.gt_boxes.device, dtype=torch.uint8)
            else:
                tensor = masks.tensor.to(torch.uint8)
                full = F.pad(tensor, (0, w - tensor.shape[2], 0, h - tensor.shape[1]))
            gt.gt_bitmasks_full = full
            gt.gt_bitmasks = full[:, stride // 2 :: stride, stride // 2 :: stride]

    def __call__(
        self, mask_logits: torch.Tensor, instances: Instances, gt_instances: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """Mean dice loss of the R instances against their GTs' gt_bitmasks."""
        scores = mask_logits.sigmoid()
        targets = torch.cat([gt.gt_bitmasks for gt in gt_instances])[instances.gt_inds]
        return {"loss_mask": dice_loss(scores, targets.unsqueeze(1).to(scores.dtype)).mean()}


class DynamicMaskHead(nn.Module):
    """Runs every instance's dynamic 1x1-conv FCN on its image's mask features (+ relative
    coordinates) as one batched matrix product. Has no parameters of its own."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        mask_feat_stride: int,
        channels: int,
        num_layers: int,
        mask_out_stride: int,
        sizes_of_interest: Sequence[float],
        disable_rel_coords: bool = False,
        mask_loss: Optional[MaskLoss] = None,
    ):
        """
        Args:
            in_channels, mask_feat_stride: channels Cm and stride s of the mask features.
            mask_out_stride: stride of the output masks; must divide `mask_feat_stride`.
            sizes_of_interest: the relative-coordinate normaliser of each FPN level.
            mask_loss: the training supervision; None: CondInst's `DiceMaskLoss`.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MODEL.CONDINST.MASK_HEAD.NUM_LAYERS must be >= 1, got {num_layers}")
        if mask_out_stride < 1 or mask_feat_stride % mask_out_stride != 0:
            raise ValueError(
                f"MODEL.CONDINST.MASK_OUT_STRIDE {mask_out_stride} must divide the mask feature "
                f"stride {mask_feat_stride}"
            )
        self.in_channels = in_channels
        self.mask_feat_stride = mask_feat_stride
        self.mask_out_stride = mask_out_stride
        self.sizes_of_interest = list(sizes_of_interest)
        self.disable_rel_coords = disable_rel_coords
        self.mask_loss = mask_loss if mask_loss is not None else DiceMaskLoss(mask_out_stride)
        widths = [in_channels + (0 if disable_rel_coords else 2)]
        widths += [channels] * (num_layers - 1) + [1]
        self.weight_nums = [i * o for i, o in zip(widths[:-1], widths[1:])]
        self.bias_nums = widths[1:]

    @classmethod
    def from_config(cls, cfg, mask_branch: MaskBranch, mask_loss: Optional[MaskLoss] = None):
        head = cfg.MODEL.CONDINST.MASK_HEAD
        return {
            "in_channels": mask_branch.out_channels,
            "mask_feat_stride": mask_branch.out_stride,
            "channels": head.CHANNELS,
            "num_layers": head.NUM_LAYERS,
            "mask_out_stride": cfg.MODEL.CONDINST.MASK_OUT_STRIDE,
            "sizes_of_interest": level_sizes_of_interest(cfg.MODEL.FCOS.SIZES_OF_INTEREST),
            "disable_rel_coords": head.DISABLE_REL_COORDS,
            "mask_loss": mask_loss,
        }

    @property
    def upsample_factor(self) -> int:
        """f: how much finer the output masks are than the mask features."""
        return self.mask_feat_stride // self.mask_out_stride

    @property
    def num_params(self) -> int:
        """P: the number of parameters the controller generates per instance."""
        return sum(self.weight_nums) + sum(self.bias_nums)

    def forward(self, mask_feats: torch.Tensor, instances: Instances) -> torch.Tensor:
        """Mask logits of R instances at MASK_OUT_STRIDE.

        Args:
            mask_feats: (N, Cm, h, w) at stride `mask_feat_stride`.
            instances: R instances with im_inds, locations (R, 2), fpn_levels and
                mask_head_params (R, P).
        Returns:
            (R, 1, h*f, w*f) logits.
        """
        _, _, h, w = mask_feats.shape
        # Sizes from shapes, not len(): an exported graph keeps R dynamic.
        x = mask_feats.flatten(2)[instances.im_inds]  # (R, Cm, h*w)
        if not self.disable_rel_coords:
            grid = compute_locations(h, w, self.mask_feat_stride, mask_feats.device)
            scales = mask_feats.new_tensor(self.sizes_of_interest)[instances.fpn_levels]
            rel = relative_coordinates(instances.locations, grid, scales).to(mask_feats.dtype)
            x = torch.cat([rel, x], dim=1)
        weights, biases = parse_dynamic_params(
            instances.mask_head_params, self.weight_nums, self.bias_nums
        )
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias, weight, x)  # (R, out, h*w)
            if i < len(weights) - 1:
                x = F.relu(x)
        return aligned_bilinear(x.reshape(x.shape[0], 1, h, w), self.upsample_factor)

    def add_targets(
        self, gt_instances: List[Instances], batched_inputs: List[Dict], padded_size: Sequence[int]
    ) -> None:
        """Adds the training targets of `mask_loss` to each image's GTs (see `MaskLoss`)."""
        self.mask_loss.add_targets(gt_instances, batched_inputs, padded_size)

    def loss(
        self, mask_feats: torch.Tensor, instances: Instances, gt_instances: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """The `mask_loss` losses of R instances.

        Args:
            instances: as in `forward`, plus gt_inds into the batch's concatenated GTs.
            gt_instances: each image's GTs, after `add_targets`.
        """
        if len(instances) == 0:  # zero, but connected to the graph (DDP needs every gradient)
            zero = mask_feats.sum() * 0 + instances.mask_head_params.sum() * 0
            return {name: zero for name in self.mask_loss.names}
        return self.mask_loss(self(mask_feats, instances), instances, gt_instances)
