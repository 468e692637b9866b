"""FCOS losses as pure functions.

Shape shorthand: T: locations of the batch, P: positive locations, K: classes.
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss_jit

from ..layers import reduce_sum

__all__ = ["ctrness_targets", "iou_losses", "LossTerms", "fcos_loss_terms", "losses_of"]


def ctrness_targets(reg_targets: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of (P, 4) targets, as (P,)."""
    if len(reg_targets) == 0:
        return reg_targets.new_zeros(0)
    lr, tb = reg_targets[:, [0, 2]], reg_targets[:, [1, 3]]
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values) * (
        tb.min(dim=-1).values / tb.max(dim=-1).values
    )
    return torch.sqrt(ratio)


def iou_losses(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "giou") -> torch.Tensor:
    """(P,) losses between (P, 4) (l, t, r, b) predictions and targets.

    IoU uses +1 smoothing, (inter + 1) / (union + 1), as the authors' code does.
    loss_type: "giou" (1 - GIoU), "iou" (-log IoU) or "linear_iou" (1 - IoU).
    """
    pl, pt, pr, pb = pred.unbind(dim=1)
    tl, tt, tr, tb = target.unbind(dim=1)
    target_area = (tl + tr) * (tt + tb)
    pred_area = (pl + pr) * (pt + pb)
    inter = (torch.min(pl, tl) + torch.min(pr, tr)) * (torch.min(pb, tb) + torch.min(pt, tt))
    union = target_area + pred_area - inter
    ious = (inter + 1.0) / (union + 1.0)
    if loss_type == "giou":
        enclose = (torch.max(pl, tl) + torch.max(pr, tr)) * (torch.max(pb, tb) + torch.max(pt, tt))
        enclose = enclose + 1e-7
        return 1 - (ious - (enclose - union) / enclose)
    if loss_type == "iou":
        return -torch.log(ious)
    if loss_type == "linear_iou":
        return 1 - ious
    raise ValueError(f"MODEL.FCOS.LOC_LOSS_TYPE must be giou, iou or linear_iou, got {loss_type!r}")


@dataclass
class LossTerms:
    """One loss as terms of locations: loss = values.sum() / denominator * weight."""

    values: torch.Tensor  # (n, ...): the terms of n locations, a row each
    locations: torch.Tensor  # (n,): their indices into the batch's T locations
    denominator: float
    weight: float = 1.0

    def loss(self) -> torch.Tensor:
        return self.values.sum() / self.denominator * self.weight

    @torch.no_grad()
    def by_level(self, levels: torch.Tensor, num_levels: int) -> torch.Tensor:
        """(L,) the loss's share of each FPN level, summing to it; levels: (T,)."""
        rows = self.values.reshape(len(self.values), -1).sum(dim=1)
        shares = rows.new_zeros(num_levels).index_add_(0, levels[self.locations], rows)
        return shares / self.denominator * self.weight


def fcos_loss_terms(
    logits: torch.Tensor,
    reg_pred: torch.Tensor,
    ctrness_pred: torch.Tensor,
    labels: torch.Tensor,
    reg_targets: torch.Tensor,
    *,
    focal_alpha: float,
    focal_gamma: float,
    loc_loss_type: str,
    loss_weight_cls: float = 1.0,
) -> Dict[str, LossTerms]:
    """loss_fcos_cls (over all T locations), loss_fcos_loc and loss_fcos_ctr (over the positives),
    normalised by the positives averaged over processes (loc: by their centerness targets).

    Args:
        logits: (T, K); reg_pred: (T, 4); ctrness_pred: (T,) logits.
        labels: (T,) with K for background; reg_targets: (T, 4) divided by the stride.
    """
    num_classes = logits.shape[1]
    pos = torch.nonzero(labels != num_classes).squeeze(1)
    num_gpus = comm.get_world_size()
    total_pos = reduce_sum(pos.new_tensor([pos.numel()])).item()
    num_pos_avg = max(total_pos / num_gpus, 1.0)

    class_target = torch.zeros_like(logits)
    class_target[pos, labels[pos]] = 1
    loss_cls = sigmoid_focal_loss_jit(
        logits, class_target, alpha=focal_alpha, gamma=focal_gamma, reduction="none"
    )
    ctr_targets = ctrness_targets(reg_targets[pos])
    loss_denorm = max(reduce_sum(ctr_targets.sum()).item() / num_gpus, 1e-6)
    if pos.numel() > 0:
        loss_loc = iou_losses(reg_pred[pos], reg_targets[pos], loc_loss_type) * ctr_targets
        loss_ctr = F.binary_cross_entropy_with_logits(
            ctrness_pred[pos], ctr_targets, reduction="none"
        )
    else:  # keeps the graph connected (DDP) with a zero loss, put on location 0
        pos = pos.new_zeros(1)
        loss_loc = reg_pred.sum()[None] * 0
        loss_ctr = ctrness_pred.sum()[None] * 0
    every_location = torch.arange(len(labels), device=labels.device)
    return {
        "loss_fcos_cls": LossTerms(loss_cls, every_location, num_pos_avg, loss_weight_cls),
        "loss_fcos_loc": LossTerms(loss_loc, pos, loss_denorm),
        "loss_fcos_ctr": LossTerms(loss_ctr, pos, num_pos_avg),
    }


def losses_of(terms: Dict[str, LossTerms]) -> Dict[str, torch.Tensor]:
    """name -> loss, for `fcos_loss_terms`."""
    return {name: term.loss() for name, term in terms.items()}
