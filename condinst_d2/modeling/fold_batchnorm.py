"""Folding batch normalisation into the convolution before it, for inference.

At inference a FrozenBatchNorm2d (the ResNet and EfficientNet backbones) or a BatchNorm2d in eval
mode (the mask branch) is the per-channel affine map y = x * scale + shift, so
norm(conv(x)) = conv'(x) with weight' = weight * scale and bias' = bias * scale + shift. The
folded model computes the same function (up to float rounding) with one pass less over every
normalised activation.
"""

from typing import Optional, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .efficientnet import ConvNorm

__all__ = ["fold_batchnorm"]


def _affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) (C,) in float64 of a norm that is a fixed affine map, else None."""
    if isinstance(norm, FrozenBatchNorm2d):
        weight, bias = norm.weight, norm.bias
    elif isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats:
        ones = torch.ones_like(norm.running_mean)
        weight = norm.weight if norm.affine else ones
        bias = norm.bias if norm.affine else ones * 0
    else:
        return None
    scale = weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
    return scale, bias.double() - norm.running_mean.double() * scale


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """conv <- (x -> conv(x) * scale + shift), scale and shift (C_out,)."""
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    conv.weight.copy_(weight.to(conv.weight.dtype))
    conv.bias = nn.Parameter(
        (bias * scale + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad
    )


def _fold_pair(conv: nn.Module, norm: nn.Module) -> bool:
    """Folds `norm` into `conv` when it can; whether it did."""
    affine = _affine(norm) if isinstance(conv, nn.Conv2d) else None
    if affine is not None:
        _fold_into(conv, *affine)
    return affine is not None


def fold_batchnorm(model: nn.Module) -> int:
    """Folds, in place, every frozen or eval-mode batch norm that directly follows a conv into
    that conv, for inference: a detectron2 `Conv2d`'s own `norm`, an EfficientNet `ConvNorm`'s, and
    a norm right after a conv in an `nn.Sequential`. Other norms (GroupNorm, a BatchNorm in
    training mode) are left as they are.

    The model is then for inference only: its state dict has no norm entries any more, and
    training it would not train the norms it had.

    Args:
        model: a model in eval mode.
    Returns:
        The number of norms folded.
    Raises:
        ValueError: the model is in training mode.
    """
    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first")
    folded = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "norm", None), nn.Module):
            if _fold_pair(module, module.norm):  # detectron2's Conv2d: conv, then its norm
                module.norm, folded = None, folded + 1
        elif isinstance(module, ConvNorm) and _fold_pair(module.conv, module.norm):
            module.norm, folded = nn.Identity(), folded + 1
        elif isinstance(module, nn.Sequential):
            for i in range(1, len(module)):
                conv = module[i - 1]
                # A detectron2 Conv2d with its own norm or activation is not followed by its output.
                plain = (
                    getattr(conv, "norm", None) is None
                    and getattr(conv, "activation", None) is None
                )
                if plain and _fold_pair(conv, module[i]):
                    module[i], folded = nn.Identity(), folded + 1
    return folded
