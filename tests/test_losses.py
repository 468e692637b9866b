"""FCOS losses (focal, GIoU, centerness) and the dice loss of the mask head, against hand values."""

import math

import pytest
import torch

from condinst_d2.modeling.dynamic_mask_head import dice_loss
from condinst_d2.modeling.fcos.losses import (
    ctrness_targets,
    fcos_loss_terms,
    iou_losses,
    losses_of,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_ctrness_targets():
    out = ctrness_targets(_t([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [4.0, 1.0, 1.0, 3.0]))
    expected = torch.tensor([math.sqrt(1 / 3 * 2 / 4), 1.0, math.sqrt(1 / 4 * 1 / 3)])
    torch.testing.assert_close(out, expected)
    assert ctrness_targets(torch.zeros((0, 4))).shape == (0,)


def test_giou_hand_cases():
    # concentric 2x2 pred in 4x4 target: inter 4, union 16, IoU 5/17, enclose = union
    assert iou_losses(_t([1, 1, 1, 1]), _t([2, 2, 2, 2])).item() == pytest.approx(12 / 17, rel=1e-6)
    # shifted 4x4 boxes: inter 3*3 = 9, union 23, IoU 10/24, enclose 5*5 = 25
    expected = 1 - (10 / 24 - (25 - 23) / 25)
    assert iou_losses(_t([1, 1, 3, 3]), _t([2, 2, 2, 2])).item() == pytest.approx(
        expected, rel=1e-6
    )
    # disjoint diagonal 2x2 boxes: inter 0, union 8, IoU 1/9, enclose 16
    expected = 1 - (1 / 9 - (16 - 8) / 16)
    assert iou_losses(_t([2, 2, 0, 0]), _t([0, 0, 2, 2])).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_giou_identical_large_boxes_is_zero():
    box = _t([100.0, 50.0, 30.0, 70.0], [10.0, 20.0, 30.0, 40.0])
    assert iou_losses(box, box.clone()).abs().max().item() < 1e-6


def test_iou_losses_are_per_box():
    pred = _t([1, 1, 1, 1], [1, 1, 3, 3])
    target = _t([2, 2, 2, 2], [2, 2, 2, 2])
    expected = torch.tensor([12 / 17, 1 - (10 / 24 - 2 / 25)])
    torch.testing.assert_close(iou_losses(pred, target), expected)


def test_iou_and_linear_iou_types():
    pred = _t([1, 1, 1, 1], [1, 1, 3, 3])
    target = _t([2, 2, 2, 2], [2, 2, 2, 2])
    ious = [5 / 17, 10 / 24]
    assert iou_losses(pred, target, "iou").sum().item() == pytest.approx(
        -sum(map(math.log, ious)), rel=1e-6
    )
    assert iou_losses(pred, target, "linear_iou").sum().item() == pytest.approx(
        sum(1 - i for i in ious), rel=1e-6
    )


def test_iou_loss_unknown_type():
    with pytest.raises(ValueError):
        iou_losses(_t([1, 1, 1, 1]), _t([1, 1, 1, 1]), "smooth_l1")


def _losses(logits, reg_pred, ctr_pred, labels, reg_targets, **kw):
    return losses_of(_terms(logits, reg_pred, ctr_pred, labels, reg_targets, **kw))


def _terms(logits, reg_pred, ctr_pred, labels, reg_targets, **kw):
    return fcos_loss_terms(
        logits,
        reg_pred,
        ctr_pred,
        labels,
        reg_targets,
        focal_alpha=0.25,
        focal_gamma=2.0,
        loc_loss_type="giou",
        **kw,
    )


def test_focal_loss_one_positive_one_negative():
    # K=2; location 0 is class 0, location 1 background. sigmoid(ln 3) = 3/4.
    logits = _t([LN3, 0.0], [0.0, -LN3])
    labels = torch.tensor([0, 2])
    reg = _t([1, 1, 1, 1], [1, 1, 1, 1])
    out = _losses(logits, reg, torch.zeros(2), labels, reg)
    # per element: alpha_t * (1 - p_t)^2 * -log(p_t)
    e00 = 0.25 * (1 / 4) ** 2 * math.log(4 / 3)  # positive, p = 3/4
    e01 = 0.75 * (1 / 2) ** 2 * LN2  # negatives at p = 1/2
    e10 = e01
    e11 = 0.75 * (1 / 4) ** 2 * math.log(4 / 3)  # negative, p = 1/4 -> p_t = 3/4
    assert out["loss_fcos_cls"].item() == pytest.approx(e00 + e01 + e10 + e11, rel=1e-5)
    out = _losses(logits, reg, torch.zeros(2), labels, reg, loss_weight_cls=2.0)
    assert out["loss_fcos_cls"].item() == pytest.approx(2 * (e00 + e01 + e10 + e11), rel=1e-5)


def test_cls_loss_normalised_by_num_positives():
    logits = torch.zeros((3, 2))
    labels = torch.tensor([0, 1, 2])  # two positives
    reg = torch.ones((3, 4))
    out = _losses(logits, reg, torch.zeros(3), labels, reg)
    # 2 positive elements at 0.25/4*ln2, 4 negative elements at 0.75/4*ln2, over 2 positives
    expected = (2 * 0.25 / 4 * LN2 + 4 * 0.75 / 4 * LN2) / 2
    assert out["loss_fcos_cls"].item() == pytest.approx(expected, rel=1e-5)


def test_loc_loss_divided_by_centerness_sum_and_ctr_loss_by_num_pos():
    logits = torch.zeros((3, 1))
    labels = torch.tensor([0, 0, 1])
    reg_targets = _t([1, 1, 1, 1], [1, 2, 3, 4], [5, 5, 5, 5])
    reg_pred = _t([2, 2, 2, 2], [1, 2, 3, 4], [9, 9, 9, 9])
    ctr_pred = torch.tensor([0.0, LN3, 7.0])
    out = _losses(logits, reg_pred, ctr_pred, labels, reg_targets)
    c0, c1 = 1.0, math.sqrt(1 / 3 * 2 / 4)
    # GIoU losses: (2,2,2,2) vs (1,1,1,1) -> 12/17; identical boxes -> 0
    assert out["loss_fcos_loc"].item() == pytest.approx(
        (c0 * 12 / 17 + c1 * 0.0) / (c0 + c1), rel=1e-5
    )
    bce0 = LN2  # logit 0
    bce1 = -(c1 * math.log(3 / 4) + (1 - c1) * math.log(1 / 4))  # logit ln 3
    assert out["loss_fcos_ctr"].item() == pytest.approx((bce0 + bce1) / 2, rel=1e-5)


def test_no_positives_gives_connected_zero_losses():
    logits = torch.zeros((2, 2), requires_grad=True)
    reg_pred = torch.ones((2, 4), requires_grad=True)
    ctr_pred = torch.zeros(2, requires_grad=True)
    labels = torch.tensor([2, 2])
    out = _losses(logits, reg_pred, ctr_pred, labels, torch.ones((2, 4)))
    for key in ("loss_fcos_loc", "loss_fcos_ctr"):
        assert out[key].item() == 0.0
        assert out[key].grad_fn is not None and out[key].requires_grad
    # four negatives at p = 1/2, divided by max(0, 1) = 1
    assert out["loss_fcos_cls"].item() == pytest.approx(4 * 0.75 / 4 * LN2, rel=1e-5)
    sum(out.values()).backward()
    assert torch.equal(reg_pred.grad, torch.zeros((2, 4)))
    assert torch.equal(ctr_pred.grad, torch.zeros(2))


def test_dice_identical_disjoint_and_partial():
    m = _t([[1, 0], [1, 1]])[None]
    assert abs(dice_loss(m, m.clone()).item()) < 1e-5
    a = _t([[1, 0], [0, 0]])[None]
    b = _t([[0, 1], [1, 0]])[None]
    assert dice_loss(a, b).item() == 1.0
    p = _t([0.5, 0.5, 0.0, 1.0], [0.25, 0.0, 0.0, 0.0])
    t = _t([1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0])
    # row 0: inter 1.5, p^2 1.5, t^2 2; row 1: inter 0.25, p^2 0.0625, t^2 2
    expected = torch.tensor([1 - 3.0 / (3.5 + 1e-5), 1 - 0.5 / (2.0625 + 1e-5)])
    torch.testing.assert_close(dice_loss(p, t), expected)


def test_terms_split_by_level_sum_to_each_loss():
    # 4 locations on 2 levels (0, 0, 1, 1); locations 0 and 3 are positives of class 0
    logits = _t([LN3], [0.0], [-LN3], [0.5])
    labels = torch.tensor([0, 1, 1, 0])
    reg_targets = _t([1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 2, 3, 4])
    reg_pred = _t([2, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1], [1, 2, 3, 3])
    terms = _terms(logits, reg_pred, torch.tensor([0.0, 1.0, 2.0, LN3]), labels, reg_targets)
    levels = torch.tensor([0, 0, 1, 1])
    for name, loss in losses_of(terms).items():
        by_level = terms[name].by_level(levels, 2)
        assert by_level.shape == (2,)
        assert by_level.sum().item() == pytest.approx(loss.item(), rel=1e-6), name
    ctr = terms["loss_fcos_ctr"]
    assert ctr.locations.tolist() == [0, 3]
    torch.testing.assert_close(ctr.by_level(levels, 2), ctr.values / 2)  # 1 positive per level
    cls = terms["loss_fcos_cls"]
    torch.testing.assert_close(cls.by_level(levels, 2), cls.values.view(2, 2, 1).sum((1, 2)) / 2)
