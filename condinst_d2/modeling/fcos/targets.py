"""FCOS training targets: which location regresses which ground-truth box (pure, no grad).

Shape shorthand:
    L: levels, N: images, Ml: locations of level l, M = sum(Ml), G: ground truths of one image,
    T = N * M: all locations of the batch, flattened level first (level, image, location).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Instances

__all__ = [
    "INF",
    "FCOSTargets",
    "level_sizes_of_interest",
    "sizes_of_interest_ranges",
    "fcos_targets",
    "mask_centroids",
]

INF = 100000000


@dataclass
class FCOSTargets:
    """Targets of every location in the batch, each (T, ...), flattened level first."""

    labels: torch.Tensor  # (T,) class id, num_classes for background
    reg_targets: torch.Tensor  # (T, 4) (l, t, r, b) divided by the level's stride
    gt_inds: torch.Tensor  # (T,) index into the batch's concatenated GTs, -1 if none
    im_inds: torch.Tensor  # (T,) image of the location
    fpn_levels: torch.Tensor  # (T,) level of the location
    loc_inds: torch.Tensor  # (T,) row-major index of the location on its level
    locations: torch.Tensor  # (T, 2) (x, y) image coordinates


def level_sizes_of_interest(bounds: Sequence[float]) -> List[float]:
    """MODEL.FCOS.SIZES_OF_INTEREST (the L - 1 object sizes between levels) -> one size per level.

    [64, 128, 256, 512] -> [64, 128, 256, 512, 1024]: the last level's size is twice the last bound.
    The only place the config list is extended: a level's size bounds the objects it regresses
    (`sizes_of_interest_ranges`) and normalises the relative coordinates of the instances it
    generates (the dynamic mask head), as in the authors' code.
    """
    return list(bounds) + [2 * bounds[-1]]


def sizes_of_interest_ranges(level_sizes: Sequence[float]) -> List[List[float]]:
    """Per-level [lower, upper] bounds on max(l, t, r, b): the previous level's size (-1 on the
    first level) to the level's own size (INF on the last level).

    [64, 128, 256, 512, 1024] -> [[-1, 64], [64, 128], [128, 256], [256, 512], [512, INF]].
    """
    upper = list(level_sizes[:-1]) + [INF]
    return [[lo, hi] for lo, hi in zip([-1] + upper[:-1], upper)]


def mask_centroids(bitmasks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Centre of mass of each (G, H, W) bitmask, as (G, 2) (x, y).

    An empty mask (a legal but degenerate annotation) falls back to its box centre.
    """
    h, w = bitmasks.shape[-2:]
    ys = torch.arange(0, h, dtype=torch.float32, device=bitmasks.device)
    xs = torch.arange(0, w, dtype=torch.float32, device=bitmasks.device)
    m00 = bitmasks.sum(dim=-1).sum(dim=-1).clamp(min=1e-6)
    m10 = (bitmasks * xs).sum(dim=-1).sum(dim=-1)
    m01 = (bitmasks * ys[:, None]).sum(dim=-1).sum(dim=-1)
    centers = torch.stack([m10 / m00, m01 / m00], dim=1)
    box_centers = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    empty = (bitmasks.flatten(1) == 0).all(dim=1)
    return torch.where(empty[:, None], box_centers, centers)


def _center_sample_region(
    boxes: torch.Tensor,
    centers: torch.Tensor,
    locations: torch.Tensor,
    radii: torch.Tensor,
) -> torch.Tensor:
    """Whether each location lies within +-radius of each GT's centre, clipped to the GT box.

    Args:
        boxes: (G, 4); centers: (G, 2); locations: (M, 2); radii: (M,) stride * radius.
    Returns:
        (M, G) bool.
    """
    r = radii[:, None]
    x0 = torch.maximum(centers[None, :, 0] - r, boxes[None, :, 0])
    y0 = torch.maximum(centers[None, :, 1] - r, boxes[None, :, 1])
    x1 = torch.minimum(centers[None, :, 0] + r, boxes[None, :, 2])
    y1 = torch.minimum(centers[None, :, 1] + r, boxes[None, :, 3])
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    dist = torch.stack([xs - x0, ys - y0, x1 - xs, y1 - ys], dim=-1)
    return dist.min(dim=-1).values > 0


def _targets_per_image(
    gt: Instances,
    locations: torch.Tensor,
    size_ranges: torch.Tensor,
    radii: Optional[torch.Tensor],
    num_classes: int,
):
    """Labels (M,), (l, t, r, b) targets (M, 4) in pixels and matched GT index (M,) of one image.

    A location is positive for a GT when it is inside its box (and, with center sampling, near its
    mask centroid) and max(l, t, r, b) is within the level's size range; among several such GTs
    the one with the smallest box area wins.
    """
    m = len(locations)
    boxes = gt.gt_boxes.tensor
    if len(boxes) == 0:
        labels = torch.full((m,), num_classes, dtype=torch.long, device=locations.device)
        return labels, locations.new_zeros((m, 4)), labels.new_full((m,), -1)
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    reg = torch.stack(
        [xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2
    )
    if radii is not None:
        if gt.has("gt_bitmasks_full"):
            centers = mask_centroids(gt.gt_bitmasks_full, boxes)
        else:
            centers = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        in_region = _center_sample_region(boxes, centers, locations, radii)
    else:
        in_region = reg.min(dim=2).values > 0
    max_reg = reg.max(dim=2).values
    in_range = (max_reg >= size_ranges[:, [0]]) & (max_reg <= size_ranges[:, [1]])

    areas = gt.gt_boxes.area()[None].repeat(m, 1)  # (M, G)
    areas[~in_region] = INF
    areas[~in_range] = INF
    min_area, gt_inds = areas.min(dim=1)
    labels = gt.gt_classes[gt_inds]
    background = min_area == INF
    labels[background] = num_classes
    gt_inds[background] = -1
    return labels, reg[torch.arange(m, device=reg.device), gt_inds], gt_inds


@torch.no_grad()
def fcos_targets(
    locations: List[torch.Tensor],
    gt_instances: List[Instances],
    strides: Sequence[int],
    level_sizes: Sequence[float],
    num_classes: int,
    center_sample_radius: Optional[float],
) -> FCOSTargets:
    """Targets of all locations of a batch.

    Args:
        locations: L tensors (Ml, 2), from `compute_locations`.
        gt_instances: N Instances with gt_boxes, gt_classes and optionally gt_bitmasks_full.
        strides: L strides; level_sizes: L sizes of interest (`level_sizes_of_interest`).
        center_sample_radius: POS_RADIUS, or None to disable center sampling.
    """
    if not len(locations) == len(strides) == len(level_sizes):
        raise ValueError(
            f"{len(locations)} levels of locations need as many strides ({len(strides)}) and "
            f"sizes of interest ({len(level_sizes)})"
        )
    num_locs = [len(loc) for loc in locations]
    ranges = sizes_of_interest_ranges(level_sizes)
    size_ranges = torch.cat(
        [loc.new_tensor(r)[None].expand(n, 2) for loc, r, n in zip(locations, ranges, num_locs)]
    )
    radii = None
    if center_sample_radius is not None:
        radii = torch.cat(
            [
                loc.new_full((n,), s * center_sample_radius)
                for loc, s, n in zip(locations, strides, num_locs)
            ]
        )
    all_locations = torch.cat(locations)
    per_image, num_gts = [], 0
    for gt in gt_instances:
        labels, reg, gt_inds = _targets_per_image(
            gt, all_locations, size_ranges, radii, num_classes
        )
        per_image.append((labels, reg, gt_inds + num_gts * (gt_inds >= 0)))
        num_gts += len(gt)
    return _level_first_targets(per_image, locations, strides)


def _level_first_targets(
    per_image: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    locations: List[torch.Tensor],
    strides: Sequence[int],
) -> FCOSTargets:
    """Each image's (labels (M,), reg (M, 4) in pixels, gt_inds (M,)) over all its levels ->
    the batch's targets ordered (level, image, location), reg divided by the level's stride."""
    num_locs = [len(loc) for loc in locations]
    fields = {k: [] for k in FCOSTargets.__dataclass_fields__}
    split = [[t.split(num_locs) for t in im] for im in per_image]
    for level, (loc, stride) in enumerate(zip(locations, strides)):
        n = len(loc)
        for im, (labels, reg, gt_inds) in enumerate(split):
            fields["labels"].append(labels[level])
            fields["reg_targets"].append(reg[level] / float(stride))
            fields["gt_inds"].append(gt_inds[level])
            fields["im_inds"].append(torch.full((n,), im, dtype=torch.long, device=loc.device))
            fields["fpn_levels"].append(
                torch.full((n,), level, dtype=torch.long, device=loc.device)
            )
            fields["loc_inds"].append(torch.arange(n, device=loc.device))
            fields["locations"].append(loc)
    return FCOSTargets(**{k: torch.cat(v) for k, v in fields.items()})
