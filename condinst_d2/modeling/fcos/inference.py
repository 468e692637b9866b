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
    topk_with_ctr: bool = True,
    sqrt_score: bool = True,
    clip_boxes: bool = False,
) -> List[Instances]:
    """Scored boxes of one level for each image.

    The defaults are the authors'; mmdetection's CondInst ranks by cls alone
    (`topk_with_ctr=False`), scores cls * ctr (`sqrt_score=False`) and clips (`clip_boxes=True`).

    Args:
        locations: (Ml, 2); logits: (N, K, H, W); bbox_reg: (N, 4, H, W) in units of `stride`;
            ctrness: (N, 1, H, W) logits.
        thresh_with_ctr: candidates are the (location, class) pairs whose cls * ctr (True) or cls
            alone (False) exceeds `score_thresh`.
        topk_with_ctr: the `pre_nms_topk` kept have the highest cls * ctr (True) or cls (False).
        sqrt_score: the score is sqrt(cls * ctr) (True) or cls * ctr (False).
        clip_boxes: clip the boxes to the image and drop those left empty.
    Returns:
        N Instances with pred_boxes, scores, pred_classes, locations, fpn_levels and loc_inds
        (row-major index of the location on this level).
    """
    n, k = logits.shape[:2]
    cls = logits.permute(0, 2, 3, 1).reshape(n, -1, k).sigmoid()
    reg = bbox_reg.permute(0, 2, 3, 1).reshape(n, -1, 4) * stride
    ctr = ctrness.reshape(n, -1).sigmoid()
    scores = cls * ctr[:, :, None]
    candidates = (scores if thresh_with_ctr else cls) > score_thresh
    rank = scores if topk_with_ctr else cls
    results = []
    for i in range(n):
        loc_inds, classes = candidates[i].nonzero(as_tuple=True)
        ranked = rank[i, loc_inds, classes]
        if torch.jit.is_tracing():  # ONNX export: the number of candidates is known at run time
            num = torch.clamp(torch._shape_as_tensor(ranked)[0], max=pre_nms_topk)
            top = ranked.topk(num, sorted=False).indices
            loc_inds, classes = loc_inds[top], classes[top]
        elif len(loc_inds) > pre_nms_topk:
            top = ranked.topk(pre_nms_topk, sorted=False).indices
            loc_inds, classes = loc_inds[top], classes[top]
        per_scores = scores[i, loc_inds, classes]
        locs, r = locations[loc_inds], reg[i, loc_inds]
        boxes = Boxes(torch.cat([locs - r[:, :2], locs + r[:, 2:]], dim=1))
        result = Instances(
            image_sizes[i],
            pred_boxes=boxes,
            scores=torch.sqrt(per_scores) if sqrt_score else per_scores,
            pred_classes=classes,
            locations=locs,
            fpn_levels=torch.full_like(classes, level),
            loc_inds=loc_inds,
        )
        if clip_boxes:
            boxes.clip(image_sizes[i])
            result = result[boxes.nonempty()]
        results.append(result)
    return results


def select_over_all_levels(
    per_level: List[List[Instances]], *, box_nms: bool, nms_thresh: float, max_detections: int
) -> List[Instances]:
    """Concatenates each image's levels and keeps its `max_detections` best (<= 0: all), sorted
    by decreasing score.

    Args:
        per_level: L lists of N Instances, from `candidates_single_level`.
        box_nms: run class-aware NMS at IoU `nms_thresh` first (on the boxes as the candidates
            hold them: unclipped, as the authors do, unless `clip_boxes`); without it the best
            candidates are kept unsuppressed (for a later mask NMS).
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
