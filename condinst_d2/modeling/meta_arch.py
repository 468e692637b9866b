"""CondInst: preprocess -> backbone -> FCOS (+ controller) -> mask branch -> dynamic mask head ->
postprocess.

Shape shorthand: N: images, Hp x Wp: padded batch size, G: ground truths of one image,
P: positive locations, D: detections.
"""

import contextlib
import logging
from typing import ContextManager, Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import move_device_like
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import nn

from .boxinst_losses import BoxInstLoss
from .dynamic_mask_head import DiceMaskLoss, DynamicMaskHead, MaskLoss
from .fcos import FCOS
from .mask_branch import MaskBranch
from .mask_nms import mask_nms
from .postprocessing import postprocess

__all__ = ["CondInst"]

logger = logging.getLogger(__name__)

# At inference, the dynamic mask head takes at most this many mask feature values (channels x
# pixels x instances) per call. The outputs are the same as in one call; the temporaries stay
# in cache and below glibc's mmap threshold, whose page faults dominated the head's time for
# 100 instances at 800x1216 on the benchmark's CPU (106-160 ms in one call, 40-59 ms in calls of
# 5 to 50 instances).
MASK_HEAD_VALUES_PER_CALL = 2**21


def _cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX-512 or Arm bf16)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _warn_if_bf16_is_slow(cfg) -> None:
    if cfg.MODEL.CONDINST.BF16 and cfg.MODEL.DEVICE == "cpu" and not _cpu_has_bf16():
        logger.warning(
            "MODEL.CONDINST.BF16 is on, but this CPU has no bf16 arithmetic: training and "
            "inference will be several times slower than float32; set MODEL.CONDINST.BF16 False"
        )


def _check_condinst_config(cfg) -> None:
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "FCOS":
        raise ValueError(
            f"CondInst generates its instances with FCOS; MODEL.PROPOSAL_GENERATOR.NAME is "
            f"{cfg.MODEL.PROPOSAL_GENERATOR.NAME!r}"
        )
    ci = cfg.MODEL.CONDINST
    if ci.MAX_PROPOSALS != -1 and ci.TOPK_PROPOSALS_PER_IM != -1:
        raise ValueError(
            "MODEL.CONDINST.MAX_PROPOSALS and TOPK_PROPOSALS_PER_IM cannot both be set "
            f"(got {ci.MAX_PROPOSALS} and {ci.TOPK_PROPOSALS_PER_IM}); set one of them to -1"
        )
    if ci.BOTTOM_PIXELS_REMOVED != -1:
        raise ValueError(
            "MODEL.CONDINST.BOTTOM_PIXELS_REMOVED is unused and must be -1; BoxInst reads "
            "MODEL.BOXINST.BOTTOM_PIXELS_REMOVED"
        )
    if ci.MASK_HEAD.USE_FP16:
        raise ValueError(
            "MODEL.CONDINST.MASK_HEAD.USE_FP16 is not supported; use SOLVER.AMP instead"
        )


def _build_mask_loss(cfg) -> MaskLoss:
    """BoxInst's box supervision when MODEL.BOXINST.ENABLED, else CondInst's mask supervision."""
    if cfg.MODEL.BOXINST.ENABLED:
        return BoxInstLoss.from_config(cfg)
    return DiceMaskLoss(cfg.MODEL.CONDINST.MASK_OUT_STRIDE)


def _cat_images(per_image: List[Instances], image_size: Tuple[int, int]) -> Instances:
    """The instances of all images as one Instances of `image_size` (im_inds tell them apart)."""
    return Instances.cat([Instances(image_size, **x.get_fields()) for x in per_image])


def _cat_level_first(per_image: List[Instances], image_size: Tuple[int, int]) -> Instances:
    """All images' positives in the authors' batch order, (level, image, location): the subset
    MAX_PROPOSALS draws, and the float sums over instances, depend on it."""
    flat = _cat_images(per_image, image_size)
    return flat[torch.sort(flat.fpn_levels, stable=True).indices]


@META_ARCH_REGISTRY.register()
class CondInst(nn.Module):
    """Conditional convolutions for instance segmentation (Tian, Shen, Chen, ECCV 2020); with
    MODEL.BOXINST.ENABLED, BoxInst (the same model trained from boxes, CVPR 2021)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: FCOS,
        mask_branch: MaskBranch,
        mask_head: DynamicMaskHead,
        pixel_mean: List[float],
        pixel_std: List[float],
        max_proposals: int = -1,
        topk_proposals_per_im: int = -1,
        mask_nms: bool = False,
        mask_nms_thresh: float = 0.6,
        mask_nms_post_topk: int = 100,
        mask_threshold: float = 0.5,
        channels_last: bool = False,
        bf16: bool = False,
    ):
        """
        Args:
            proposal_generator: FCOS whose head holds a controller for `mask_head` (without box
                NMS when `mask_nms` is on).
            max_proposals: random subset of positives that train the mask head (-1: all).
            topk_proposals_per_im: per image, an even share per GT of the best positives (-1: off).
            mask_nms: NMS on mask IoU at `mask_nms_thresh`, keeping `mask_nms_post_topk` per
                image, replaces FCOS's box NMS.
            channels_last: at inference, feed the backbone channels-last images so that every conv
                runs in that layout, which cuDNN prefers (results equal up to rounding; on the
                benchmark's CPU a 256-channel conv was as fast in either layout). Training keeps
                the standard layout, whose gradients match the authors'.
            bf16: in training and at inference, run the dense convolutions (backbone, FPN,
                FCOS towers and predictors, mask branch) under bfloat16 autocast on the model's
                device; the losses, the decoding, the controller, the dynamic mask head and the
                paste run in float32. Faster only where the hardware has bf16 arithmetic
                (AVX-512-BF16, AMX, recent GPUs); outputs and gradients differ from float32's.
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.mask_branch = mask_branch
        self.mask_head = mask_head
        self.max_proposals = max_proposals
        self.topk_proposals_per_im = topk_proposals_per_im
        self.mask_nms = mask_nms
        self.mask_nms_thresh = mask_nms_thresh
        self.mask_nms_post_topk = mask_nms_post_topk
        self.mask_threshold = mask_threshold
        self.channels_last = channels_last
        self.bf16 = bf16
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        _check_condinst_config(cfg)
        _warn_if_bf16_is_slow(cfg)
        ci = cfg.MODEL.CONDINST
        backbone = build_backbone(cfg)
        mask_branch = MaskBranch(cfg, backbone.output_shape())
        mask_head = DynamicMaskHead(cfg, mask_branch, mask_loss=_build_mask_loss(cfg))
        fcos_overrides = {}
        if ci.MASK_NMS:
            # Mask NMS replaces box NMS: FCOS hands over its best candidates unsuppressed.
            fcos_overrides = {"box_nms": False, "max_detections_per_image": ci.MASK_NMS_PRE_TOPK}
        fcos = FCOS(
            cfg, backbone.output_shape(), num_dynamic_params=mask_head.num_params, **fcos_overrides
        )
        return {
            "backbone": backbone,
            "proposal_generator": fcos,
            "mask_branch": mask_branch,
            "mask_head": mask_head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_proposals": ci.MAX_PROPOSALS,
            "topk_proposals_per_im": ci.TOPK_PROPOSALS_PER_IM,
            "mask_nms": ci.MASK_NMS,
            "mask_nms_thresh": ci.MASK_NMS_TH,
            "mask_nms_post_topk": ci.MASK_NMS_POST_TOPK,
            "channels_last": ci.CHANNELS_LAST,
            "bf16": ci.BF16,
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
        if self.training:
            return self.forward_training(batched_inputs, images)
        with self.dense_precision():
            features = self.backbone(images.tensor)
            mask_feats, _ = self.mask_branch(features)
            detections, _ = self.proposal_generator(images, features)  # decoded in float32
        return self.forward_inference(batched_inputs, images, mask_feats.float(), detections)

    def dense_precision(self) -> ContextManager:
        """The context of the dense convolutions: bf16 autocast when `bf16`, else none, so that
        an autocast around the model (SOLVER.AMP's) still applies."""
        if self.bf16:
            return torch.autocast(self.device.type, torch.bfloat16)
        return contextlib.nullcontext()

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [move_device_like(x["image"], self.pixel_mean) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        if self.channels_last and not self.training:
            tensor = images.tensor.contiguous(memory_format=torch.channels_last)
            return ImageList(tensor, images.image_sizes)
        return images

    def forward_training(
        self, batched_inputs: List[Dict], images: ImageList
    ) -> Dict[str, torch.Tensor]:
        if "instances" not in batched_inputs[0]:
            raise ValueError("CondInst in training mode needs 'instances' in every input dict")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        padded_size = tuple(images.tensor.shape[-2:])
        self.mask_head.add_targets(gt_instances, batched_inputs, padded_size)
        with self.dense_precision():
            features = self.backbone(images.tensor)
            mask_feats, losses = self.mask_branch(features, gt_instances)
            positives, fcos_losses = self.proposal_generator(images, features, gt_instances)
        losses.update(fcos_losses)
        positives = self.select_mask_training_instances(positives, padded_size)
        losses.update(self.mask_head.loss(mask_feats.float(), positives, gt_instances))
        return losses

    def forward_inference(
        self,
        batched_inputs: List[Dict],
        images: ImageList,
        mask_feats: torch.Tensor,
        detections: List[Instances],
    ) -> List[Dict]:
        """The masks of FCOS's `detections` from `mask_feats` (N, Cm, h, w), pasted at each
        input's output size."""
        padded_size = tuple(images.tensor.shape[-2:])
        mask_probs = self.mask_probabilities(mask_feats, _cat_images(detections, padded_size))
        per_image = list(zip(detections, mask_probs.split([len(d) for d in detections])))
        if self.mask_nms:
            per_image = [self.suppress_by_mask_iou(det, probs) for det, probs in per_image]
        results = []
        for inputs, (det, probs) in zip(batched_inputs, per_image):
            height = inputs.get("height", det.image_size[0])
            width = inputs.get("width", det.image_size[1])
            result = postprocess(det, probs, padded_size, height, width, self.mask_threshold)
            results.append({"instances": result})
        return results

    def mask_probabilities(self, mask_feats: torch.Tensor, instances: Instances) -> torch.Tensor:
        """(D, 1, h*f, w*f) mask probabilities of D instances from `mask_feats` (N, Cm, h, w),
        the dynamic head run on a few instances at a time (MASK_HEAD_VALUES_PER_CALL)."""
        per_call = max(1, MASK_HEAD_VALUES_PER_CALL // mask_feats[0].numel())
        starts = range(0, max(len(instances), 1), per_call)  # one call for no instance
        chunks = [self.mask_head(mask_feats, instances[i : i + per_call]) for i in starts]
        return torch.cat(chunks).sigmoid()

    def suppress_by_mask_iou(
        self, detections: Instances, mask_probs: torch.Tensor
    ) -> Tuple[Instances, torch.Tensor]:
        """One image's D detections and (D, 1, hm, wm) mask probabilities after mask NMS (on
        the masks thresholded at the mask head's resolution)."""
        keep = mask_nms(
            mask_probs[:, 0] > self.mask_threshold,
            detections.scores,
            detections.pred_classes,
            self.mask_nms_thresh,
            self.mask_nms_post_topk,
        )
        return detections[keep], mask_probs[keep]

    def select_mask_training_instances(
        self, positives: List[Instances], padded_size: Tuple[int, int]
    ) -> Instances:
        """The positives that train the mask head (MAX_PROPOSALS / TOPK_PROPOSALS_PER_IM).

        Args:
            positives: each image's positive locations, from FCOS.
        Returns:
            The selected positives of all images, as one Instances of `padded_size`.
        """
        flat = _cat_level_first(positives, padded_size)
        if 0 <= self.max_proposals < len(flat):
            inds = torch.randperm(len(flat), device=flat.im_inds.device).long()
            return flat[inds[: self.max_proposals]]
        if self.topk_proposals_per_im == -1:
            return flat
        return _cat_images([self._top_positives(p) for p in positives], padded_size)

    def _top_positives(self, positives: Instances) -> Instances:
        """TOPK_PROPOSALS_PER_IM of one image: an even share per matched GT of its positives,
        ranked by sigmoid(cls) * sigmoid(ctr)."""
        if len(positives) == 0:
            return positives
        gt_inds = positives.gt_inds.unique()
        per_gt = max(int(self.topk_proposals_per_im / len(gt_inds)), 1)
        kept = []
        for gt_ind in gt_inds:
            candidates = positives[positives.gt_inds == gt_ind]
            if len(candidates) > per_gt:
                quality = candidates.logits_pred.sigmoid().max(dim=1).values
                quality = quality * candidates.ctrness_pred.sigmoid()
                candidates = candidates[quality.topk(k=per_gt, dim=0).indices]
            kept.append(candidates)
        return Instances.cat(kept)
