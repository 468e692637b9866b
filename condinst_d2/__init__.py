"""condinst_d2: CondInst (Tian, Shen, Chen, ECCV 2020) for Detectron2.

Importing the package registers `CondInst` (META_ARCH_REGISTRY), `FCOS`
(PROPOSAL_GENERATOR_REGISTRY) and `build_fcos_resnet_fpn_backbone` (BACKBONE_REGISTRY).
"""

from . import checkpoint  # noqa: F401  (registers the efficientnet-lite0:// weights path with PathManager)
from .classes import get_class_names, inference_config
from .config import add_condinst_config, get_condinst_cfg
from .modeling import (
    FCOS,
    CondInst,
    DynamicMaskHead,
    FCOSHead,
    MaskBranch,
    build_fcos_efficientnet_lite0_fpn_backbone,
    build_fcos_resnet_fpn_backbone,
)
from .predictor import Prediction, Predictor

__version__ = "0.1.0"

__all__ = [
    "add_condinst_config",
    "get_class_names",
    "get_condinst_cfg",
    "inference_config",
    "build_fcos_efficientnet_lite0_fpn_backbone",
    "build_fcos_resnet_fpn_backbone",
    "CondInst",
    "DynamicMaskHead",
    "FCOS",
    "FCOSHead",
    "MaskBranch",
    "Prediction",
    "Predictor",
]
