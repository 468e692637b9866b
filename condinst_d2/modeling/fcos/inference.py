"""FCOS inference: per-level candidates, class-aware NMS, top detections per image.

Shape shorthand: N: images, K: classes, Ml: locations of level l, D: detections of one image.
"""

from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

__all__ = ["candidates_single_level", "select_over_all_levels"]


def candidates_single_level(
    locations: torch.Tensor,
    logits: torch.Tensor,
    bbox_reg: torch.Tensor,
    ctrness: torch.Tensor,
    stride: int,
    level: int,
    image_sizes: List[Tuple[int, int]],
    *,
    score_thresh: float,
    pre_nms_topk: int,
    thresh_with_ctr: bool,
) -> List[Instances]:
    """Scored boxes of one level for each image.

    Args:
        locations: (Ml, 2); logits: (N, K, H, W); bbox_reg: (N, 4, H, W) in units of `stride`;
            ctrness: (N, 1, H, W) logits.
    Returns:
        N Instances with pred_boxes, scores (= sqrt(cls * ctr)), pred_classes, locations,
        fpn_levels and loc_inds (row-major index of the location on this level).
    """
    n, k = logits.shape[:2]
    cls = logits.permute(0, 2, 3, 1).reshape(n, -1, k).sigmoid()
    reg = bbox_reg.permute(0, 2, 3, 1).reshape(n, -1, 4) * stride
    ctr = ctrness.reshape(n, -1).sigmoid()
    scores = cls * ctr[:, :, None]
    candidates = (scores if thresh_with_ctr else cls) > score_thresh
    results = []
    for i in range(n):
        loc_inds, classes = candidates[i].nonzero(as_tuple=True)
        per_scores = scores[i, loc_inds, classes]
        if torch.jit.is_tracing():  # ONNX export: the number of candidates is known at run time
            num = torch.clamp(torch._shape_as_tensor(per_scores)[0], max=pre_nms_topk)
            per_scores, top = per_scores.topk(num, sorted=False)
            loc_inds, classes = loc_inds[top], classes[top]
        elif len(per_scores) > pre_nms_topk:
            per_scores, top = per_scores.topk(pre_nms_topk, sorted=False)
            loc_inds, classes = loc_inds[top], classes[top]
        locs, r = locations[loc_inds], reg[i, loc_inds]
        boxes = torch.cat([locs - r[:, :2], locs + r[:, 2:]], dim=1)
        results.append(
            Instances(
                image_sizes[i],
                pred_boxes=Boxes(boxes),
                scores=torch.sqrt(per_scores),
                pred_classes=classes,
                locations=locs,
                fpn_levels=torch.full_like(classes, level),
                loc_inds=loc_inds,
            )
        )
    return results


def select_over_all_levels(
    per_level: List[List[Instances]], *, box_nms: bool, nms_thresh: float, max_detections: int
) -> List[Instances]:
    """Concatenates each image's levels and keeps its `max_detections` best (<= 0: all), sorted
    by decreasing score.

    Args:
        per_level: L lists of N Instances, from `candidates_single_level`.
        box_nms: run class-aware NMS at IoU `nms_thresh` (boxes unclipped, as the authors do)
            first; without it the best candidates are kept unsuppressed (for a later mask NMS).
    """
    results = []
    for per_image in zip(*per_level):
        candidates = Instances.cat(list(per_image))
        if box_nms:
            keep = batched_nms(
                candidates.pred_boxes.tensor, candidates.scores, candidates.pred_classes, nms_thresh
            )
        else:
            keep = torch.argsort(candidates.scores, descending=True)
        if max_detections > 0:
            keep = keep[:max_detections]
        results.append(candidates[keep])
    return results
