"""The key layout of mmdetection 3.x's CondInst checkpoints (`condinst_r50_fpn_*` of its model
zoo).

mmdetection saves `{"meta": ..., "state_dict": weights}` (`container` unwraps it). Its ResNet is
torchvision's (`layer{1..4}`, `bn*`, `downsample`), its FPN a list of lateral and output convs
(outputs 3 and 4 being P6 and P7), its FCOS towers `ConvModule`s of a conv and a GroupNorm (ours:
conv, GroupNorm, ReLU in one Sequential, hence the indices 3i and 3i + 1), and its per-level
scales 0-dim tensors where ours have shape (1,). Every module is otherwise the same computation;
the inference that differs is in the config (configs/CondInst/mmdet_R_50_1x.yaml).
"""

import torch

from .rename import KeyFormat

__all__ = ["MMDET"]

_RESNET = "backbone.bottom_up"
_HEAD = "proposal_generator.fcos_head"
_MASK_FEATURES = r"mask_head\.mask_feature_head"
# Convs per FCOS tower and in the mask branch of mmdetection's CondInst (stacked_convs,
# num_stacked_convs); keys of a deeper model would be reported as left over.
_NUM_CONVS = 4


def _as_1d(scale: torch.Tensor) -> torch.Tensor:
    """mmdetection's 0-dim per-level scale -> condinst_d2's shape (1,)."""
    return scale.reshape(1)


MMDET = KeyFormat(
    name="mmdet",
    description="mmdetection's CondInst",
    signature=r"bbox_head\.controller\.weight",
    container="state_dict",
    rules=(
        # BN update counters: FrozenBN has none (the mask branch's BN keeps its own, below).
        (r"backbone\..+\.num_batches_tracked", None),
        (r"backbone\.conv1\.weight", rf"{_RESNET}.stem.conv1.weight"),
        (r"backbone\.bn1\.(\w+)", rf"{_RESNET}.stem.conv1.norm.\1"),
        *(
            rule
            for stage in (1, 2, 3, 4)
            for rule in (
                (
                    rf"backbone\.layer{stage}\.(\d+)\.conv(\d)\.weight",
                    rf"{_RESNET}.res{stage + 1}.\1.conv\2.weight",
                ),
                (
                    rf"backbone\.layer{stage}\.(\d+)\.bn(\d)\.(\w+)",
                    rf"{_RESNET}.res{stage + 1}.\1.conv\2.norm.\3",
                ),
                (
                    rf"backbone\.layer{stage}\.(\d+)\.downsample\.0\.weight",
                    rf"{_RESNET}.res{stage + 1}.\1.shortcut.weight",
                ),
                (
                    rf"backbone\.layer{stage}\.(\d+)\.downsample\.1\.(\w+)",
                    rf"{_RESNET}.res{stage + 1}.\1.shortcut.norm.\2",
                ),
            )
        ),
        # FPN on C3-C5: lateral / output conv i is level i + 3; outputs 3, 4 are P6, P7.
        *(
            (rf"neck\.lateral_convs\.{i}\.conv\.(\w+)", rf"backbone.fpn_lateral{i + 3}.\1")
            for i in range(3)
        ),
        *(
            (rf"neck\.fpn_convs\.{i}\.conv\.(\w+)", rf"backbone.fpn_output{i + 3}.\1")
            for i in range(3)
        ),
        (r"neck\.fpn_convs\.3\.conv\.(\w+)", r"backbone.top_block.p6.\1"),
        (r"neck\.fpn_convs\.4\.conv\.(\w+)", r"backbone.top_block.p7.\1"),
        *(
            rule
            for theirs, ours in (("cls_convs", "cls_tower"), ("reg_convs", "bbox_tower"))
            for i in range(_NUM_CONVS)
            for rule in (
                (rf"bbox_head\.{theirs}\.{i}\.conv\.(\w+)", rf"{_HEAD}.{ours}.{3 * i}.\1"),
                (rf"bbox_head\.{theirs}\.{i}\.gn\.(\w+)", rf"{_HEAD}.{ours}.{3 * i + 1}.\1"),
            )
        ),
        (r"bbox_head\.conv_cls\.(\w+)", rf"{_HEAD}.cls_logits.\1"),
        (r"bbox_head\.conv_reg\.(\w+)", rf"{_HEAD}.bbox_pred.\1"),
        (r"bbox_head\.conv_centerness\.(\w+)", rf"{_HEAD}.ctrness.\1"),
        (r"bbox_head\.controller\.(\w+)", rf"{_HEAD}.controller.\1"),
        (r"bbox_head\.scales\.(\d+)\.scale", rf"{_HEAD}.scales.\1.scale", _as_1d),
        # Mask branch: level i's conv is named conv{i}; the tower's 1x1 predictor follows it.
        (
            rf"{_MASK_FEATURES}\.convs_all_levels\.(\d+)\.conv\1\.conv\.weight",
            r"mask_branch.refine.\1.0.weight",
        ),
        (
            rf"{_MASK_FEATURES}\.convs_all_levels\.(\d+)\.conv\1\.bn\.(\w+)",
            r"mask_branch.refine.\1.1.\2",
        ),
        (rf"{_MASK_FEATURES}\.conv_branch\.(\d+)\.conv\.weight", r"mask_branch.tower.\1.0.weight"),
        (rf"{_MASK_FEATURES}\.conv_branch\.(\d+)\.bn\.(\w+)", r"mask_branch.tower.\1.1.\2"),
        (rf"{_MASK_FEATURES}\.conv_pred\.(\w+)", rf"mask_branch.tower.{_NUM_CONVS}.\1"),
    ),
)
