"""condinst_d2 against the authors' own CondInst outputs (../shared/fixtures/authors_condinst).

Acceptance bar (do not loosen): same detections (count, classes in score order), boxes within
1e-2 px, scores within 1e-4, masks agreeing on >= 99.99 % of pixels; every training loss within
1e-4 relative and every gradient norm within 1e-3 relative.
"""
import json

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from helpers import CASES, assert_same_detections, condinst_cfg, inference_cases, load_train_batch, require_fixtures

# The authors' top-level controller lives in the FCOS head here.
RENAMES = {"controller.": "proposal_generator.fcos_head.controller."}


def _model(case: str, train: bool):
    case_dir = require_fixtures() / case
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml"))
    DetectionCheckpointer(model).load(str(case_dir / "model.pth"))
    return model.train(train), case_dir


@pytest.mark.parametrize("case", CASES)
def test_inference_matches_authors(case):
    model, case_dir = _model(case, train=False)
    for name, image, ref in inference_cases(case_dir):
        inputs = [{"image": torch.as_tensor(image).float(), "height": image.shape[1], "width": image.shape[2]}]
        with torch.no_grad():
            out = model(inputs)[0]["instances"]
        assert out.pred_masks.dtype == torch.bool
        assert tuple(out.pred_masks.shape[1:]) == tuple(ref["image_size"])
        assert_same_detections(out, ref, f"{case}/{name}")


@pytest.mark.parametrize("case", CASES)
def test_training_losses_and_gradients_match_authors(case):
    model, case_dir = _model(case, train=True)
    inputs = load_train_batch(case_dir)
    torch.manual_seed(0)
    losses = model(inputs)
    ref_losses = json.loads((case_dir / "train" / "train_losses.json").read_text())
    assert set(losses) == set(ref_losses) - {"total"}
    for key, value in losses.items():
        assert value.item() == pytest.approx(ref_losses[key], rel=1e-4), key
    assert sum(v.item() for v in losses.values()) == pytest.approx(ref_losses["total"], rel=1e-4)

    sum(losses.values()).backward()
    ref_norms = json.loads((case_dir / "train" / "train_grad_norms.json").read_text())
    ours = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            ours[name] = param.grad.norm().item()
    for ref_name, ref_norm in ref_norms.items():
        name = ref_name
        for old, new in RENAMES.items():
            name = new + name[len(old) :] if name.startswith(old) else name
        assert name in ours, f"no gradient for {name} (authors' {ref_name})"
        assert ours[name] == pytest.approx(ref_norm, rel=1e-3), name
    assert len(ours) == len(ref_norms)


def test_intermediates_match_authors_debug_vectors():
    """The stages the debug vectors of tiny_base record: FCOS targets and positive locations,
    generated parameters and mask logits (training); per-level outputs at inference."""
    model, case_dir = _model("tiny_base", train=True)
    debug = np.load(case_dir / "train" / "train_debug.npz")
    inputs = load_train_batch(case_dir)
    images = model.preprocess_image(inputs)
    np.testing.assert_array_equal(images.tensor.numpy(), debug["model_input_padded"])
    features = model.backbone(images.tensor)
    gt = [x["instances"] for x in inputs]
    model.add_bitmasks(gt, images.tensor.shape[-2:])
    for i, g in enumerate(gt):
        np.testing.assert_array_equal(g.gt_bitmasks_full.numpy(), debug[f"gt_bitmasks_full_im{i}"])
        np.testing.assert_array_equal(g.gt_bitmasks.numpy(), debug[f"gt_bitmasks_im{i}"])
    mask_feats, _ = model.mask_branch(features, gt)
    np.testing.assert_allclose(mask_feats.detach().numpy(), debug["mask_feats_train"], atol=1e-5)
    positives, _ = model.proposal_generator(images, features, gt)
    np.testing.assert_array_equal(positives.labels.numpy(), debug["pos_labels"])
    np.testing.assert_array_equal(positives.gt_inds.numpy(), debug["pos_gt_inds"])
    np.testing.assert_array_equal(positives.im_inds.numpy(), debug["pos_im_inds"])
    np.testing.assert_array_equal(positives.fpn_levels.numpy(), debug["pos_fpn_levels"])
    np.testing.assert_array_equal(positives.locations.numpy(), debug["pos_locations"])
    np.testing.assert_allclose(positives.reg_targets.numpy(), debug["pos_reg_targets"], atol=1e-5)
    np.testing.assert_allclose(positives.gt_ctrs.numpy(), debug["pos_gt_ctrs"], atol=1e-6)
    params = positives.mask_head_params.detach().numpy()
    np.testing.assert_allclose(params, debug["pos_top_feats"], rtol=1e-4, atol=1e-5)
    logits = model.mask_head(mask_feats, model.mask_branch.out_stride, positives).detach().numpy()
    np.testing.assert_allclose(logits, debug["pos_mask_logits"], rtol=1e-4, atol=1e-4)


def test_inference_intermediates_match_authors_debug_vectors():
    model, case_dir = _model("tiny_base", train=False)
    name, image, _ = next(inference_cases(case_dir))
    debug = np.load(case_dir / "infer" / f"{name}_debug.npz")
    with torch.no_grad():
        images = model.preprocess_image([{"image": torch.as_tensor(image).float()}])
        features = model.backbone(images.tensor)
        for level in ("p3", "p4", "p5", "p6", "p7"):
            # Features reach ~5e3, where float32 rounding alone is ~5e-4.
            np.testing.assert_allclose(features[level][0].numpy(), debug[f"feat_{level}"], rtol=1e-5, atol=1e-4)
        detections, _ = model.proposal_generator(images, features)
    det = detections[0]
    n = len(debug["prepost_scores"])
    assert len(det) == n
    np.testing.assert_allclose(det.scores.numpy(), debug["prepost_scores"], atol=1e-4)
    np.testing.assert_array_equal(det.pred_classes.numpy(), debug["prepost_classes"])
    np.testing.assert_allclose(det.pred_boxes.tensor.numpy(), debug["prepost_boxes"], atol=1e-2)
