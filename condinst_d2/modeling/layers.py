"""Small tensor helpers shared by the FCOS and CondInst modules (each exists only here)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm

__all__ = ["aligned_bilinear", "compute_locations", "reduce_sum"]


def aligned_bilinear(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsamples (N, C, H, W) to (N, C, factor*H, factor*W) keeping pixel centres aligned.

    Output pixel (i, j) samples input position ((i - factor//2) / factor, ...) clamped to the
    border, i.e. input pixel k's centre lands on output pixel k*factor + factor//2, which is how
    stride-s features (sampled at k*s + s//2) map onto a finer grid.
    """
    if tensor.dim() != 4:
        raise ValueError(f"aligned_bilinear expects (N, C, H, W), got shape {tuple(tensor.shape)}")
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_bilinear needs a positive integer factor, got {factor}")
    factor = int(factor)
    if factor == 1:
        return tensor
    h, w = tensor.shape[2:]
    tensor = F.pad(tensor, pad=(0, 1, 0, 1), mode="replicate")
    oh, ow = factor * h + 1, factor * w + 1
    tensor = F.interpolate(tensor, size=(oh, ow), mode="bilinear", align_corners=True)
    tensor = F.pad(tensor, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return tensor[:, :, : oh - 1, : ow - 1]


def compute_locations(h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """Image coordinates of the centres of an (h, w) feature map of the given stride.

    Returns:
        (h*w, 2) float32 (x, y), row-major: index i*w + j is (j*stride + stride//2, i*stride + ...).
    """
    xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1) + stride // 2


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a copy; the input is left as it is)."""
    if comm.get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
