"""aligned_bilinear, compute_locations, mask pasting / postprocess and mask NMS on tiny inputs."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from condinst_d2.modeling.layers import aligned_bilinear, compute_locations
from condinst_d2.modeling.mask_nms import mask_iou, mask_nms
from condinst_d2.modeling.postprocessing import (
    paste_masks,
    paste_masks_by_steps,
    paste_one_mask,
    paste_taps,
    postprocess,
)

CPU = torch.device("cpu")


def test_aligned_bilinear_factor_one_is_identity():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    assert torch.equal(aligned_bilinear(x, 1), x)


def test_aligned_bilinear_factor_two_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # pad -> [[0,1,1],[2,3,3],[2,3,3]]; align_corners resize to 5x5 samples at 0, .5, 1, 1.5, 2;
    # pad left/top by 1; crop 4x4. Output pixel i samples input max(0, (i - 1) / 2).
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.5, 1.0],
            [0.0, 0.0, 0.5, 1.0],
            [1.0, 1.0, 1.5, 2.0],
            [2.0, 2.0, 2.5, 3.0],
        ]
    )[None, None]
    torch.testing.assert_close(aligned_bilinear(x, 2), expected)


def test_aligned_bilinear_factor_four_keeps_centres():
    x = torch.tensor([[[[0.0, 4.0, 8.0]]]])
    out = aligned_bilinear(x, 4)
    assert out.shape == (1, 1, 4, 12)
    # column j samples clamp((j - 2) / 4, 0, 2) -> value 4 * that
    expected = torch.tensor([min(max((j - 2) / 4, 0.0), 2.0) * 4 for j in range(12)])
    torch.testing.assert_close(out[0, 0], expected.expand(4, 12))


def test_aligned_bilinear_rejects_bad_input():
    x = torch.zeros((1, 1, 2, 2))
    for factor in (0, -1, 1.5):
        with pytest.raises(ValueError):
            aligned_bilinear(x, factor)
    with pytest.raises(ValueError):
        aligned_bilinear(torch.zeros((1, 2, 2)), 2)


def test_compute_locations():
    locs = compute_locations(2, 3, 8, CPU)
    assert locs.dtype == torch.float32
    assert locs.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert compute_locations(1, 2, 16, CPU).tolist() == [[8, 8], [24, 8]]


def test_postprocess_scales_clips_drops_and_crops():
    # image 16x24 inside a 32x32 padded canvas, masks at stride 4 (8x8); output 32x48 (x2).
    det = Instances((16, 24))
    boxes = [
        [2.0, 2.0, 10.0, 12.0],
        [20.0, 4.0, 30.0, 14.0],
        [25.0, 2.0, 30.0, 10.0],
        [0.0, 0.0, 4.0, 4.0],
    ]
    det.pred_boxes = Boxes(torch.tensor(boxes))
    det.scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    det.pred_classes = torch.tensor([1, 2, 3, 4])
    probs = torch.zeros((4, 1, 8, 8))
    probs[0] = 1.0  # everywhere
    probs[1, 0, 4:, :] = 1.0  # only in the padding (rows >= 16 px, columns >= 24 px)
    probs[1, 0, :, 6:] = 1.0
    probs[2] = 1.0  # dropped with its empty box
    probs[3, 0, :, :3] = 1.0  # columns 0..2 of the mask grid
    out = postprocess(det, probs, (32, 32), 32, 48)
    assert out.image_size == (32, 48)
    expected_boxes = torch.tensor(
        [[4.0, 4.0, 20.0, 24.0], [40.0, 8.0, 48.0, 28.0], [0.0, 0.0, 8.0, 8.0]]
    )
    torch.testing.assert_close(out.pred_boxes.tensor, expected_boxes)
    torch.testing.assert_close(out.scores, torch.tensor([0.9, 0.8, 0.6]))
    assert out.pred_classes.tolist() == [1, 2, 4]
    masks = out.pred_masks
    assert masks.dtype == torch.bool and masks.shape == (3, 32, 48)
    assert masks[0].all()
    assert not masks[1].any()  # at most 0.4375 inside the image's own 16x24 crop
    # det 3: x4 upsampled value (14 - j) / 4 on [10, 14]; x2 resize samples j = u/2 - 1/4 -> > 0.5 iff u <= 24
    expected = torch.zeros((32, 48), dtype=torch.bool)
    expected[:, :25] = True
    assert torch.equal(masks[2], expected)
    # the step-by-step reference gives the same hand values
    assert torch.equal(paste_masks_by_steps(probs[[0, 1, 3]], (32, 32), (16, 24), (32, 48)), masks)


@pytest.mark.parametrize(
    "mask_size, factor, image, output",
    [
        ((4, 4), 4, (14, 12), (20, 30)),
        ((30, 40), 4, (117, 150), (117, 150)),
        ((25, 20), 2, (50, 37), (33, 70)),
    ],
)
def test_paste_masks_matches_step_by_step_reference(mask_size, factor, image, output):
    """Only the rows/columns that reach a mask's above-threshold pixels are evaluated; the
    result must still equal the full computation (smooth random masks, some all below or all
    above the threshold)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand((21, 1, mask_size[0] // 3 + 1, mask_size[1] // 3 + 1), generator=g)
    probs = F.interpolate(low, size=mask_size, mode="bilinear", align_corners=False)
    probs[3], probs[5] = 0.2, 0.8
    padded = (mask_size[0] * factor, mask_size[1] * factor)
    out = paste_masks(probs, padded, image, output)
    assert out.shape == (21, *output) and out.dtype == torch.bool
    assert torch.equal(out, paste_masks_by_steps(probs, padded, image, output))
    assert not out[3].any() and out[5].all()
    # the one-mask form that the ONNX graph runs, sizes given as 0-d tensors
    image_hw, output_hw = [tuple(torch.tensor(x) for x in size) for size in (image, output)]
    rows, cols = paste_taps(mask_size, factor, image_hw, output_hw, "cpu")
    for d in range(len(probs)):
        assert torch.equal(paste_one_mask(probs[d, 0], rows, cols, output_hw), out[d]), d


def test_paste_masks_rejects_non_tiling_size():
    for paste in (paste_masks, paste_masks_by_steps):
        with pytest.raises(ValueError):
            paste(torch.zeros((1, 1, 4, 4)), (16, 18), (16, 16), (16, 16))


def _block(cols, rows=(0, 4)):
    m = torch.zeros((6, 6), dtype=torch.bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def test_mask_iou():
    a, d = _block((0, 4)), _block((2, 6))
    masks = torch.stack([a, d, torch.zeros((6, 6), dtype=torch.bool)])
    iou = mask_iou(masks)
    expected = torch.tensor([[1.0, 8 / 24, 0.0], [8 / 24, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected)


def test_mask_nms():
    # index: 0 = D (0.7, cls 0), 1 = A (0.9, cls 0), 2 = B (0.8, cls 0), 3 = C (0.85, cls 1)
    # IoU(A, B) = 12/16 = 0.75, IoU(A, D) = 8/24, C has A's mask but another class.
    masks = torch.stack([_block((2, 6)), _block((0, 4)), _block((0, 3)), _block((0, 4))])
    scores = torch.tensor([0.7, 0.9, 0.8, 0.85])
    classes = torch.tensor([0, 0, 0, 1])
    assert mask_nms(masks, scores, classes, 0.5, 100).tolist() == [1, 3, 0]
    assert mask_nms(masks, scores, classes, 0.75, 100).tolist() == [1, 3, 2, 0]  # strict > thresh
    assert mask_nms(masks, scores, classes, 0.5, 2).tolist() == [1, 3]
    assert mask_nms(masks, scores, torch.tensor([0, 1, 2, 3]), 0.1, 100).tolist() == [1, 3, 2, 0]
