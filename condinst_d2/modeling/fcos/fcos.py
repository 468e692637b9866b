"""FCOS (Tian et al., ICCV 2019, with the improvements CondInst uses) as a Detectron2 proposal
generator that hands CondInst the instances it needs.

Shape shorthand: N: images, L: levels, K: classes, T: all locations of the batch (level first),
P: positive locations of one image, D: detections of one image, Pm: dynamic mask-head parameters.
"""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..layers import compute_locations
from .head import FCOSHead, HeadOutputs
from .inference import candidates_single_level, select_over_all_levels
from .losses import fcos_loss_terms, losses_of
from .targets import FCOSTargets, fcos_targets, level_sizes_of_interest

__all__ = ["FCOS"]


def _predictions_level_first(per_level: List[torch.Tensor]) -> torch.Tensor:
    """L tensors (N, C, Hl, Wl) -> (T, C), ordered (level, image, y, x) like the targets."""
    return torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in per_level])


def _split_images(instances: Instances, image_sizes: List[Tuple[int, int]]) -> List[Instances]:
    """Instances of the whole batch (with im_inds) -> one Instances per image, order kept."""
    return [
        Instances(size, **instances[instances.im_inds == i].get_fields())
        for i, size in enumerate(image_sizes)
    ]


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
    """Dense per-location detector. Returns, for each image, an Instances of the locations the
    mask head works on: in training the positive locations (with their matched GT, level,
    predictions and, given a controller, mask-head parameters) next to the FCOS losses; at
    inference the detections."""

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
        score_thresh: float,
        pre_nms_topk: int,
        nms_thresh: float,
        max_detections_per_image: int,
        box_nms: bool = True,
        topk_with_ctr: bool = True,
        sqrt_score: bool = True,
        clip_boxes: bool = False,
        log_level_losses: bool = False,
    ):
        """
        Args:
            sizes_of_interest: one per level (`level_sizes_of_interest`).
            center_sample_radius: in units of the level's stride; None: no center sampling.
            score_thresh, pre_nms_topk: candidate threshold and candidates kept per level and
                image at inference.
            max_detections_per_image: detections kept per image (<= 0: all).
            box_nms: class-aware box NMS at `nms_thresh` before keeping the best; False hands
                over the best candidates unsuppressed (for CondInst's mask NMS).
            topk_with_ctr, sqrt_score, clip_boxes: ranking, score formula and clipping of the
                candidates (`candidates_single_level`; the defaults are the authors').
            log_level_losses: also log, every training iteration, each FCOS loss split by level
                and the positives of each level (`log_losses_by_level`).
        """
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
        self.nms_thresh = nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.box_nms = box_nms
        self.topk_with_ctr = topk_with_ctr
        self.sqrt_score = sqrt_score
        self.clip_boxes = clip_boxes
        self.log_level_losses = log_level_losses

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
            "sizes_of_interest": level_sizes_of_interest(fcos.SIZES_OF_INTEREST),
            "center_sample_radius": fcos.POS_RADIUS if fcos.CENTER_SAMPLE else None,
            "focal_alpha": fcos.LOSS_ALPHA,
            "focal_gamma": fcos.LOSS_GAMMA,
            "loc_loss_type": fcos.LOC_LOSS_TYPE,
            "loss_weight_cls": fcos.LOSS_WEIGHT_CLS,
            "thresh_with_ctr": fcos.THRESH_WITH_CTR,
            "score_thresh": fcos.INFERENCE_TH_TEST,
            "pre_nms_topk": fcos.PRE_NMS_TOPK_TEST,
            "nms_thresh": fcos.NMS_TH,
            "max_detections_per_image": fcos.POST_NMS_TOPK_TEST,
            "topk_with_ctr": fcos.PRE_NMS_TOPK_WITH_CTR,
            "sqrt_score": fcos.SQRT_SCORE,
            "clip_boxes": fcos.CLIP_BOXES_BEFORE_NMS,
            "log_level_losses": fcos.LOG_LEVEL_LOSSES,
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """
        Returns:
            N Instances, one per image (of its size in the batch), and the losses (empty at
            inference). Every Instances has im_inds, fpn_levels, loc_inds (row-major index on
            the level), locations (R, 2) and, given a controller, mask_head_params (R, Pm):
            in training for the P positive locations, plus gt_inds (into the batch's
            concatenated GTs), logits_pred (P, K) and ctrness_pred (P,), in (level, location)
            order; at inference for the D detections, plus pred_boxes, scores and
            pred_classes, by decreasing score.
        """
        feats = [features[f] for f in self.in_features]
        locations = self.level_locations(feats)
        outputs = self.fcos_head(feats)
        # Losses, decoding and controller in float32, also when the head ran under autocast.
        outputs = HeadOutputs(*([x.float() for x in level] for level in outputs))
        with torch.autocast(feats[0].device.type, enabled=False):
            if self.training:
                return self.forward_training(outputs, locations, gt_instances, images)
            return self.inference(outputs, locations, images.image_sizes), {}

    def level_locations(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """Image coordinates (Ml, 2) of the locations of each of the L (N, C, Hl, Wl) levels."""
        return [
            compute_locations(x.shape[2], x.shape[3], stride, x.device)
            for x, stride in zip(feats, self.strides)
        ]

    def label_locations(
        self, locations: List[torch.Tensor], gt_instances: List[Instances]
    ) -> FCOSTargets:
        """The training targets of every location of the batch (see `fcos_targets`)."""
        return fcos_targets(
            locations,
            gt_instances,
            self.strides,
            self.sizes_of_interest,
            self.num_classes,
            self.center_sample_radius,
        )

    def forward_training(
        self,
        outputs: HeadOutputs,
        locations: List[torch.Tensor],
        gt_instances: List[Instances],
        images: ImageList,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        targets = self.label_locations(locations, gt_instances)
        logits = _predictions_level_first(outputs.logits)
        ctrness_pred = _predictions_level_first(outputs.ctrness).squeeze(1)
        terms = fcos_loss_terms(
            logits,
            _predictions_level_first(outputs.bbox_reg),
            ctrness_pred,
            targets.labels,
            targets.reg_targets,
            **self.loss_kwargs,
        )
        if self.log_level_losses:
            self.log_losses_by_level(terms, targets)
        losses = losses_of(terms)
        pos = torch.nonzero(targets.labels != self.num_classes).squeeze(1)
        positives = Instances(tuple(images.tensor.shape[-2:]))  # all images, on the padded canvas
        for name in ("gt_inds", "im_inds", "fpn_levels", "loc_inds", "locations"):
            positives.set(name, getattr(targets, name)[pos])
        positives.logits_pred = logits[pos]
        positives.ctrness_pred = ctrness_pred[pos]
        # One controller evaluation for the whole batch, then split.
        self._add_mask_head_params(outputs, positives)
        return _split_images(positives, images.image_sizes), losses

    @torch.no_grad()
    def log_losses_by_level(self, terms, targets: FCOSTargets) -> None:
        """Puts `fcos_<level>/<loss>` (the level's share of the loss: the levels' shares sum to
        it) and `fcos_<level>/num_pos` (the batch's positives on the level) in the event storage.

        terms: `fcos_loss_terms` of the batch whose targets are `targets`.
        """
        num_levels = len(self.in_features)
        shares = {name: t.by_level(targets.fpn_levels, num_levels) for name, t in terms.items()}
        shares["num_pos"] = torch.bincount(
            targets.fpn_levels[targets.labels != self.num_classes], minlength=num_levels
        )
        storage = get_event_storage()
        for name, values in shares.items():
            for level, value in zip(self.in_features, values.tolist()):
                storage.put_scalar(f"fcos_{level}/{name}", value)

    @torch.no_grad()
    def _candidates(
        self,
        outputs: HeadOutputs,
        locations: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[List[Instances]]:
        """L lists of N Instances: each level's scored candidate boxes of each image."""
        return [
            candidates_single_level(
                loc,
                logits,
                reg,
                ctr,
                stride,
                level,
                image_sizes,
                score_thresh=self.score_thresh,
                pre_nms_topk=self.pre_nms_topk,
                thresh_with_ctr=self.thresh_with_ctr,
                topk_with_ctr=self.topk_with_ctr,
                sqrt_score=self.sqrt_score,
                clip_boxes=self.clip_boxes,
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
        detections = select_over_all_levels(
            self._candidates(outputs, locations, image_sizes),
            box_nms=self.box_nms,
            nms_thresh=self.nms_thresh,
            max_detections=self.max_detections_per_image,
        )
        for im_id, det in enumerate(detections):
            det.im_inds = torch.full_like(det.pred_classes, im_id)
            self._add_mask_head_params(outputs, det)
        return detections

    def _add_mask_head_params(self, outputs: HeadOutputs, instances: Instances) -> None:
        if self.fcos_head.controller is not None:
            instances.mask_head_params = self.fcos_head.controller_at(
                outputs.bbox_towers, instances.im_inds, instances.fpn_levels, instances.loc_inds
            )
