"""Class-aware greedy NMS on mask IoU (the paper's Table 5 alternative to box NMS)."""

import torch

__all__ = ["mask_iou", "mask_nms"]


def mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (D, D) of (D, h, w) binary masks; 0 where both masks are empty."""
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    areas = flat.sum(dim=1)
    union = areas[:, None] + areas[None, :] - inter
    return inter / union.clamp(min=1.0)


def mask_nms(
    masks: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, thresh: float, max_keep: int
) -> torch.Tensor:
    """Indices of the kept detections, by decreasing score.

    A detection is dropped when its mask overlaps a kept, higher-scored detection of the same class
    with IoU > `thresh`; at most `max_keep` are kept (<= 0: no limit).
    Args: masks (D, h, w) bool; scores, classes (D,).
    """
    order = torch.argsort(scores, descending=True)
    iou = mask_iou(masks[order])
    same_class = classes[order][:, None] == classes[order][None, :]
    overlaps = (iou > thresh) & same_class
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=masks.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) == max_keep > 0:
            break
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=masks.device)]
