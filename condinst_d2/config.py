"""Config keys of FCOS, CondInst and BoxInst, with the defaults of the authors' implementation.

`add_condinst_config` adds them to a given config; Detectron2's global defaults are never touched.
Keys that exist only so that the authors' YAMLs merge unchanged are accepted, and values this
implementation does not provide are rejected with a clear error when the model is built.
"""

import logging
from typing import Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_condinst_config", "get_condinst_cfg"]

logger = logging.getLogger(__name__)


def _add_fcos_config(cfg: CN) -> None:
    cfg.MODEL.FCOS = CN()
    _C = cfg.MODEL.FCOS
    _C.NUM_CLASSES = 80  # foreground classes
    # Their names, in class-index order; recorded by training (condinst_d2.classes). [] = unknown.
    _C.CLASS_NAMES = []
    _C.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]  # backbone outputs the head runs on
    _C.FPN_STRIDES = [8, 16, 32, 64, 128]  # stride of each IN_FEATURES level
    _C.PRIOR_PROB = 0.01  # initial foreground probability of the classifier (bias init)
    _C.INFERENCE_TH_TEST = 0.05  # candidate score threshold at inference
    _C.NMS_TH = 0.6  # IoU threshold of the class-aware box NMS
    _C.PRE_NMS_TOPK_TEST = 1000  # candidates kept per level and image before NMS
    _C.POST_NMS_TOPK_TEST = 100  # detections kept per image after NMS
    _C.PRE_NMS_TOPK_WITH_CTR = True  # rank candidates by cls*ctr (authors) or cls (mmdetection)
    _C.SQRT_SCORE = True  # detection score sqrt(cls*ctr) (authors) or cls*ctr (mmdetection)
    _C.CLIP_BOXES_BEFORE_NMS = False  # clip to the image, drop empty boxes, then NMS (mmdetection)
    # Ignored: FCOS decodes no detections in training. Accepted so the authors' YAMLs merge.
    _C.INFERENCE_TH_TRAIN = 0.05
    _C.PRE_NMS_TOPK_TRAIN = 1000
    _C.POST_NMS_TOPK_TRAIN = 100
    _C.TOP_LEVELS = 2  # extra FPN levels computed from P5: 2 = P6+P7, 0 = none
    _C.NORM = "GN"  # norm of the head towers: "GN" or "none"
    _C.USE_SCALE = True  # a learnable scalar per level multiplies the box regression
    _C.BOX_QUALITY = "ctrness"  # box quality branch; only "ctrness" is implemented
    _C.THRESH_WITH_CTR = False  # threshold cls*ctr (True) instead of cls alone (False)
    _C.LOSS_ALPHA = 0.25  # focal loss alpha
    _C.LOSS_GAMMA = 2.0  # focal loss gamma
    _C.LOSS_NORMALIZER_CLS = "fg"  # classification loss normaliser; only "fg" is implemented
    _C.LOSS_WEIGHT_CLS = 1.0  # weight of loss_fcos_cls
    _C.SIZES_OF_INTEREST = [64, 128, 256, 512]  # upper bounds of max(l,t,r,b) per level (pixels)
    _C.USE_RELU = True  # relu on the regression output (improved FCOS); exp when False
    _C.USE_DEFORMABLE = False  # deformable tower convs; unavailable (no compiled ops)
    _C.NUM_CLS_CONVS = 4  # convs in the classification tower
    _C.NUM_BOX_CONVS = 4  # convs in the box tower
    _C.NUM_SHARE_CONVS = 0  # convs shared by both towers, run before them
    _C.CENTER_SAMPLE = True  # positives only near the GT's mask centroid
    _C.POS_RADIUS = 1.5  # center sampling radius, in units of the level's stride
    # Training: also log each FCOS loss split by FPN level, and the positives per level, as
    # fcos_<level>/<loss> and fcos_<level>/num_pos (metrics.json): where the detector's loss stalls
    _C.LOG_LEVEL_LOSSES = False
    _C.LOC_LOSS_TYPE = "giou"  # box loss: "giou", "iou" (-log IoU) or "linear_iou" (1 - IoU)
    _C.YIELD_PROPOSAL = False  # used by other models of the authors' codebase; must stay False
    _C.YIELD_BOX_FEATURES = False  # used by other models of the authors' codebase; must stay False


def _add_condinst_config(cfg: CN) -> None:
    cfg.MODEL.CONDINST = CN()
    _C = cfg.MODEL.CONDINST
    _C.MASK_OUT_STRIDE = 4  # stride of the mask head's output (mask loss resolution)
    _C.BOTTOM_PIXELS_REMOVED = (
        -1
    )  # unused in the authors' code (BoxInst reads its own); must stay -1
    _C.MAX_PROPOSALS = -1  # random subset of positives that train the mask head (-1 = all)
    _C.TOPK_PROPOSALS_PER_IM = -1  # per-image top-k positives by score (-1 = off)
    _C.MASK_NMS = False  # NMS on mask IoU instead of box IoU at inference (paper Table 5)
    _C.MASK_NMS_TH = 0.6  # mask IoU threshold of the mask NMS
    _C.MASK_NMS_PRE_TOPK = 1000  # best FCOS candidates per image (no box NMS) given to mask NMS
    _C.MASK_NMS_POST_TOPK = 100  # detections kept per image after mask NMS
    _C.CHANNELS_LAST = (
        True  # inference in channels-last layout (equal up to rounding; False: bit-exact)
    )
    # Predictor: fold frozen / eval-mode batch norms into their convs (equal up to rounding, which
    # can swap near-tied detections; off: the authors' outputs)
    _C.FOLD_BATCHNORM = False
    # training and inference: backbone, FPN, FCOS towers and mask branch under bfloat16 autocast
    # (losses, decoding and masks in float32); faster only with bf16 hardware (AVX-512-BF16 / AMX
    # CPUs, recent GPUs)
    _C.BF16 = False

    _C.MASK_HEAD = CN()
    _C.MASK_HEAD.CHANNELS = 8  # channels of the dynamic mask head's hidden layers
    _C.MASK_HEAD.NUM_LAYERS = 3  # 1x1 convs in the dynamic mask head
    _C.MASK_HEAD.USE_FP16 = False  # accepted for the authors' YAMLs; must stay False
    _C.MASK_HEAD.DISABLE_REL_COORDS = False  # drop the relative coordinates from the input

    _C.MASK_BRANCH = CN()
    _C.MASK_BRANCH.OUT_CHANNELS = 8  # channels of the mask features fed to the dynamic head
    _C.MASK_BRANCH.IN_FEATURES = ["p3", "p4", "p5"]  # FPN levels fused by the mask branch
    _C.MASK_BRANCH.CHANNELS = 128  # width of the mask branch
    _C.MASK_BRANCH.NORM = "BN"  # norm of the mask branch convs
    _C.MASK_BRANCH.NUM_CONVS = 4  # 3x3 convs after the fusion
    _C.MASK_BRANCH.SEMANTIC_LOSS_ON = False  # auxiliary semantic segmentation loss (training)


def _add_boxinst_config(cfg: CN) -> None:
    cfg.MODEL.BOXINST = CN()
    _C = cfg.MODEL.BOXINST
    _C.ENABLED = False  # BoxInst: learn the masks from the GT boxes (projection + pairwise losses)
    _C.BOTTOM_PIXELS_REMOVED = (
        10  # rows at the image bottom left out of the colour pairs (<= 0: none)
    )

    _C.PAIRWISE = CN()
    _C.PAIRWISE.SIZE = 3  # side of the (odd) neighbourhood of the pairwise loss
    _C.PAIRWISE.DILATION = 2  # dilation of that neighbourhood, at the mask resolution
    _C.PAIRWISE.WARMUP_ITERS = (
        10000  # iterations over which the pairwise loss ramps up to full weight
    )
    _C.PAIRWISE.COLOR_THRESH = 0.3  # colour similarity from which a pair of pixels is supervised


def _add_efficientnet_config(cfg: CN) -> None:
    cfg.MODEL.EFFICIENTNET = CN()
    _C = cfg.MODEL.EFFICIENTNET
    _C.NORM = "FrozenBN"  # norm of the EfficientNet-Lite0 backbone: "FrozenBN", "BN" or "SyncBN"
    # Its ImageNet weights load as MODEL.WEIGHTS "efficientnet-lite0://imagenet" (not at build).


def add_condinst_config(cfg: CN) -> None:
    """Adds the MODEL.FCOS, MODEL.CONDINST, MODEL.BOXINST and MODEL.EFFICIENTNET keys to `cfg`
    (in place)."""
    _add_fcos_config(cfg)
    _add_condinst_config(cfg)
    _add_boxinst_config(cfg)
    _add_efficientnet_config(cfg)
    # Deformable conv every N blocks, in the authors' codebase; accepted, must stay 1 (off).
    cfg.MODEL.RESNETS.DEFORM_INTERVAL = 1
    # Replaced by the wider MODEL.CONDINST.BF16; configs saved before still load (ignored, warned).
    cfg.register_deprecated_key("MODEL.CONDINST.BF16_BACKBONE")


def get_condinst_cfg(config_file: str, opts: Sequence[str] = ()) -> CN:
    """Detectron2's defaults + condinst_d2's keys, then `config_file`, then `opts` (KEY VALUE ...).

    Without CUDA, a config that asks for a GPU runs on the CPU (logged). The result is not frozen.
    """
    cfg = get_cfg()
    add_condinst_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info(
            "CUDA is not available: running on the CPU (MODEL.DEVICE %s -> cpu)", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    return cfg
