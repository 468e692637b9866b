"""ResNet + FPN with P6/P7 computed from P5 (FCOS / CondInst), registered as
`build_fcos_resnet_fpn_backbone`."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["build_fcos_resnet_fpn_backbone", "build_fcos_fpn"]


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN on cfg.MODEL.FPN.IN_FEATURES of a ResNet, plus cfg.MODEL.FCOS.TOP_LEVELS extra levels.

    With TOP_LEVELS = 2 (the default): p6 = conv3x3/s2(p5), p7 = conv3x3/s2(relu(p6)).
    """
    if cfg.MODEL.RESNETS.DEFORM_INTERVAL != 1 or any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "deformable convolutions (MODEL.RESNETS.DEFORM_INTERVAL / DEFORM_ON_PER_STAGE) are not "
            "supported by build_fcos_resnet_fpn_backbone"
        )
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return build_fcos_fpn(cfg, bottom_up)


def build_fcos_fpn(cfg, bottom_up: Backbone) -> FPN:
    """FPN on cfg.MODEL.FPN.IN_FEATURES of `bottom_up`, plus cfg.MODEL.FCOS.TOP_LEVELS levels
    computed from P5 (2: P6 and P7, 0: none)."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_levels = cfg.MODEL.FCOS.TOP_LEVELS
    if top_levels == 2:
        top_block = LastLevelP6P7(out_channels, out_channels, in_feature="p5")
    elif top_levels == 0:
        top_block = None
    else:
        raise ValueError(f"MODEL.FCOS.TOP_LEVELS must be 0 or 2, got {top_levels}")
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
