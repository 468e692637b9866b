"""The FCOS head: classification / box towers shared across levels, and the CondInst controller.

Shape shorthand:
    N: images, L: FPN levels, C: head channels, K: num_classes, P: dynamic parameters per instance,
    Hl x Wl: size of level l, R: selected locations (positives or detections).
"""

import math
from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import nn

__all__ = ["FCOSHead", "HeadOutputs"]


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class HeadOutputs(NamedTuple):
    """Per-level outputs of `FCOSHead`; each is a list of L tensors."""

    logits: List[torch.Tensor]  # (N, K, Hl, Wl) classification logits
    bbox_reg: List[torch.Tensor]  # (N, 4, Hl, Wl) (l, t, r, b) distances in units of the stride
    ctrness: List[torch.Tensor]  # (N, 1, Hl, Wl) centerness logits
    bbox_towers: List[torch.Tensor]  # (N, C, Hl, Wl) box tower features (input of the controller)


def _tower(num_convs: int, channels: int, norm: str) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True))
        if norm == "GN":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Towers and predictors of FCOS (module names follow the authors' checkpoints).

    With `num_dynamic_params` > 0 it also holds CondInst's controller, a 3x3 conv on the box tower
    that generates each instance's mask head parameters. The controller is evaluated only where
    parameters are needed (`controller_at`), not densely over every level.
    """

    def __init__(
        self,
        input_shape: List[ShapeSpec],
        *,
        num_classes: int,
        num_cls_convs: int = 4,
        num_box_convs: int = 4,
        num_share_convs: int = 0,
        norm: str = "GN",
        prior_prob: float = 0.01,
        use_scale: bool = True,
        use_relu: bool = True,
        num_dynamic_params: int = 0,
    ):
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"FCOS needs the same channels on every level, got {sorted(channels)}")
        (c,) = channels
        if norm not in ("GN", "none", ""):
            raise ValueError(f"MODEL.FCOS.NORM must be 'GN' or 'none', got {norm!r}")
        self.use_relu = use_relu
        self.share_tower = _tower(num_share_convs, c, norm)
        self.cls_tower = _tower(num_cls_convs, c, norm)
        self.bbox_tower = _tower(num_box_convs, c, norm)
        self.cls_logits = nn.Conv2d(c, num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(c, 4, kernel_size=3, padding=1)
        self.ctrness = nn.Conv2d(c, 1, kernel_size=3, padding=1)
        self.scales = nn.ModuleList([Scale() for _ in input_shape]) if use_scale else None
        convs = [self.share_tower, self.cls_tower, self.bbox_tower]
        convs += [self.cls_logits, self.bbox_pred, self.ctrness]
        if num_dynamic_params > 0:
            self.controller = nn.Conv2d(c, num_dynamic_params, kernel_size=3, padding=1)
            convs.append(self.controller)
        else:
            self.controller = None
        for module in convs:
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.normal_(layer.weight, std=0.01)
                    nn.init.constant_(layer.bias, 0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: List[torch.Tensor]) -> HeadOutputs:
        out = HeadOutputs([], [], [], [])
        for level, feature in enumerate(features):
            feature = self.share_tower(feature)
            cls_tower = self.cls_tower(feature)
            bbox_tower = self.bbox_tower(feature)
            reg = self.bbox_pred(bbox_tower)
            if self.scales is not None:
                reg = self.scales[level](reg)
            out.logits.append(self.cls_logits(cls_tower))
            out.bbox_reg.append(F.relu(reg) if self.use_relu else torch.exp(reg))
            out.ctrness.append(self.ctrness(bbox_tower))
            out.bbox_towers.append(bbox_tower)
        return out

    def controller_at(
        self,
        bbox_towers: List[torch.Tensor],
        im_inds: torch.Tensor,
        fpn_levels: torch.Tensor,
        loc_inds: torch.Tensor,
    ) -> torch.Tensor:
        """The controller's output at R selected locations.

        Equal to running the 3x3 controller conv over every level and gathering the R locations,
        at a fraction of the cost: each location's 3x3 neighbourhood is gathered and multiplied
        by the flattened kernel.

        Args:
            bbox_towers: L tensors (N, C, Hl, Wl).
            im_inds, fpn_levels, loc_inds: (R,) image, level and row-major location index on
                that level of each selected location.
        Returns:
            (R, P) dynamic parameters, in the order of the inputs.
        """
        channels = bbox_towers[0].shape[1]
        patches = bbox_towers[0].new_zeros((loc_inds.shape[0], channels * 9))
        offsets = torch.arange(3, device=loc_inds.device)
        for level, tower in enumerate(bbox_towers):
            # No early exit for a level without selections: an exported graph has no branches.
            sel = torch.nonzero(fpn_levels == level).squeeze(1)
            width = tower.shape[3]
            ys, xs = loc_inds[sel] // width, loc_inds[sel] % width
            padded = F.pad(tower, (1, 1, 1, 1))
            # Advanced indices around the channel slice put their dims first: (R_l, 3, 3, C).
            level_patches = padded[
                im_inds[sel, None, None],
                :,
                ys[:, None, None] + offsets[None, :, None],
                xs[:, None, None] + offsets[None, None, :],
            ]
            patches = patches.index_copy(0, sel, level_patches.permute(0, 3, 1, 2).flatten(1))
        # One product for all levels; with R = 0 it still connects the controller to the graph.
        weight = self.controller.weight.flatten(1)  # (P, C*9), matches the (C, 3, 3) patch order
        return F.linear(patches, weight, self.controller.bias)
