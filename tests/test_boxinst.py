"""BoxInst: its losses and targets as pure functions, parity with the authors' BoxInst
(../shared/fixtures/authors_boxinst: intermediates, losses and gradients at two warm-up states,
inference), the warm-up read from the trainer's iteration, and box-only data."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.data import CondInstDatasetMapper, register_coco_dataset, write_coco_split
from condinst_d2.engine import Trainer
from condinst_d2.modeling.boxinst_losses import (
    BoxInstLoss,
    box_bitmasks,
    color_similarity,
    neighbours,
    pairwise_loss,
    projection_loss,
    rgb_to_lab,
    warmup_factor,
)

from helpers import (
    ROOT,
    SHARED,
    assert_same_detections,
    condinst_cfg,
    inference_cases,
    load_reporting_incompatible,
    small_cfg,
)

CASE = SHARED / "fixtures" / "authors_boxinst" / "tiny_boxinst"
STATES = {0: ("train_losses.json", "train_grad_norms.json"), 4999: ("train_losses_iter4999.json", "train_grad_norms_iter4999.json")}  # fmt: skip


def _require_fixture():
    if not (CASE / "model.pth").is_file():
        pytest.skip(f"the authors' BoxInst fixture is not at {CASE} (set CONDINST_SHARED)")


def _fixture_model(train: bool):
    _require_fixture()
    model = build_model(condinst_cfg(CASE / "config_condinst.yaml"))
    CondInstCheckpointer(model).load(str(CASE / "model.pth"))
    return model.train(train)


def _fixture_batch():
    """The 2-image batch as the authors' code got it: boxes and classes, no masks."""
    meta = json.loads((CASE / "train" / "train_batch.json").read_text())
    arrays = np.load(CASE / "train" / "train_batch.npz")
    inputs = []
    for i, image_meta in enumerate(meta["images"]):
        image = torch.as_tensor(arrays[f"image_chw_im{i}"]).float()
        gt = Instances(tuple(image_meta["image_hw"]))
        gt.gt_boxes = Boxes(torch.as_tensor(arrays[f"gt_boxes_im{i}"]))
        gt.gt_classes = torch.as_tensor(arrays[f"gt_classes_im{i}"])
        h, w = image.shape[1:]
        inputs.append({"image": image, "height": h, "width": w, "instances": gt})
    return inputs


def test_box_bitmasks_fill_truncated_rows_and_columns():
    masks = box_bitmasks(torch.tensor([[1.5, 0.2, 3.0, 2.9], [0.0, 0.0, 0.4, 0.4]]), 4, 5)
    expected = torch.zeros((2, 4, 5), dtype=torch.uint8)
    expected[0, 0:3, 1:4] = 1  # rows int(0.2)..int(3.9)-1, columns int(1.5)..int(4.0)-1
    expected[1, 0, 0] = 1  # a box inside one pixel still covers it
    assert torch.equal(masks, expected)


def test_neighbours_are_the_dilated_window_without_centre_in_row_major_order():
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    out = neighbours(x, 3, 2)  # offsets -2, 0, +2
    assert out.shape == (1, 1, 8, 5, 5)
    centre = [v.item() for v in out[0, 0, :, 2, 2]]
    assert centre == [0, 2, 4, 10, 14, 20, 22, 24]
    assert out[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 2, 0, 10, 12]  # zero outside the map
    with pytest.raises(ValueError, match="odd"):
        neighbours(x, 2, 1)


def test_lab_is_scikit_images_rgb2lab():
    color = pytest.importorskip("skimage.color", reason="scikit-image is not installed")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [10, 10, 10]]  # both branches of both curves
    ours = rgb_to_lab(torch.as_tensor(rgb).permute(2, 0, 1)).numpy()
    ref = color.rgb2lab(rgb).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=2e-5)


def test_color_similarity_and_neighbour_validity():
    lab = torch.zeros((3, 1, 3))
    lab[0, 0, 2] = 2.0  # right pixel differs by 2 in L
    valid = torch.tensor([[1.0, 1.0, 0.0]])
    sim = color_similarity(lab, valid, 3, 1)  # (8, 1, 3); neighbour 4 is the right one (dx=+1)
    assert sim.shape == (8, 1, 3)
    assert sim[4, 0, 0].item() == pytest.approx(1.0)  # same colour, valid neighbour
    assert sim[4, 0, 1].item() == 0.0  # the neighbour is invalid (bottom rows, padding)
    assert sim[3, 0, 2].item() == pytest.approx(math.exp(-1.0))  # invalid centre, valid neighbour
    assert sim[[0, 1, 2, 5, 6, 7]].abs().sum().item() == 0.0  # outside the 1-row map


def test_projection_loss_is_dice_of_the_max_projections():
    box = torch.zeros((1, 1, 4, 4))
    box[..., 1:3, 1:3] = 1
    assert projection_loss(box.clone(), box).item() == pytest.approx(0.0, abs=1e-5)
    # any mask with the box's projections costs nothing, e.g. the box's diagonal
    diagonal = torch.zeros_like(box)
    diagonal[0, 0, 1, 1] = diagonal[0, 0, 2, 2] = 1
    assert projection_loss(diagonal, box).item() == pytest.approx(0.0, abs=1e-5)
    half = torch.full_like(box, 0.5)  # projections 0.5 everywhere: 2 * (1 - 2*1 / (1 + 2))
    assert projection_loss(half, box).item() == pytest.approx(2 * (1 - 2 / 3), rel=1e-5)


def test_pairwise_loss_is_minus_log_probability_of_the_same_label():
    logits = torch.tensor([[[[0.0, 2.0, -30.0]]]])
    right = torch.zeros(1, 8, 1, 3, dtype=torch.bool)  # neighbour 4 is the right one (dx=+1)
    right[0, 4, 0, 0] = True
    p = torch.sigmoid(logits)[0, 0, 0]
    expected = -math.log(p[0] * p[1] + (1 - p[0]) * (1 - p[1]))
    assert pairwise_loss(logits, right, 3, 1).item() == pytest.approx(expected, rel=1e-6)
    # outside the map the log-probabilities are zero-padded: such a pair costs nothing but counts
    right[0, 4, 0, 2] = True
    assert pairwise_loss(logits, right, 3, 1).item() == pytest.approx(expected / 2, rel=1e-6)
    assert pairwise_loss(logits, torch.zeros_like(right), 3, 1).item() == 0.0
    extreme = torch.tensor([[[[-1e4, 1e4]]]])
    assert torch.isfinite(pairwise_loss(extreme, torch.ones(1, 8, 1, 2, dtype=torch.bool), 3, 1))


def test_pairwise_loss_over_supervised_pairs_equals_the_weighted_dense_loss():
    """The authors' form: the loss of every pixel and neighbour (zero-padded unfold), weighted by
    the 0/1 supervision and averaged over it. Same value and gradient."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 1, 9, 11, generator=g) * 3).requires_grad_()
    supervised = torch.rand(3, 8, 9, 11, generator=g) > 0.6
    log_fg, log_bg = F.logsigmoid(logits), F.logsigmoid(-logits)
    dense = -torch.logaddexp(
        log_fg[:, :, None] + neighbours(log_fg, 3, 2), log_bg[:, :, None] + neighbours(log_bg, 3, 2)
    )[:, 0]
    weights = supervised.float()
    expected = (dense * weights).sum() / weights.sum()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    ours = pairwise_loss(logits, supervised, 3, 2)
    (grad,) = torch.autograd.grad(ours, logits)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_warmup_factor():
    assert warmup_factor(0, 10000) == 1e-4  # the first step: the authors' _iter is 1
    assert warmup_factor(4999, 10000) == 0.5
    assert warmup_factor(10**6, 10000) == 1.0
    assert warmup_factor(None, 10000) == 1.0  # outside a trainer
    assert warmup_factor(3, 0) == 1.0


def test_bottom_pixels_removed_scale_with_the_resize():
    loss = BoxInstLoss(
        mask_out_stride=4,
        input_format="BGR",
        bottom_pixels_removed=10,
        pairwise_size=3,
        pairwise_dilation=2,
        color_thresh=0.3,
        warmup_iters=10,
    )
    image = torch.zeros((3, 40, 64))  # resized from an original height of 20: 10 * 40/20 rows
    lab, valid = loss.image_lab({"image": image, "height": 20}, (64, 64), torch.device("cpu"))
    assert lab.shape == (3, 16, 16) and valid.shape == (16, 16)
    rows = valid[:, 0].tolist()  # sampled at 2, 6, ...: rows < 20 valid, 20..39 removed, padding
    assert rows == [1.0] * 5 + [0.0] * 11
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        BoxInstLoss.from_config(small_cfg(**{"INPUT.FORMAT": "L"}))


def test_authors_checkpoint_loads_without_missing_or_unexpected_keys():
    _require_fixture()
    model = build_model(condinst_cfg(CASE / "config_condinst.yaml"))
    incompatible = load_reporting_incompatible(model, CASE / "model.pth")
    assert (incompatible.missing_keys, incompatible.unexpected_keys) == ([], [])
    assert not incompatible.incorrect_shapes
    assert "mask_head._iter" not in model.state_dict()  # the schedule is the trainer's iteration


def test_targets_and_mask_instances_match_the_authors_debug_vectors():
    model = _fixture_model(train=True)
    debug = np.load(CASE / "train" / "train_debug.npz")
    inputs = _fixture_batch()
    images = model.preprocess_image(inputs)
    padded = tuple(images.tensor.shape[-2:])
    assert padded == tuple(debug["padded_hw"])
    gt = [x["instances"] for x in inputs]
    model.mask_head.add_targets(gt, inputs, padded)
    mask_loss = model.mask_head.mask_loss
    for i, (g, x) in enumerate(zip(gt, inputs)):
        lab, valid = mask_loss.image_lab(x, padded, model.device)
        np.testing.assert_allclose(lab.numpy(), debug[f"lab_im{i}"], rtol=1e-6, atol=2e-5)
        np.testing.assert_array_equal(valid.numpy(), debug[f"image_mask_im{i}"])
        similar = (g.image_color_similarity[0] >= mask_loss.color_thresh).numpy()
        np.testing.assert_array_equal(similar, debug[f"color_sim_ge_thresh_im{i}"])
        np.testing.assert_array_equal(g.gt_bitmasks.numpy(), debug[f"gt_bitmasks_im{i}"])
    features = model.backbone(images.tensor)
    positives, _ = model.proposal_generator(images, features, gt)
    selected = model.select_mask_training_instances(positives, padded)
    np.testing.assert_array_equal(selected.gt_inds.numpy(), debug["mask_inst_gt_inds"])
    np.testing.assert_array_equal(selected.im_inds.numpy(), debug["mask_inst_im_inds"])
    np.testing.assert_array_equal(selected.locations.numpy(), debug["mask_inst_locations"])
    np.testing.assert_array_equal(selected.fpn_levels.numpy(), debug["mask_inst_fpn_levels"])


@pytest.mark.parametrize("iteration", sorted(STATES))
def test_losses_and_gradients_match_the_authors_at_two_warmup_states(iteration):
    """The storage's iteration i (0-based) is the authors' `_iter` = i before the call. Losses
    within 1e-5 relative, every gradient norm within 1e-3 relative."""
    losses_file, norms_file = STATES[iteration]
    model = _fixture_model(train=True)
    torch.manual_seed(0)
    with EventStorage(start_iter=iteration):
        losses = model(_fixture_batch())
    ref = json.loads((CASE / "train" / losses_file).read_text())
    assert set(losses) == set(ref) - {"total"}
    for key, value in losses.items():
        assert value.item() == pytest.approx(ref[key], rel=1e-5), key
    sum(losses.values()).backward()
    ref_norms = json.loads((CASE / "train" / norms_file).read_text())
    ours = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    assert len(ours) == len(ref_norms)
    for ref_name, ref_norm in ref_norms.items():
        name = ref_name
        if name.startswith("controller."):  # the authors' controller lives in the FCOS head here
            name = "proposal_generator.fcos_head." + name
        assert ours[name] == pytest.approx(ref_norm, rel=1e-3, abs=1e-12), name


def test_inference_matches_the_authors():
    model = _fixture_model(train=False)
    for name, image, ref in inference_cases(CASE):
        h, w = image.shape[1:]
        with torch.no_grad():
            out = model([{"image": torch.as_tensor(image).float(), "height": h, "width": w}])
        assert_same_detections(out[0]["instances"], ref, f"tiny_boxinst/{name}")


def _boxinst_cfg(**overrides):
    return small_cfg(
        **{
            "MODEL.BOXINST.ENABLED": True,
            "MODEL.CONDINST.MAX_PROPOSALS": -1,
            "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM": 64,
            **overrides,
        }
    )


def test_bare_model_call_gives_the_pairwise_loss_full_weight():
    """Outside a trainer there is no iteration: no warm-up (documented), and nothing in the
    model changes between calls."""
    model = build_model(_boxinst_cfg(**{"MODEL.BOXINST.PAIRWISE.WARMUP_ITERS": 100})).train()
    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(0))
    gt = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 70.0, 80.0]])))
    gt.gt_classes = torch.tensor([1])
    inputs = [{"image": image.float(), "instances": gt}]
    with torch.no_grad():
        bare = [model(inputs)["loss_pairwise"].item() for _ in range(2)]
        with EventStorage(start_iter=49):
            half = model(inputs)["loss_pairwise"].item()
    assert bare[0] == bare[1] > 0
    assert half == pytest.approx(bare[0] * 0.5, rel=1e-6)


def test_empty_and_half_empty_batches_keep_losses_connected_zero():
    model = build_model(_boxinst_cfg()).train()
    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(0))
    empty = Instances(
        (96, 128), gt_boxes=Boxes(torch.zeros((0, 4))), gt_classes=torch.zeros(0).long()
    )
    gt = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 70.0, 80.0]])))
    gt.gt_classes = torch.tensor([1])
    for batch in ([empty], [empty, gt]):
        inputs = [{"image": image.float(), "instances": x} for x in batch]
        with EventStorage(0):
            losses = model(inputs)
        assert {"loss_prj", "loss_pairwise"} <= set(losses) and "loss_mask" not in losses
        assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
        assert (losses["loss_prj"].item() == 0) == (len(batch) == 1)


def _boxes_only_tool():
    spec = importlib.util.spec_from_file_location("boxes_only", ROOT / "tools" / "boxes_only.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _box_only_dataset(tmp_path):
    json_file = write_coco_split(str(tmp_path), "train", 3, (96, 128), seed=0)
    boxes_only = tmp_path / "boxes" / "boxes_only.json"
    assert _boxes_only_tool()([json_file, str(boxes_only)]) == 0
    return str(boxes_only), str(tmp_path / "train")


def test_boxes_only_tool_strips_the_masks_and_keeps_the_rest(tmp_path, capsys):
    stripped = json.loads(open(_box_only_dataset(tmp_path)[0]).read())
    original = json.loads((tmp_path / "train.json").read_text())
    assert all("segmentation" not in a for a in stripped["annotations"])
    for a in original["annotations"]:
        del a["segmentation"]
    assert stripped == original and original["annotations"]
    assert _boxes_only_tool()([str(tmp_path / "missing.json"), str(tmp_path / "out.json")]) == 1
    assert "missing.json" in capsys.readouterr().err


def test_mapper_gives_boxinst_boxes_and_rejects_box_only_data_for_condinst(tmp_path):
    name, _ = register_coco_dataset("train", *_box_only_dataset(tmp_path))
    dicts = DatasetCatalog.get(name)
    cfg = _boxinst_cfg(**{"DATASETS.TRAIN": (name,), "INPUT.MIN_SIZE_TRAIN": (96,)})
    mapped = CondInstDatasetMapper(cfg, is_train=True)(dicts[0])
    assert len(mapped["instances"]) == len(dicts[0]["annotations"]) > 0
    assert not mapped["instances"].has("gt_masks")
    with pytest.raises(ValueError, match=rf"dataset {name!r} has boxes but no masks.*BoxInst"):
        CondInstDatasetMapper(small_cfg(**{"DATASETS.TRAIN": (name,)}), is_train=True)
    # as a test set, it is evaluated on boxes only (there are no masks to compute segm AP against)
    assert Trainer.build_evaluator(cfg, name, str(tmp_path))._tasks == ("bbox",)


def test_boxinst_configs_are_the_authors():
    configs = ROOT / "configs" / "BoxInst"
    for name, depth, max_iter in [
        ("MS_R_50_1x", 50, 90000),
        ("MS_R_50_3x", 50, 270000),
        ("MS_R_101_1x", 101, 90000),
        ("MS_R_101_3x", 101, 270000),
    ]:
        cfg = condinst_cfg(configs / f"{name}.yaml")
        assert (cfg.MODEL.RESNETS.DEPTH, cfg.SOLVER.MAX_ITER) == (depth, max_iter), name
        ci, box = cfg.MODEL.CONDINST, cfg.MODEL.BOXINST
        assert (ci.MAX_PROPOSALS, ci.TOPK_PROPOSALS_PER_IM, ci.MASK_BRANCH.OUT_CHANNELS) == (
            -1,
            64,
            16,
        )
        assert box.ENABLED and box.BOTTOM_PIXELS_REMOVED == 10
        pairwise = box.PAIRWISE
        assert (pairwise.SIZE, pairwise.DILATION, pairwise.COLOR_THRESH) == (3, 2, 0.3)
        assert pairwise.WARMUP_ITERS == 10000
    _require_fixture()
    authors = condinst_cfg(CASE / "config_condinst.yaml")  # the authors' merged config
    assert authors.MODEL.BOXINST.ENABLED and authors.MODEL.BOXINST.PAIRWISE.WARMUP_ITERS == 10000


def test_the_losses_recover_a_disk_from_its_box_and_colours():
    """A per-pixel MLP on the LAB colours (a dynamic mask head on colour features), trained with
    BoxInst's two losses alone from a box around a red disk on a grey textured background,
    segments the disk, not the box."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[:128, :128]
    disk = (ys - 64.0) ** 2 + (xs - 60.0) ** 2 <= 40.0**2
    image = rng.normal(110, 12, size=(3, 128, 128))
    image[:, disk] = np.array([40.0, 40.0, 200.0])[:, None] + rng.normal(0, 6, (3, disk.sum()))
    image = torch.as_tensor(np.clip(image, 0, 255).astype(np.uint8))  # BGR: a red disk
    gt = Instances((128, 128), gt_boxes=Boxes(torch.tensor([[20.0, 24.0, 100.0, 104.0]])))
    gt.gt_classes = torch.tensor([0])
    loss = BoxInstLoss.from_config(_boxinst_cfg())
    loss.add_targets([gt], [{"image": image}], (128, 128))
    lab, _ = loss.image_lab({"image": image}, (128, 128), torch.device("cpu"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    instances = Instances((128, 128), gt_inds=torch.tensor([0]))
    history = []
    for _ in range(200):
        with EventStorage(start_iter=10**6):  # warm-up over
            losses = loss(net(lab[None] / 100), instances, [gt])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append([v.item() for v in losses.values()])
    mask = (net(lab[None] / 100)[0, 0] > 0).numpy()
    target = disk[2::4, 2::4]
    box = gt.gt_bitmasks[0].numpy().astype(bool)
    assert (np.array(history[-1]) < 0.1 * np.array(history[0])).all(), history[::50]
    iou = (mask & target).sum() / (mask | target).sum()
    assert iou > 0.95 and (box & target).sum() / (box | target).sum() < 0.8, iou
