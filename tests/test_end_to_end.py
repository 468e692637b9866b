"""Detectron2-style end-to-end cases on CPU: empty and half-empty batches, eval, zero detections,
images of different sizes, the mask-head sampling options and mask NMS."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.modeling.mask_nms import mask_iou

from helpers import (
    assert_same_detections,
    condinst_cfg,
    inference_cases,
    load_train_batch,
    require_fixtures,
    small_cfg,
    synthetic_instances,
)


def _image(h, w, seed=0):
    return torch.from_numpy(
        np.random.default_rng(seed).integers(0, 255, (3, h, w), dtype=np.uint8)
    ).float()


def _empty_instances(h, w):
    gt = Instances((h, w))
    gt.gt_boxes = Boxes(torch.zeros((0, 4)))
    gt.gt_classes = torch.zeros((0,), dtype=torch.long)
    gt.gt_masks = PolygonMasks([])
    return gt


def _train_step(model, inputs):
    losses = model(inputs)
    total = sum(losses.values())
    total.backward()
    return losses


def _assert_every_parameter_has_a_gradient(model):
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [], f"parameters outside the graph (DDP would fail): {no_grad[:5]}"


@pytest.mark.parametrize("semantic", [False, True])
def test_batch_without_instances_trains(semantic):
    model = build_model(
        small_cfg(**{"MODEL.CONDINST.MASK_BRANCH.SEMANTIC_LOSS_ON": semantic})
    ).train()
    inputs = [
        {"image": _image(96, 128, i), "instances": _empty_instances(96, 128)} for i in range(2)
    ]
    losses = _train_step(model, inputs)
    expected = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"} | (
        {"loss_sem"} if semantic else set()
    )
    assert set(losses) == expected
    for name, value in losses.items():
        assert torch.isfinite(value), name
        assert value.requires_grad, name
    assert losses["loss_mask"].item() == 0 and losses["loss_fcos_loc"].item() == 0
    assert losses["loss_fcos_cls"].item() > 0
    _assert_every_parameter_has_a_gradient(model)


def test_half_empty_batch_trains():
    model = build_model(small_cfg()).train()
    inputs = [
        {
            "image": _image(96, 128, 0),
            "instances": synthetic_instances(
                96, 128, [[10, 12, 70, 80], [60, 20, 120, 60]], [1, 2]
            ),
        },
        {"image": _image(64, 96, 1), "instances": _empty_instances(64, 96)},
    ]
    losses = _train_step(model, inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0 and losses["loss_fcos_loc"].item() > 0
    _assert_every_parameter_has_a_gradient(model)


def test_eval_on_cpu_resizes_to_requested_output():
    model = build_model(small_cfg(**{"MODEL.FCOS.INFERENCE_TH_TEST": 0.0})).eval()
    with torch.no_grad():
        out = model([{"image": _image(120, 160), "height": 240, "width": 320}])[0]["instances"]
    assert out.image_size == (240, 320)
    assert 0 < len(out) <= 100  # threshold 0: every location is a candidate, NMS + cap keep <= 100
    assert out.pred_masks.shape == (len(out), 240, 320) and out.pred_masks.dtype == torch.bool
    assert out.pred_boxes.tensor[:, 2].max() <= 320 and out.pred_boxes.tensor[:, 3].max() <= 240
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    assert set(out.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}


def test_zero_detections():
    model = build_model(small_cfg(**{"MODEL.FCOS.INFERENCE_TH_TEST": 1.0})).eval()
    with torch.no_grad():
        outputs = model(
            [{"image": _image(100, 140)}, {"image": _image(64, 64, 1), "height": 32, "width": 32}]
        )
    assert [len(o["instances"]) for o in outputs] == [0, 0]
    assert outputs[0]["instances"].pred_masks.shape == (0, 100, 140)
    assert outputs[1]["instances"].pred_masks.shape == (0, 32, 32)


def test_images_of_different_sizes_in_one_call():
    """The authors' code cannot batch different sizes. Here the image that sets the padded size
    is unchanged by batching, so it must still match the authors' reference; the smaller one
    gets outputs of its own size."""
    case_dir = require_fixtures() / "tiny_base"
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml")).eval()
    CondInstCheckpointer(model).load(str(case_dir / "model.pth"))
    name, image, ref = [c for c in inference_cases(case_dir) if c[0] == "synth_512x384_s101"][0]
    big = torch.as_tensor(image).float()
    small = big[:, :300, :200].clone()
    with torch.no_grad():
        batched = model([{"image": big}, {"image": small, "height": 150, "width": 100}])
        alone = model([{"image": small, "height": 150, "width": 100}])[0]["instances"]
    assert_same_detections(batched[0]["instances"], ref, name)
    out = batched[1]["instances"]
    assert out.image_size == (150, 100) and out.pred_masks.shape[1:] == (150, 100)
    assert len(out) > 0 and len(alone) > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"MODEL.CONDINST.MAX_PROPOSALS": 10},
        {"MODEL.CONDINST.MAX_PROPOSALS": -1, "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM": 12},
    ],
)
def test_mask_head_sampling_options(overrides):
    case_dir = require_fixtures() / "tiny_base"
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml", **overrides)).train()
    CondInstCheckpointer(model).load(str(case_dir / "model.pth"))
    inputs = load_train_batch(case_dir)
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    gt = [x["instances"] for x in inputs]
    model.mask_head.add_targets(gt, inputs, images.tensor.shape[-2:])
    positives, _ = model.proposal_generator(images, features, gt)
    assert sum(len(p) for p in positives) == 98
    selected = model.select_mask_training_instances(positives, tuple(images.tensor.shape[-2:]))
    if overrides["MODEL.CONDINST.MAX_PROPOSALS"] == 10:
        assert len(selected) == 10
    else:  # 12 per image shared evenly by that image's matched GTs (at least one each)
        for im in range(2):
            per_image = selected[selected.im_inds == im]
            num_gts = len(positives[im].gt_inds.unique())
            assert len(per_image) <= max(12 // num_gts, 1) * num_gts
            assert len(per_image.gt_inds.unique()) == num_gts
    losses = model(load_train_batch(case_dir))
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"].item() > 0


def test_fcos_returns_one_instances_per_image_in_training_and_inference():
    model = build_model(small_cfg(**{"MODEL.FCOS.INFERENCE_TH_TEST": 0.0}))
    gt = [synthetic_instances(96, 128, [[10, 12, 70, 80]], [1]), _empty_instances(64, 96)]
    images = model.preprocess_image([{"image": _image(96, 128, 0)}, {"image": _image(64, 96, 1)}])
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            features = model.backbone(images.tensor)
            per_image, losses = model.proposal_generator(images, features, gt if training else None)
        assert [x.image_size for x in per_image] == images.image_sizes
        assert bool(losses) == training
        for im, instances in enumerate(per_image):
            assert (instances.im_inds == im).all()
            assert instances.mask_head_params.shape == (len(instances), model.mask_head.num_params)
        # training: the positives (none in the image without GT); inference: the detections
        assert [len(x) > 0 for x in per_image] == ([True, False] if training else [True, True])


def test_mask_nms_option():
    case_dir = require_fixtures() / "tiny_base"
    box_nms = build_model(condinst_cfg(case_dir / "config_condinst.yaml")).eval()
    mask_nms = build_model(
        condinst_cfg(case_dir / "config_condinst.yaml", **{"MODEL.CONDINST.MASK_NMS": True})
    ).eval()
    for model in (box_nms, mask_nms):
        CondInstCheckpointer(model).load(str(case_dir / "model.pth"))
    _, image, ref = next(inference_cases(case_dir))
    with torch.no_grad():
        out = mask_nms([{"image": torch.as_tensor(image).float()}])[0]["instances"]
        base = box_nms([{"image": torch.as_tensor(image).float()}])[0]["instances"]
    assert len(base) == len(ref["scores"])
    assert 0 < len(out) <= 100
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    iou = mask_iou(out.pred_masks)
    same = out.pred_classes[:, None] == out.pred_classes[None, :]
    off_diagonal = ~torch.eye(len(out), dtype=torch.bool)
    assert iou[same & off_diagonal].max() <= 0.65  # NMS decided on stride-4 masks at IoU 0.6


@pytest.mark.parametrize("log_level_losses", [False, True])
def test_fcos_losses_by_level_are_logged_on_request(log_level_losses):
    model = build_model(small_cfg(**{"MODEL.FCOS.LOG_LEVEL_LOSSES": log_level_losses})).train()
    boxes = [[4, 6, 40, 44], [10, 12, 120, 90], [60, 20, 124, 60]]  # objects of several levels
    inputs = [
        {"image": _image(96, 128), "instances": synthetic_instances(96, 128, boxes, [0, 1, 2])}
    ]
    captured = []  # FCOS's per-image positives
    model.proposal_generator.register_forward_hook(lambda m, i, out: captured.extend(out[0]))
    with EventStorage(0) as storage:
        losses = model(inputs)
    positives = captured[0]
    logged = {k: v for k, (v, _) in storage.latest().items() if k.startswith("fcos_")}
    if not log_level_losses:
        assert logged == {}
        return
    levels = model.proposal_generator.in_features
    assert set(logged) == {
        f"fcos_{level}/{name}"
        for level in levels
        for name in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "num_pos")
    }
    for name in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
        shares = [logged[f"fcos_{level}/{name}"] for level in levels]
        assert sum(shares) == pytest.approx(losses[name].item(), rel=1e-5), name
    per_level = torch.bincount(positives.fpn_levels, minlength=len(levels)).tolist()
    assert [logged[f"fcos_{level}/num_pos"] for level in levels] == per_level
    assert sum(1 for n in per_level if n > 0) >= 2, "the boxes should be positive on 2+ levels"
