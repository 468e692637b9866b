"""CondInst's mask branch: fuses P3-P5 into stride-8 mask features, with an optional auxiliary
semantic segmentation head (training only).

Shape shorthand: N: images, C: branch channels, Cm: mask feature channels, K: classes,
G: ground truths of one image, H x W: padded image size, h x w = H/8 x W/8.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.structures import Instances
from fvcore.nn import sigmoid_focal_loss_jit
from torch import nn

from .fcos.targets import INF
from .layers import aligned_bilinear

__all__ = ["MaskBranch", "semantic_targets"]


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    conv = Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not norm)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if not norm:
        nn.init.constant_(conv.bias, 0)
        return nn.Sequential(conv, nn.ReLU(inplace=True))
    return nn.Sequential(conv, get_norm(norm, out_channels), nn.ReLU(inplace=True))


@torch.no_grad()
def semantic_targets(gt_instances: List[Instances], stride: int) -> torch.Tensor:
    """Per-pixel class + 1 of the smallest GT mask covering it (0 = background), sampled at
    `stride` with offset stride // 2 from each image's (G, H, W) gt_bitmasks_full.

    Returns:
        (N, 1, h, w) long.
    """
    targets = []
    for gt in gt_instances:
        masks = gt.gt_bitmasks_full
        h, w = masks.shape[-2:]
        if len(masks) == 0:
            targets.append(torch.zeros((h, w), dtype=torch.long, device=masks.device))
            continue
        areas = masks.sum(dim=-1).sum(dim=-1)[:, None, None].repeat(1, h, w)
        areas[masks == 0] = INF
        min_areas, inds = areas.permute(1, 2, 0).reshape(h * w, -1).min(dim=1)
        per_image = gt.gt_classes[inds] + 1
        per_image[min_areas == INF] = 0
        targets.append(per_image.reshape(h, w))
    start = stride // 2
    return torch.stack(targets)[:, None, start::stride, start::stride]


class MaskBranch(nn.Module):
    """Mask features (N, Cm, h, w) at the stride of its first input level; key names follow the
    authors' checkpoints (refine, tower, seg_head, logits)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: List[str],
        channels: int,
        out_channels: int,
        num_convs: int,
        norm: str,
        num_classes: int,
        semantic_loss_on: bool = False,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_stride = input_shape[in_features[0]].stride
        self.out_channels = out_channels
        self.refine = nn.ModuleList(
            [_conv_norm_relu(input_shape[f].channels, channels, norm) for f in in_features]
        )
        tower = [_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)]
        tower.append(nn.Conv2d(channels, out_channels, kernel_size=1))
        self.tower = nn.Sequential(*tower)
        self.semantic_loss_on = semantic_loss_on
        if semantic_loss_on:
            in_channels = input_shape[in_features[0]].channels
            self.seg_head = nn.Sequential(
                _conv_norm_relu(in_channels, channels, norm),
                _conv_norm_relu(channels, channels, norm),
            )
            self.logits = nn.Conv2d(channels, num_classes, kernel_size=1)
            nn.init.constant_(self.logits.bias, -math.log((1 - prior_prob) / prior_prob))
            self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        branch = cfg.MODEL.CONDINST.MASK_BRANCH
        return {
            "input_shape": input_shape,
            "in_features": branch.IN_FEATURES,
            "channels": branch.CHANNELS,
            "out_channels": branch.OUT_CHANNELS,
            "num_convs": branch.NUM_CONVS,
            "norm": branch.NORM,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "semantic_loss_on": branch.SEMANTIC_LOSS_ON,
            "prior_prob": cfg.MODEL.FCOS.PRIOR_PROB,
            "focal_alpha": cfg.MODEL.FCOS.LOSS_ALPHA,
            "focal_gamma": cfg.MODEL.FCOS.LOSS_GAMMA,
        }

    def forward(
        self, features: Dict[str, torch.Tensor], gt_instances: Optional[List[Instances]] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns mask features (N, Cm, h, w) and {"loss_sem": ...} when training with the
        semantic loss on."""
        x = self.refine[0](features[self.in_features[0]])
        for refine, name in zip(self.refine[1:], self.in_features[1:]):
            x_p = refine(features[name])
            factor = x.shape[2] // x_p.shape[2]
            if x_p.shape[2] * factor != x.shape[2] or x_p.shape[3] * factor != x.shape[3]:
                raise ValueError(
                    f"mask branch input {name} of size {tuple(x_p.shape[2:])} does not divide "
                    f"{tuple(x.shape[2:])}; the backbone's size_divisibility is too small"
                )
            x = x + aligned_bilinear(x_p, factor)
        mask_feats = self.tower(x)
        losses = {}
        if self.training and self.semantic_loss_on:
            losses["loss_sem"] = self.semantic_loss(features[self.in_features[0]], gt_instances)
        return mask_feats, losses

    def semantic_loss(self, feature: torch.Tensor, gt_instances: List[Instances]) -> torch.Tensor:
        """Sigmoid focal loss of the semantic logits, summed / foreground pixels (at least 1)."""
        logits = self.logits(self.seg_head(feature)).float()  # (N, K, h, w), also under autocast
        targets = semantic_targets(gt_instances, self.out_stride)
        classes = torch.arange(logits.shape[1], device=logits.device)[:, None, None] + 1
        one_hot = (targets == classes).to(logits.dtype)
        num_pos = (one_hot > 0).sum().to(logits.dtype).clamp(min=1.0)
        loss = sigmoid_focal_loss_jit(
            logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        return loss / num_pos
