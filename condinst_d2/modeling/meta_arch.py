"""CondInst: preprocess -> backbone -> FCOS (+ controller) -> mask branch -> dynamic mask head ->
postprocess.

Shape shorthand: N: images, Hp x Wp: padded batch size, G: ground truths of one image,
P: positive locations, D: detections.
"""
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import move_device_like
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances, PolygonMasks, polygons_to_bitmask
from torch import nn

from ..checkpoint.authors import rename_authors_keys
from .dynamic_mask_head import DynamicMaskHead
from .mask_branch import MaskBranch
from .mask_nms import mask_nms
from .postprocessing import postprocess

__all__ = ["CondInst"]

logger = logging.getLogger(__name__)


def _check_condinst_config(cfg) -> None:
    ci = cfg.MODEL.CONDINST
    if ci.MAX_PROPOSALS != -1 and ci.TOPK_PROPOSALS_PER_IM != -1:
        raise ValueError(
            "MODEL.CONDINST.MAX_PROPOSALS and TOPK_PROPOSALS_PER_IM cannot both be set "
            f"(got {ci.MAX_PROPOSALS} and {ci.TOPK_PROPOSALS_PER_IM}); set one of them to -1"
        )
    if ci.BOTTOM_PIXELS_REMOVED != -1:
        raise ValueError("MODEL.CONDINST.BOTTOM_PIXELS_REMOVED is a BoxInst option; it must be -1")
    if ci.MASK_HEAD.USE_FP16:
        raise ValueError("MODEL.CONDINST.MASK_HEAD.USE_FP16 is not supported; use SOLVER.AMP instead")


@META_ARCH_REGISTRY.register()
class CondInst(nn.Module):
    """Conditional convolutions for instance segmentation (Tian, Shen, Chen, ECCV 2020)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        mask_branch: MaskBranch,
        mask_head: DynamicMaskHead,
        pixel_mean: List[float],
        pixel_std: List[float],
        max_proposals: int = -1,
        topk_proposals_per_im: int = -1,
        mask_nms_thresh: Optional[float] = None,
        post_nms_topk: int = 100,
        mask_threshold: float = 0.5,
        channels_last: bool = False,
    ):
        """
        Args:
            proposal_generator: FCOS whose head holds a controller for `mask_head`.
            max_proposals: random subset of positives that train the mask head (-1: all).
            topk_proposals_per_im: per image, an even share per GT of the best positives (-1: off).
            channels_last: at inference, feed the backbone channels-last images so that every conv
                runs in that layout, which cuDNN prefers (results equal up to rounding; on the
                benchmark's CPU a 256-channel conv was as fast in either layout). Training keeps
                the standard layout, whose gradients match the authors'.
            mask_nms_thresh: if set, NMS on mask IoU at this threshold replaces FCOS's box NMS
                (FCOS then hands over its best candidates unsuppressed) and keeps `post_nms_topk`.
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.mask_branch = mask_branch
        self.mask_head = mask_head
        self.max_proposals = max_proposals
        self.topk_proposals_per_im = topk_proposals_per_im
        self.mask_nms_thresh = mask_nms_thresh
        self.post_nms_topk = post_nms_topk
        self.mask_threshold = mask_threshold
        self.channels_last = channels_last
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        _check_condinst_config(cfg)
        backbone = build_backbone(cfg)
        mask_head = DynamicMaskHead(cfg)
        generator = PROPOSAL_GENERATOR_REGISTRY.get(cfg.MODEL.PROPOSAL_GENERATOR.NAME)
        ci, fcos = cfg.MODEL.CONDINST, cfg.MODEL.FCOS
        # With mask NMS, FCOS skips box NMS and hands over up to PRE_NMS_TOPK_TEST candidates.
        no_box_nms = {"nms_thresh": 0.0, "post_nms_topk": (fcos.POST_NMS_TOPK_TRAIN, fcos.PRE_NMS_TOPK_TEST)}
        return {
            "backbone": backbone,
            "proposal_generator": generator(
                cfg,
                backbone.output_shape(),
                num_dynamic_params=mask_head.num_params,
                **(no_box_nms if ci.MASK_NMS else {}),
            ),
            "mask_branch": MaskBranch(cfg, backbone.output_shape()),
            "mask_head": mask_head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_proposals": ci.MAX_PROPOSALS,
            "topk_proposals_per_im": ci.TOPK_PROPOSALS_PER_IM,
            "mask_nms_thresh": fcos.NMS_TH if ci.MASK_NMS else None,
            "post_nms_topk": fcos.POST_NMS_TOPK_TEST,
            "channels_last": ci.CHANNELS_LAST,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts with "image" (C, H, W) in INPUT.FORMAT,
                optional "height"/"width" (output size) and, in training, "instances".
        Returns:
            Training: dict of losses. Inference: [{"instances": Instances}] per input, with
            pred_boxes, scores, pred_classes and pred_masks (D, H, W) bool.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            return self.forward_training(batched_inputs, images, features)
        return self.forward_inference(batched_inputs, images, features)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [move_device_like(x["image"], self.pixel_mean) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        if self.channels_last and not self.training:
            return ImageList(images.tensor.contiguous(memory_format=torch.channels_last), images.image_sizes)
        return images

    def forward_training(self, batched_inputs, images: ImageList, features) -> Dict[str, torch.Tensor]:
        if "instances" not in batched_inputs[0]:
            raise ValueError("CondInst in training mode needs 'instances' in every input dict")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        self.add_bitmasks(gt_instances, images.tensor.shape[-2:])
        mask_feats, losses = self.mask_branch(features, gt_instances)
        positives, fcos_losses = self.proposal_generator(images, features, gt_instances)
        losses.update(fcos_losses)
        positives = self.select_mask_training_instances(positives, len(gt_instances))
        gt_bitmasks = torch.cat([gt.gt_bitmasks for gt in gt_instances])
        losses["loss_mask"] = self.mask_head.loss(
            mask_feats, self.mask_branch.out_stride, positives, gt_bitmasks
        )
        return losses

    def forward_inference(self, batched_inputs, images: ImageList, features) -> List[Dict]:
        mask_feats, _ = self.mask_branch(features)
        detections, _ = self.proposal_generator(images, features)
        flat = Instances(images.tensor.shape[-2:])
        for name in ("im_inds", "locations", "fpn_levels", "mask_head_params"):
            flat.set(name, torch.cat([d.get(name) for d in detections]))
        mask_probs = self.mask_head(mask_feats, self.mask_branch.out_stride, flat).sigmoid()
        mask_probs = list(mask_probs.split([len(d) for d in detections]))
        if self.mask_nms_thresh is not None:
            for i, (det, probs) in enumerate(zip(detections, mask_probs)):
                keep = mask_nms(
                    probs[:, 0] > self.mask_threshold,
                    det.scores,
                    det.pred_classes,
                    self.mask_nms_thresh,
                    self.post_nms_topk,
                )
                detections[i], mask_probs[i] = det[keep], probs[keep]
        results = []
        for inputs, det, probs in zip(batched_inputs, detections, mask_probs):
            height = inputs.get("height", det.image_size[0])
            width = inputs.get("width", det.image_size[1])
            result = postprocess(
                det, probs, images.tensor.shape[-2:], height, width, self.mask_threshold
            )
            results.append({"instances": result})
        return results

    def select_mask_training_instances(self, positives: Instances, num_images: int) -> Instances:
        """The positives that train the mask head (MAX_PROPOSALS / TOPK_PROPOSALS_PER_IM)."""
        if 0 <= self.max_proposals < len(positives):
            inds = torch.randperm(len(positives), device=positives.im_inds.device).long()
            return positives[inds[: self.max_proposals]]
        if self.topk_proposals_per_im == -1:
            return positives
        kept = []
        for im_id in range(num_images):
            per_image = positives[positives.im_inds == im_id]
            if len(per_image) == 0:
                continue
            gt_inds = per_image.gt_inds.unique()
            per_gt = max(int(self.topk_proposals_per_im / len(gt_inds)), 1)
            for gt_ind in gt_inds:
                candidates = per_image[per_image.gt_inds == gt_ind]
                if len(candidates) > per_gt:
                    quality = candidates.logits_pred.sigmoid().max(dim=1).values
                    quality = quality * candidates.ctrness_pred.sigmoid()
                    candidates = candidates[quality.topk(k=per_gt, dim=0).indices]
                kept.append(candidates)
        return Instances.cat(kept) if kept else positives[:0]

    def add_bitmasks(self, gt_instances: List[Instances], padded_size) -> None:
        """Adds gt_bitmasks_full (G, Hp, Wp) uint8 on the padded canvas and gt_bitmasks
        (G, Hp/s, Wp/s) sampled at [s//2::s], s = the mask head's output stride."""
        stride = self.mask_head.mask_out_stride
        h, w = padded_size
        for gt in gt_instances:
            if not gt.has("gt_masks"):
                if len(gt) > 0:
                    raise ValueError("CondInst needs gt_masks in training instances (set MODEL.MASK_ON)")
                # Detectron2's mapper leaves gt_masks out for an image without annotations.
                gt.gt_masks = PolygonMasks([])
            masks = gt.gt_masks
            if isinstance(masks, PolygonMasks):
                full = [polygons_to_bitmask(p, h, w) for p in masks.polygons]
                full = torch.from_numpy(np.stack(full)) if full else torch.zeros((0, h, w), dtype=torch.bool)
                full = full.to(device=self.device, dtype=torch.uint8)
            else:
                tensor = masks.tensor.to(torch.uint8)
                full = F.pad(tensor, (0, w - tensor.shape[2], 0, h - tensor.shape[1]))
            gt.gt_bitmasks_full = full
            gt.gt_bitmasks = full[:, stride // 2 :: stride, stride // 2 :: stride]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The authors' checkpoints keep the controller beside the FCOS head; ours keeps it inside.
        rename_authors_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
