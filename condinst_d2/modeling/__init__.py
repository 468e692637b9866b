"""Importing this package registers the backbone, proposal generator and meta-architecture."""

from .backbone import build_fcos_resnet_fpn_backbone
from .dynamic_mask_head import DynamicMaskHead
from .efficientnet import build_fcos_efficientnet_lite0_fpn_backbone
from .fcos import FCOS, FCOSHead
from .mask_branch import MaskBranch
from .meta_arch import CondInst

__all__ = [
    "build_fcos_efficientnet_lite0_fpn_backbone",
    "build_fcos_resnet_fpn_backbone",
    "CondInst",
    "DynamicMaskHead",
    "FCOS",
    "FCOSHead",
    "MaskBranch",
]
