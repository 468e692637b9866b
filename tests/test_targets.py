"""FCOS training targets: size ranges, centre sampling around the mask centroid, tie-break, layout."""

import pytest
import torch
from detectron2.structures import Boxes, Instances

from condinst_d2.modeling.fcos.targets import (
    INF,
    fcos_targets,
    level_sizes_of_interest,
    mask_centroids,
    sizes_of_interest_ranges,
)
from condinst_d2.modeling.layers import compute_locations

CPU = torch.device("cpu")
SOI = [64, 128, 256, 512]  # MODEL.FCOS.SIZES_OF_INTEREST
ONE_LEVEL = [64]  # one level regresses every size


def _gt(boxes, classes, image_size=(64, 64), bitmasks=None):
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    if bitmasks is not None:
        inst.gt_bitmasks_full = bitmasks
    return inst


def _positive_indices(labels, num_classes):
    return torch.nonzero(labels != num_classes).squeeze(1).tolist()


def test_sizes_of_interest_per_level_and_ranges():
    assert INF == 100000000
    assert level_sizes_of_interest(SOI) == [64, 128, 256, 512, 1024]
    ranges = sizes_of_interest_ranges(level_sizes_of_interest(SOI))
    assert ranges == [[-1, 64], [64, 128], [128, 256], [256, 512], [512, INF]]
    assert sizes_of_interest_ranges(ONE_LEVEL) == [[-1, INF]]


def test_targets_need_one_stride_and_size_per_level():
    locations = [compute_locations(2, 2, 8, CPU), compute_locations(1, 1, 16, CPU)]
    with pytest.raises(ValueError, match="sizes of interest"):
        fcos_targets(locations, [_gt([], [])], [8, 16], SOI, 4, None)


def test_mask_centroid_of_l_shape():
    mask = torch.zeros((1, 6, 6), dtype=torch.uint8)
    mask[0, 0:2, 0:4] = 1  # 8 pixels, mean (x, y) = (1.5, 0.5)
    mask[0, 2:4, 0:2] = 1  # 4 pixels, mean (x, y) = (0.5, 2.5)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]])  # box centre (2, 2) differs from the centroid
    expected = torch.tensor([[(8 * 1.5 + 4 * 0.5) / 12, (8 * 0.5 + 4 * 2.5) / 12]])
    torch.testing.assert_close(mask_centroids(mask, boxes), expected)


def test_empty_mask_falls_back_to_box_centre():
    masks = torch.zeros((2, 8, 8), dtype=torch.uint8)
    masks[1, 6, 1] = 1
    boxes = torch.tensor([[2.0, 4.0, 10.0, 20.0], [0.0, 0.0, 8.0, 8.0]])
    torch.testing.assert_close(
        mask_centroids(masks, boxes), torch.tensor([[6.0, 12.0], [1.0, 6.0]])
    )


def test_center_sampling_uses_mask_centroid_and_is_clipped_to_box():
    # One level, stride 8, 8x8 map: location index i*8 + j sits at (8j + 4, 8i + 4).
    locations = [compute_locations(8, 8, 8, CPU)]
    box = [8.0, 8.0, 48.0, 48.0]  # box centre (28, 28)
    masks = torch.zeros((1, 64, 64), dtype=torch.uint8)
    masks[0, 8:16, 8:16] = 1  # centroid (11.5, 11.5)
    # Sampling box: (11.5 - 12, 11.5 + 12) = (-0.5, 23.5), clipped to the box -> (8, 23.5):
    # x, y in {12, 20}; x = 4 would be inside the unclipped region but lies outside the GT box.
    with_mask = fcos_targets(locations, [_gt([box], [3], bitmasks=masks)], [8], ONE_LEVEL, 5, 1.5)
    assert _positive_indices(with_mask.labels, 5) == [9, 10, 17, 18]
    assert with_mask.labels[[9, 10, 17, 18]].tolist() == [3, 3, 3, 3]
    # Without a mask the box centre is used: (28 - 12, 28 + 12) = (16, 40), strict -> {20, 28, 36}.
    no_mask = fcos_targets(locations, [_gt([box], [3])], [8], ONE_LEVEL, 5, 1.5)
    assert _positive_indices(no_mask.labels, 5) == [18, 19, 20, 26, 27, 28, 34, 35, 36]


def test_center_sampling_off_centre_rectangle_mask():
    locations = [compute_locations(8, 8, 8, CPU)]
    masks = torch.zeros((1, 64, 64), dtype=torch.uint8)
    masks[0, 0:16, 0:16] = 1  # centroid (7.5, 7.5), box centre (24, 24)
    gt = _gt([[0.0, 0.0, 48.0, 48.0]], [1], bitmasks=masks)
    t = fcos_targets(locations, [gt], [8], ONE_LEVEL, 2, 1.5)
    # Region (0, 19.5) in x and y -> x, y in {4, 12}.
    assert _positive_indices(t.labels, 2) == [0, 1, 8, 9]
    torch.testing.assert_close(t.reg_targets[9], torch.tensor([12.0, 12.0, 36.0, 36.0]) / 8)


def test_size_range_bounds_are_inclusive_on_both_levels():
    # P3: 16x16 at stride 8, P4: 8x8 at stride 16 on a 128x128 image.
    locations = [compute_locations(16, 16, 8, CPU), compute_locations(8, 8, 16, CPU)]
    gt = _gt([[4.0, 4.0, 120.0, 120.0]], [0], image_size=(128, 128))  # centre (62, 62)
    t = fcos_targets(locations, [gt], [8, 16], [64, 128], 1, 1.5)  # P3 [-1, 64], P4 [64, INF]
    # P3 region (50, 74): x in {52, 60, 68}; x=52 has r=68 > 64 -> only {60, 68}.
    # P4 region (38, 86): x in {40, 56, 72}; every combination has max in [64, 80].
    p3 = [7 * 16 + 7, 7 * 16 + 8, 8 * 16 + 7, 8 * 16 + 8]
    p4 = [256 + i * 8 + j for i in (2, 3, 4) for j in (2, 3, 4)]
    assert _positive_indices(t.labels, 1) == p3 + p4
    # (68, 68) on P3 has max(l, t, r, b) = 64 exactly; (56, 56) on P4 as well.
    assert t.locations[8 * 16 + 8].tolist() == [68.0, 68.0]
    torch.testing.assert_close(
        t.reg_targets[8 * 16 + 8], torch.tensor([64.0, 64.0, 52.0, 52.0]) / 8
    )
    assert t.locations[256 + 3 * 8 + 3].tolist() == [56.0, 56.0]
    torch.testing.assert_close(
        t.reg_targets[256 + 3 * 8 + 3], torch.tensor([52.0, 52.0, 64.0, 64.0]) / 16
    )
    assert t.fpn_levels[p3].tolist() == [0] * 4 and t.fpn_levels[p4].tolist() == [1] * 9


def test_smallest_area_wins():
    locations = [compute_locations(8, 8, 8, CPU)]
    gt = _gt([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 32.0, 32.0]], [1, 2])  # small box is GT 1
    t = fcos_targets(locations, [gt], [8], ONE_LEVEL, 3, None)
    labels = t.labels.reshape(8, 8)
    gt_inds = t.gt_inds.reshape(8, 8)
    expected = torch.ones((8, 8), dtype=torch.long)
    expected[:4, :4] = 2
    assert torch.equal(labels, expected)
    assert torch.equal(gt_inds, expected - 1)
    # (12, 20) -> small box: (12, 20, 20, 12) / 8; (44, 4) -> big box: (44, 4, 20, 60) / 8
    torch.testing.assert_close(t.reg_targets[2 * 8 + 1], torch.tensor([1.5, 2.5, 2.5, 1.5]))
    torch.testing.assert_close(t.reg_targets[0 * 8 + 5], torch.tensor([5.5, 0.5, 2.5, 7.5]))


def test_batch_layout_gt_offsets_background_and_empty_image():
    # P3 2x2 (stride 8): (4,4) (12,4) (4,12) (12,12); P4 1x1 (stride 16): (8,8).
    locations = [compute_locations(2, 2, 8, CPU), compute_locations(1, 1, 16, CPU)]
    im0 = _gt([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 16.0, 16.0]], [3, 5], image_size=(16, 16))
    im1 = _gt([], [], image_size=(16, 16))
    im2 = _gt([[0.0, 0.0, 24.0, 24.0]], [7], image_size=(24, 24))
    # ranges P3 [-1, 16], P4 [16, INF]
    t = fcos_targets(locations, [im0, im1, im2], [8, 16], [16, 32], 10, None)
    bg = 10
    assert t.labels.tolist() == [3, bg, bg, 5] + [bg] * 4 + [bg, bg, bg, 7] + [bg, bg, 7]
    assert t.gt_inds.tolist() == [0, -1, -1, 1] + [-1] * 4 + [-1, -1, -1, 2] + [-1, -1, 2]
    assert t.im_inds.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0, 1, 2]
    assert t.fpn_levels.tolist() == [0] * 12 + [1] * 3
    assert t.loc_inds.tolist() == [0, 1, 2, 3] * 3 + [0, 0, 0]
    p3 = [[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]]
    assert t.locations.tolist() == p3 * 3 + [[8.0, 8.0]] * 3
    assert t.reg_targets.shape == (15, 4)
    torch.testing.assert_close(t.reg_targets[0], torch.full((4,), 0.5))  # (4,4,4,4) / 8
    torch.testing.assert_close(t.reg_targets[3], torch.full((4,), 0.5))
    torch.testing.assert_close(t.reg_targets[11], torch.full((4,), 1.5))  # (12,12,12,12) / 8
    torch.testing.assert_close(
        t.reg_targets[14], torch.tensor([0.5, 0.5, 1.0, 1.0])
    )  # (8,8,16,16)/16
    # the image without GT: background everywhere, zero targets
    im1_rows = [4, 5, 6, 7, 13]
    assert t.labels[im1_rows].tolist() == [bg] * 5
    assert torch.equal(t.reg_targets[im1_rows], torch.zeros((5, 4)))


def test_single_image_without_gt_is_all_background():
    locations = [compute_locations(2, 3, 8, CPU)]
    t = fcos_targets(locations, [_gt([], [])], [8], ONE_LEVEL, 4, 1.5)
    assert t.labels.tolist() == [4] * 6
    assert t.gt_inds.tolist() == [-1] * 6
