"""Dynamic mask head: parameter layout, relative coordinates, the 1x1-conv chain and its loss."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Instances

from condinst_d2.modeling.dynamic_mask_head import (
    DynamicMaskHead,
    pack_dynamic_params,
    parse_dynamic_params,
    relative_coordinates,
)
from condinst_d2.modeling.layers import aligned_bilinear
from condinst_d2.modeling.mask_branch import MaskBranch

from helpers import small_cfg

SOI = [64, 128, 256, 512, 1024]


def _head(in_channels=2, channels=3, num_layers=2, mask_out_stride=8, disable_rel_coords=False):
    """A head on mask features of stride 8."""
    return DynamicMaskHead(
        in_channels=in_channels,
        mask_feat_stride=8,
        channels=channels,
        num_layers=num_layers,
        mask_out_stride=mask_out_stride,
        sizes_of_interest=SOI,
        disable_rel_coords=disable_rel_coords,
    )


def _instances(params, im_inds, locations, fpn_levels, gt_inds=None):
    inst = Instances((64, 64))
    inst.mask_head_params = params
    inst.im_inds = torch.tensor(im_inds, dtype=torch.long)
    inst.locations = torch.tensor(locations, dtype=torch.float32).reshape(-1, 2)
    inst.fpn_levels = torch.tensor(fpn_levels, dtype=torch.long)
    if gt_inds is not None:
        inst.gt_inds = torch.tensor(gt_inds, dtype=torch.long)
    return inst


def _pack(w0, w1, b0, b1):
    """One instance's parameters of a 2-layer head, from nested lists (out x in, out)."""
    weights = [torch.tensor(w, dtype=torch.float32)[None] for w in (w0, w1)]
    biases = [torch.tensor(b, dtype=torch.float32)[None] for b in (b0, b1)]
    return pack_dynamic_params(weights, biases)[0]


def test_num_params():
    assert _head(8, 8, 3).num_params == 169
    assert _head(4, 16, 4).num_params == 673
    assert _head(8, 8, 3, disable_rel_coords=True).num_params == 8 * 8 + 8 * 8 + 8 + 17
    assert _head(8, 8, 3).weight_nums == [80, 64, 8] and _head(8, 8, 3).bias_nums == [8, 8, 1]


def test_parse_dynamic_params_layout():
    head = _head(8, 8, 3)
    params = torch.arange(2 * 169, dtype=torch.float32).reshape(2, 169)
    weights, biases = parse_dynamic_params(params, head.weight_nums, head.bias_nums)
    assert [tuple(w.shape) for w in weights] == [(2, 8, 10), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8, 1), (2, 8, 1), (2, 1, 1)]
    ar = lambda a, b: torch.arange(a, b, dtype=torch.float32)  # noqa: E731
    assert torch.equal(weights[0][0], ar(0, 80).reshape(8, 10))
    assert torch.equal(weights[1][0], ar(80, 144).reshape(8, 8))
    assert torch.equal(weights[2][0], ar(144, 152).reshape(1, 8))
    assert torch.equal(biases[0][0], ar(152, 160).reshape(8, 1))
    assert torch.equal(biases[1][0], ar(160, 168).reshape(8, 1))
    assert torch.equal(biases[2][0], torch.tensor([[168.0]]))
    assert torch.equal(weights[0][1], ar(169, 249).reshape(8, 10))
    assert torch.equal(biases[2][1], torch.tensor([[337.0]]))


def test_pack_is_the_inverse_of_parse():
    head = _head(8, 8, 3)
    params = torch.randn((3, 169), generator=torch.Generator().manual_seed(0))
    weights, biases = parse_dynamic_params(params, head.weight_nums, head.bias_nums)
    assert torch.equal(pack_dynamic_params(weights, biases), params)
    # biases may also be given as (R, out)
    assert torch.equal(pack_dynamic_params(weights, [b[:, :, 0] for b in biases]), params)
    assert torch.equal(_pack([[1, 2], [3, 4]], [[5, 6]], [7, 8], [9]), torch.arange(1.0, 10.0))


def test_built_from_the_mask_branch():
    cfg = small_cfg(**{"MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS": 4})
    shapes = {f: ShapeSpec(channels=16, stride=s) for f, s in (("p3", 8), ("p4", 16), ("p5", 32))}
    head = DynamicMaskHead(cfg, MaskBranch(cfg, shapes))
    assert (head.in_channels, head.mask_feat_stride, head.mask_out_stride) == (4, 8, 4)
    assert head.weight_nums[0] == 8 * (4 + 2)
    assert head.sizes_of_interest == SOI


def test_parse_dynamic_params_wrong_width():
    head = _head(8, 8, 3)
    with pytest.raises(ValueError):
        parse_dynamic_params(torch.zeros((2, 168)), head.weight_nums, head.bias_nums)
    with pytest.raises(ValueError):
        parse_dynamic_params(torch.zeros(169), head.weight_nums, head.bias_nums)


def test_relative_coordinates():
    inst_locs = torch.tensor([[10.0, 20.0], [0.0, 0.0]])
    grid = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    out = relative_coordinates(inst_locs, grid, torch.tensor([8.0, 2.0]))
    expected = torch.tensor([[[0.75, -0.25], [2.0, 2.0]], [[-2.0, -6.0], [-2.0, -2.0]]])
    torch.testing.assert_close(out, expected)


def test_forward_relu_between_layers_none_after_last():
    # Inputs: [rel_x, rel_y, f0, f1]. Hidden: relu(f), relu(-f), 0 (f = f0 for instance 0, f1 for
    # instance 1). Output: relu(f) + relu(-f) - 1 = |f| - 1, negative where |f| < 1.
    head = _head()
    p0 = _pack([[0, 0, 1, 0], [0, 0, -1, 0], [0, 0, 0, 0]], [[1, 1, 0]], [0, 0, 0], [-1])
    p1 = _pack([[0, 0, 0, 1], [0, 0, 0, -1], [0, 0, 0, 0]], [[1, 1, 0]], [0, 0, 0], [-1])
    feats = torch.tensor(
        [
            [[[0.5, -2.0, 3.0], [-0.25, 0.0, 1.5]], [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]],
            [[[7.0, 7.0, 7.0], [7.0, 7.0, 7.0]], [[-0.5, 2.0, -3.0], [0.75, 1.0, -1.5]]],
        ]
    )
    inst = _instances(torch.stack([p0, p1]), [0, 1], [[0, 0], [0, 0]], [0, 0])
    out = head(feats, inst)
    expected = torch.stack([feats[0, 0].abs() - 1, feats[1, 1].abs() - 1])[:, None]
    assert out.shape == (2, 1, 2, 3)
    torch.testing.assert_close(out, expected)


def test_forward_relative_coordinates_x_first_scaled_by_level():
    # Instance 0 outputs rel_x (relu(x) - relu(-x)), instance 1 outputs rel_y.
    head = _head()
    px = _pack([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 0]], [[1, -1, 0]], [0, 0, 0], [0])
    py = _pack([[0, 1, 0, 0], [0, -1, 0, 0], [0, 0, 0, 0]], [[1, -1, 0]], [0, 0, 0], [0])
    feats = torch.randn((2, 2, 2, 3), generator=torch.Generator().manual_seed(0))
    inst = _instances(torch.stack([px, py]), [0, 1], [[100, 36], [40, 200]], [0, 2])
    out = head(feats, inst)
    # grid: x = 4, 12, 20 (columns), y = 4, 12 (rows); s = 64 for P3, 256 for P5
    rel_x = torch.tensor([[96.0, 88.0, 80.0], [96.0, 88.0, 80.0]]) / 64
    rel_y = torch.tensor([[196.0, 196.0, 196.0], [188.0, 188.0, 188.0]]) / 256
    torch.testing.assert_close(out, torch.stack([rel_x, rel_y])[:, None])


def test_forward_without_rel_coords():
    head = _head(disable_rel_coords=True)  # inputs [f0, f1] only
    assert head.num_params == 2 * 3 + 3 + 3 + 1
    params = _pack([[0, 1], [0, -1], [0, 0]], [[1, 1, 0]], [0, 0, 0], [0.5])
    feats = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]]])
    out = head(feats, _instances(params[None], [0], [[0, 0]], [0]))
    torch.testing.assert_close(out, torch.tensor([[[[3.5, 4.5]]]]))  # |f1| + 0.5


def test_output_size_and_upsampling():
    head = _head(mask_out_stride=4)
    const = _pack([[0] * 4] * 3, [[0, 0, 0]], [0, 0, 0], [2.5])
    feats = torch.randn((1, 2, 3, 5), generator=torch.Generator().manual_seed(0))
    out = head(feats, _instances(torch.stack([const, const]), [0, 0], [[0, 0], [8, 8]], [0, 1]))
    assert out.shape == (2, 1, 6, 10)
    torch.testing.assert_close(out, torch.full((2, 1, 6, 10), 2.5))
    # factor 2 is aligned_bilinear x2 of the stride-8 result
    px = _pack([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 0]], [[1, -1, 0]], [0, 0, 0], [0])
    inst = _instances(px[None], [0], [[30, 10]], [0])
    low = _head(mask_out_stride=8)(feats, inst)
    torch.testing.assert_close(head(feats, inst), aligned_bilinear(low, 2))


def test_stride_mismatch_and_bad_params_raise():
    feats = torch.randn((1, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    for mask_out_stride in (3, 16, 0):  # must divide the mask features' stride 8
        with pytest.raises(ValueError, match="MASK_OUT_STRIDE"):
            _head(mask_out_stride=mask_out_stride)
    with pytest.raises(ValueError):
        _head()(feats, _instances(torch.zeros((1, 18)), [0], [[0, 0]], [0]))


def test_loss_without_instances_is_connected_zero():
    head = _head()
    feats = torch.ones((1, 2, 2, 2), requires_grad=True)
    params = torch.zeros((0, 19), requires_grad=True)
    inst = _instances(params, [], [], [], gt_inds=[])
    gt = Instances((16, 16), gt_bitmasks=torch.zeros((0, 2, 2)))
    (loss,) = head.loss(feats, inst, [gt]).values()
    assert loss.item() == 0.0 and loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_loss_is_mean_dice():
    head = _head()
    # constant logits: 0 (p = 1/2) and ln 3 (p = 3/4)
    c0 = _pack([[0] * 4] * 3, [[0, 0, 0]], [0, 0, 0], [0.0])
    c1 = _pack([[0] * 4] * 3, [[0, 0, 0]], [0, 0, 0], [math.log(3.0)])
    feats = torch.randn((1, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    gt = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.uint8)
    inst = _instances(torch.stack([c0, c1]), [0, 0], [[0, 0], [0, 0]], [0, 0], gt_inds=[1, 0])
    loss = head.loss(feats, inst, [Instances((16, 16), gt_bitmasks=gt)])["loss_mask"]
    # inst 0 vs all-ones: inter 2, p^2 1, t^2 4; inst 1 vs one pixel: inter 3/4, p^2 4*9/16, t^2 1
    d0 = 1 - 2 * 2.0 / (1.0 + 4.0 + 1e-5)
    d1 = 1 - 2 * 0.75 / (2.25 + 1.0 + 1e-5)
    assert loss.item() == pytest.approx((d0 + d1) / 2, rel=1e-5)


def test_forward_with_zero_instances():
    head = _head(8, 8, 3, mask_out_stride=4)
    weights, biases = parse_dynamic_params(torch.zeros((0, 169)), head.weight_nums, head.bias_nums)
    assert [tuple(w.shape) for w in weights] == [(0, 8, 10), (0, 8, 8), (0, 1, 8)]
    out = head(torch.zeros((2, 8, 3, 5)), _instances(torch.zeros((0, 169)), [], [], []))
    assert out.shape == (0, 1, 6, 10)
