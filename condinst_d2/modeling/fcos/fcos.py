"""FCOS (Tian et al., ICCV 2019, with the improvements CondInst uses) as a Detectron2 proposal
generator that hands CondInst the instances it needs.

Shape shorthand: N: images, L: levels, K: classes, T: all locations of the batch (level first),
P: positive locations, D: detections of one image, Pm: dynamic mask-head parameters.
"""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import ImageList, Instances
from torch import nn

from ..layers import compute_locations
from .head import FCOSHead, HeadOutputs
from .inference import candidates_single_level, select_over_all_levels
from .losses import ctrness_targets, fcos_losses
from .targets import fcos_targets

__all__ = ["FCOS"]


def _flatten_level_first(per_level: List[torch.Tensor]) -> torch.Tensor:
    """L tensors (N, C, Hl, Wl) -> (T, C), ordered (level, image, y, x) like the targets."""
    return torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in per_level])


def _check_supported(cfg) -> None:
    fcos = cfg.MODEL.FCOS
    unsupported = {
        "USE_DEFORMABLE": (fcos.USE_DEFORMABLE, False),
        "YIELD_PROPOSAL": (fcos.YIELD_PROPOSAL, False),
        "YIELD_BOX_FEATURES": (fcos.YIELD_BOX_FEATURES, False),
        "BOX_QUALITY": (fcos.BOX_QUALITY, "ctrness"),
        "LOSS_NORMALIZER_CLS": (fcos.LOSS_NORMALIZER_CLS, "fg"),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"MODEL.FCOS.{key}={value!r} is not supported (only {supported!r})")
    if len(fcos.FPN_STRIDES) != len(fcos.IN_FEATURES):
        raise ValueError(
            f"MODEL.FCOS.FPN_STRIDES {fcos.FPN_STRIDES} must have one stride per "
            f"MODEL.FCOS.IN_FEATURES {fcos.IN_FEATURES}"
        )
    if len(fcos.SIZES_OF_INTEREST) != len(fcos.IN_FEATURES) - 1:
        raise ValueError(
            f"MODEL.FCOS.SIZES_OF_INTEREST {fcos.SIZES_OF_INTEREST} needs one bound fewer than "
            f"there are levels ({len(fcos.IN_FEATURES)})"
        )


@PROPOSAL_GENERATOR_REGISTRY.register()
class FCOS(nn.Module):
    """Dense per-location detector. In training it returns the positive locations (with their
    matched GT, image, level, predictions and, given a controller, mask-head parameters) and the
    FCOS losses; at inference it returns the detections of each image."""

    @configurable
    def __init__(
        self,
        *,
        head: FCOSHead,
        in_features: List[str],
        strides: List[int],
        num_classes: int,
        sizes_of_interest: List[float],
        center_sample_radius: Optional[float],
        focal_alpha: float,
        focal_gamma: float,
        loc_loss_type: str,
        loss_weight_cls: float,
        thresh_with_ctr: bool,
        score_thresh: Tuple[float, float],
        pre_nms_topk: Tuple[int, int],
        post_nms_topk: Tuple[int, int],
        nms_thresh: float,
    ):
        """`score_thresh`, `pre_nms_topk` and `post_nms_topk` are (training, test) pairs."""
        super().__init__()
        self.fcos_head = head
        self.in_features = in_features
        self.strides = strides
        self.num_classes = num_classes
        self.sizes_of_interest = sizes_of_interest
        self.center_sample_radius = center_sample_radius
        self.loss_kwargs = dict(
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            loc_loss_type=loc_loss_type,
            loss_weight_cls=loss_weight_cls,
        )
        self.thresh_with_ctr = thresh_with_ctr
        self.score_thresh = score_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec], num_dynamic_params: int = 0):
        _check_supported(cfg)
        fcos = cfg.MODEL.FCOS
        head = FCOSHead(
            [input_shape[f] for f in fcos.IN_FEATURES],
            num_classes=fcos.NUM_CLASSES,
            num_cls_convs=fcos.NUM_CLS_CONVS,
            num_box_convs=fcos.NUM_BOX_CONVS,
            num_share_convs=fcos.NUM_SHARE_CONVS,
            norm=fcos.NORM,
            prior_prob=fcos.PRIOR_PROB,
            use_scale=fcos.USE_SCALE,
            use_relu=fcos.USE_RELU,
            num_dynamic_params=num_dynamic_params,
        )
        return {
            "head": head,
            "in_features": fcos.IN_FEATURES,
            "strides": fcos.FPN_STRIDES,
            "num_classes": fcos.NUM_CLASSES,
            "sizes_of_interest": fcos.SIZES_OF_INTEREST,
            "center_sample_radius": fcos.POS_RADIUS if fcos.CENTER_SAMPLE else None,
            "focal_alpha": fcos.LOSS_ALPHA,
            "focal_gamma": fcos.LOSS_GAMMA,
            "loc_loss_type": fcos.LOC_LOSS_TYPE,
            "loss_weight_cls": fcos.LOSS_WEIGHT_CLS,
            "thresh_with_ctr": fcos.THRESH_WITH_CTR,
            "score_thresh": (fcos.INFERENCE_TH_TRAIN, fcos.INFERENCE_TH_TEST),
            "pre_nms_topk": (fcos.PRE_NMS_TOPK_TRAIN, fcos.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (fcos.POST_NMS_TOPK_TRAIN, fcos.POST_NMS_TOPK_TEST),
            "nms_thresh": fcos.NMS_TH,
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ):
        """
        Returns:
            In training: (positives, losses), positives an Instances of P locations with fields
            labels, gt_inds, im_inds, fpn_levels, loc_inds, locations, reg_targets, gt_ctrs,
            logits_pred (P, K), reg_pred (P, 4), ctrness_pred (P,) and, given a controller,
            mask_head_params (P, Pm).
            At inference: (detections, {}), N Instances of D detections with pred_boxes, scores,
            pred_classes, locations, fpn_levels, loc_inds and, given a controller,
            mask_head_params (D, Pm).
        """
        feats = [features[f] for f in self.in_features]
        locations = [
            compute_locations(x.shape[2], x.shape[3], s, x.device) for x, s in zip(feats, self.strides)
        ]
        outputs = self.fcos_head(feats)
        if self.training:
            return self.losses(outputs, locations, gt_instances, images.tensor.shape[-2:])
        return self.inference(outputs, locations, images.image_sizes), {}

    def losses(
        self,
        outputs: HeadOutputs,
        locations: List[torch.Tensor],
        gt_instances: List[Instances],
        padded_size: Tuple[int, int],
    ) -> Tuple[Instances, Dict[str, torch.Tensor]]:
        targets = fcos_targets(
            locations,
            gt_instances,
            self.strides,
            self.sizes_of_interest,
            self.num_classes,
            self.center_sample_radius,
        )
        logits = _flatten_level_first(outputs.logits)
        reg_pred = _flatten_level_first(outputs.bbox_reg)
        ctrness_pred = _flatten_level_first(outputs.ctrness).squeeze(1)
        losses = fcos_losses(
            logits, reg_pred, ctrness_pred, targets.labels, targets.reg_targets, **self.loss_kwargs
        )
        pos = torch.nonzero(targets.labels != self.num_classes).squeeze(1)
        positives = Instances(tuple(padded_size))
        for name in ("labels", "gt_inds", "im_inds", "fpn_levels", "loc_inds", "locations"):
            positives.set(name, getattr(targets, name)[pos])
        positives.reg_targets = targets.reg_targets[pos]
        positives.gt_ctrs = ctrness_targets(positives.reg_targets)
        positives.logits_pred = logits[pos]
        positives.reg_pred = reg_pred[pos]
        positives.ctrness_pred = ctrness_pred[pos]
        self._add_mask_head_params(outputs, positives)
        return positives, losses

    @torch.no_grad()
    def _candidates(self, outputs: HeadOutputs, locations, image_sizes) -> List[List[Instances]]:
        mode = 0 if self.training else 1
        return [
            candidates_single_level(
                loc,
                logits,
                reg,
                ctr,
                stride,
                level,
                image_sizes,
                score_thresh=self.score_thresh[mode],
                pre_nms_topk=self.pre_nms_topk[mode],
                thresh_with_ctr=self.thresh_with_ctr,
            )
            for level, (loc, logits, reg, ctr, stride) in enumerate(
                zip(locations, outputs.logits, outputs.bbox_reg, outputs.ctrness, self.strides)
            )
        ]

    def inference(
        self,
        outputs: HeadOutputs,
        locations: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        mode = 0 if self.training else 1
        per_level = self._candidates(outputs, locations, image_sizes)
        detections = select_over_all_levels(per_level, self.nms_thresh, self.post_nms_topk[mode])
        for im_id, det in enumerate(detections):
            det.im_inds = torch.full_like(det.pred_classes, im_id)
            self._add_mask_head_params(outputs, det)
        return detections

    def _add_mask_head_params(self, outputs: HeadOutputs, instances: Instances) -> None:
        if self.fcos_head.controller is not None:
            instances.mask_head_params = self.fcos_head.controller_at(
                outputs.bbox_towers, instances.im_inds, instances.fpn_levels, instances.loc_inds
            )
