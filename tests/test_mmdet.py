"""mmdetection's CondInst: its checkpoint, converted on load or by tools/convert_checkpoint.py,
with configs/CondInst/mmdet_R_50_1x.yaml reproduces mmdetection 3.3's own outputs (the fixture
../shared/fixtures/mmdet_condinst, whose README gives every step), and the inference options
that config sets do what they say."""

import importlib.util
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from condinst_d2.checkpoint import (
    MMDET,
    CondInstCheckpointer,
    convert_state_dict,
    detect_format,
    unwrap_state_dict,
)
from condinst_d2.config import add_condinst_config
from condinst_d2.data import read_image
from condinst_d2.modeling.fcos.inference import candidates_single_level
from condinst_d2.modeling.fcos.losses import ctrness_targets
from condinst_d2.modeling.postprocessing import paste_masks

from helpers import ROOT, SHARED, condinst_cfg, load_reporting_incompatible

FIXTURE = SHARED / "fixtures" / "mmdet_condinst"
IMAGES = ["000000397133", "000000536038"]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")
# The fixture's narrow R-50 (mmdetection's base_channels=16, FPN 64, mask branch 32 channels).
NARROW = {
    "MODEL.RESNETS.STEM_OUT_CHANNELS": "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS": "64",
    "MODEL.RESNETS.WIDTH_PER_GROUP": "16",
    "MODEL.FPN.OUT_CHANNELS": "64",
    "MODEL.CONDINST.MASK_BRANCH.CHANNELS": "32",
}
LEVELS = ["p3", "p4", "p5", "p6", "p7"]
STRIDES = [8, 16, 32, 64, 128]


def _fixture() -> Path:
    if not (FIXTURE / "model.pth").is_file():
        pytest.skip(f"mmdetection's CondInst fixture is not at {FIXTURE} (set CONDINST_SHARED)")
    return FIXTURE


def _mmdet_file() -> Dict:
    return torch.load(_fixture() / "model.pth", map_location="cpu", weights_only=True)


def _narrow_model() -> torch.nn.Module:
    cfg = condinst_cfg(ROOT / "configs" / "CondInst" / "mmdet_R_50_1x.yaml", **NARROW)
    return build_model(cfg)


@pytest.fixture(scope="module")
def model():
    model = _narrow_model()
    CondInstCheckpointer(model).load(str(_fixture() / "model.pth"))  # as MODEL.WEIGHTS
    return model.eval()


def _capture(module: torch.nn.Module, store: Dict, name: str):
    return module.register_forward_hook(lambda mod, args, out: store.__setitem__(name, out))


@pytest.fixture(scope="module", params=IMAGES)
def run(request, model):
    """(fixture arrays, intermediate outputs, final Instances) of one image, fed the resized
    image mmdetection's pipeline made (RGB: what Detectron2's predictor hands the model)."""
    ref = np.load(_fixture() / f"infer_{request.param}.npz")
    image = np.ascontiguousarray(ref["resized_bgr_uint8"][:, :, ::-1].transpose(2, 0, 1))
    height, width = (int(x) for x in ref["ori_shape"])
    seen: Dict = {}
    mask_logits = []  # the dynamic head runs on a few detections per call
    hooks = [
        _capture(model.backbone, seen, "features"),
        _capture(model.proposal_generator.fcos_head, seen, "head"),
        _capture(model.proposal_generator, seen, "detections"),
        _capture(model.mask_branch, seen, "mask_branch"),
        model.mask_head.register_forward_hook(lambda mod, args, out: mask_logits.append(out)),
    ]
    inputs = {"image": torch.from_numpy(image).float(), "height": height, "width": width}
    with torch.no_grad():
        seen["inputs"] = model.preprocess_image([inputs]).tensor
        (result,) = model([inputs])
        towers = seen["head"].bbox_towers
        seen["params"] = [model.proposal_generator.fcos_head.controller(t) for t in towers]
    for hook in hooks:
        hook.remove()
    seen["mask_logits"] = torch.cat(mask_logits)
    return ref, seen, result["instances"]


def test_config_sets_mmdetections_inference_and_defaults_stay_the_authors(model):
    fcos = model.proposal_generator
    assert (fcos.thresh_with_ctr, fcos.topk_with_ctr, fcos.sqrt_score, fcos.clip_boxes) == (
        False,
        False,
        False,
        True,
    )
    assert model.max_proposals == 300  # mmdetection's max_masks_to_train
    defaults = get_cfg()
    add_condinst_config(defaults)
    fcos_defaults = defaults.MODEL.FCOS
    assert fcos_defaults.PRE_NMS_TOPK_WITH_CTR and fcos_defaults.SQRT_SCORE
    assert not fcos_defaults.CLIP_BOXES_BEFORE_NMS


def test_detectron2_test_resize_makes_mmdetections_resized_images():
    """ResizeShortestEdge(800, 1333), the config's test resize (as demo/ and DefaultPredictor
    apply it), gives the images mmdetection's Resize made, bit for bit."""
    images = SHARED / "datasets" / "coco_val2017_subset" / "val2017"
    if not images.is_dir():
        pytest.skip(f"the COCO images are not at {images}")
    resize = ResizeShortestEdge(800, 1333)
    for name in IMAGES:
        image = read_image(str(images / f"{name}.jpg"), format="BGR")
        theirs = np.load(_fixture() / f"infer_{name}.npz")["resized_bgr_uint8"]
        np.testing.assert_array_equal(resize.get_transform(image).apply_image(image), theirs)


def _max_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float((ours - torch.from_numpy(theirs)).abs().max())


def test_preprocessing_gives_mmdetections_backbone_input(run):
    ref, seen, _ = run
    assert _max_diff(seen["inputs"], ref["inputs"]) <= 1e-5


def test_fpn_features_match(run):
    ref, seen, _ = run
    for name in LEVELS:
        theirs = ref[f"fpn_{name}"]  # P3, P4: the first 8 channels
        ours = seen["features"][name][0, : len(theirs)]
        assert _max_diff(ours, theirs) <= 1e-4, name


def test_head_outputs_and_controller_match(run):
    ref, seen, _ = run
    head = seen["head"]
    for level, stride in enumerate(STRIDES):
        theirs_cls = ref[f"cls_lvl{level}"]
        channels = ref["sel_cls_channels"] if len(theirs_cls) < 80 else slice(None)
        assert _max_diff(head.logits[level][0, channels], theirs_cls) <= 1e-4, level
        # The head's output relu(scale * conv): distances in units of the stride (the fixture
        # holds them times the stride, in pixels, where 1e-4 would be 1e-6 relative at P6).
        assert _max_diff(head.bbox_reg[level][0], ref[f"bbox_lvl{level}"] / stride) <= 1e-4
        assert _max_diff(head.ctrness[level][0], ref[f"ctr_lvl{level}"]) <= 1e-4, level
        theirs_params = ref[f"param_lvl{level}"]
        ours_params = seen["params"][level][0, : len(theirs_params)]
        assert _max_diff(ours_params, theirs_params) <= 1e-4, level
    assert _max_diff(seen["mask_branch"][0], ref["mask_feats"]) <= 1e-4


def test_detections_before_postprocessing_match(run):
    ref, seen, _ = run
    (det,) = seen["detections"][0]
    assert len(det) == len(ref["pred_scores"])
    np.testing.assert_array_equal(det.pred_classes.numpy(), ref["pred_labels"])
    assert _max_diff(det.pred_boxes.tensor, ref["det_bboxes_resized"]) <= 1e-2
    assert _max_diff(det.locations, ref["det_points"]) == 0
    strides = torch.tensor(STRIDES, dtype=torch.float32)[det.fpn_levels]
    assert _max_diff(strides, ref["det_strides"]) == 0
    assert _max_diff(det.mask_head_params, ref["det_param_preds"]) <= 1e-4
    # Mask logits reach |x| ~ 250 (rounding then shows in the 5th digit): to 1e-4 of that range.
    theirs_logits = ref["mask_logits_s4_top10"]
    ours_logits = seen["mask_logits"][: len(theirs_logits), 0]
    assert _max_diff(ours_logits, theirs_logits) <= 1e-4 * np.abs(theirs_logits).max()


def test_mask_postprocessing_is_mmdetections():
    """mmdetection's own mask logits, pasted by condinst_d2, give its masks exactly (the pixels
    that differ above come from the logits' rounding)."""
    for name in IMAGES:
        ref = np.load(_fixture() / f"infer_{name}.npz")
        logits = torch.from_numpy(ref["mask_logits_s4_top10"])[:, None]
        padded, resized = (tuple(int(x) for x in ref[k]) for k in ("pad_shape", "img_shape"))
        ours = paste_masks(logits.sigmoid(), padded, resized, ref["pred_masks"].shape[1:])
        np.testing.assert_array_equal(ours.numpy(), ref["pred_masks"][: len(logits)])


def test_final_detections_match(run):
    ref, _, out = run
    assert len(out) == len(ref["pred_scores"])
    np.testing.assert_array_equal(out.pred_classes.numpy(), ref["pred_labels"])
    assert _max_diff(out.scores, ref["pred_scores"]) <= 1e-5
    assert _max_diff(out.pred_boxes.tensor, ref["pred_bboxes"]) <= 1e-2
    agreement = (out.pred_masks.numpy() == ref["pred_masks"]).mean()
    assert agreement >= 0.9999, f"masks agree on {agreement:.6%} of pixels"


def test_table_converts_every_key_of_the_file():
    loaded = _mmdet_file()
    state = unwrap_state_dict(loaded)
    assert state is loaded["state_dict"] and detect_format(state) is MMDET
    conversion = convert_state_dict(state, MMDET)
    assert conversion.left_over == []
    assert len(conversion.dropped) == 53  # the backbone's BN counters (FrozenBN has none)
    assert all(k.startswith("backbone.") for k in conversion.dropped)
    assert conversion.transformed == [
        (f"bbox_head.scales.{i}.scale", f"proposal_generator.fcos_head.scales.{i}.scale")
        for i in range(5)
    ]
    scales = [conversion.state_dict[new] for _, new in conversion.transformed]
    assert [s.shape for s in scales] == [torch.Size([1])] * 5
    assert [round(float(s), 4) for s in scales] == [1.0, 1.1, 0.9, 1.2, 0.8]
    assert len(conversion.renamed) == 423 - 53


def test_checkpoint_loads_directly_with_no_key_missing():
    incompatible = load_reporting_incompatible(_narrow_model(), _fixture() / "model.pth")
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []


@pytest.fixture(scope="module")
def convert_tool():
    """tools/convert_checkpoint.py as a module (its `main` run in this process: no second
    start of torch and Detectron2; test_checkpoint.py runs it as a command)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_tool_writes_the_same_weights(tmp_path, convert_tool, capsys):
    out = tmp_path / "converted.pth"
    assert convert_tool.main([str(_fixture() / "model.pth"), str(out), "--from", "mmdet"]) == 0
    stdout = capsys.readouterr().out
    assert (
        "transformed  bbox_head.scales.0.scale () -> proposal_generator.fcos_head.scales.0.scale "
        "(1,)" in stdout
    )
    assert "dropped  backbone.bn1.num_batches_tracked" in stdout
    assert "370 tensors: 370 renamed, 0 kept, 53 dropped, 0 left over" in stdout
    written = torch.load(out, map_location="cpu")["model"]
    expected = convert_state_dict(unwrap_state_dict(_mmdet_file()), MMDET).state_dict
    assert list(written) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0, msg=key)


def test_an_mmdetection_file_that_is_not_a_condinst_is_refused(tmp_path, convert_tool):
    loaded = _mmdet_file()
    loaded["state_dict"] = {  # an mmdetection FCOS: no controller, no mask head
        k: v
        for k, v in loaded["state_dict"].items()
        if not k.startswith(("bbox_head.controller", "mask_head."))
    }
    path = tmp_path / "fcos.pth"
    torch.save(loaded, path)
    with pytest.raises(SystemExit) as exit_info:  # the message is what the user sees
        convert_tool.main([str(path), str(tmp_path / "o.pth"), "--from", "mmdet"])
    message = str(exit_info.value.code)
    assert "\n" not in message and not (tmp_path / "o.pth").exists()
    assert message.startswith(
        f"error: {str(path)!r} is not in the layout of mmdetection's CondInst: it matches none"
    )
    with pytest.raises(ValueError, match="holds no weights of this model"):
        CondInstCheckpointer(_narrow_model()).load(str(path))


def _plain_giou_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    """mmdetection's box loss of (P, 4) (l, t, r, b): GIoU without smoothing, weighted by the
    centerness targets and divided by their sum."""
    (pl, pt, pr, pb), (tl, tt, tr, tb) = pred.unbind(1), target.unbind(1)
    inter = (torch.min(pl, tl) + torch.min(pr, tr)) * (torch.min(pt, tt) + torch.min(pb, tb))
    union = (pl + pr) * (pt + pb) + (tl + tr) * (tt + tb) - inter
    enclose = (torch.max(pl, tl) + torch.max(pr, tr)) * (torch.max(pt, tt) + torch.max(pb, tb))
    giou = inter / union - (enclose - union) / enclose
    weight = ctrness_targets(target)
    return float(((1 - giou) * weight).sum() / weight.sum())


def test_training_step_matches_but_for_the_box_loss_smoothing():
    """Same weights, image and GT as mmdetection's training step: the same 146 positives with
    the same GT, and the same classification, centerness and mask losses. The box loss differs
    because the authors' GIoU, which condinst_d2 keeps, smooths the IoU as
    (inter + 1) / (union + 1) (in units of the stride) and mmdetection's does not: the same
    predictions without the smoothing give mmdetection's value."""
    ref = np.load(_fixture() / "train_step.npz")
    model = _narrow_model()
    CondInstCheckpointer(model).load(str(_fixture() / "model.pth"))
    h, w = 800, 1199  # the resized image inside the padded (800, 1216) input
    gt = Instances((h, w))
    gt.gt_boxes = Boxes(torch.from_numpy(ref["gt_bboxes"]))
    gt.gt_classes = torch.from_numpy(ref["gt_labels"])
    gt.gt_masks = BitMasks(torch.from_numpy(ref["gt_masks"][:, :, :w]))
    image = torch.from_numpy(ref["inputs"][0, :, :h, :w]) * model.pixel_std + model.pixel_mean
    fcos = model.proposal_generator
    seen: Dict = {}
    hooks = [
        fcos.register_forward_hook(lambda mod, args, out: seen.__setitem__("args", args)),
        _capture(fcos.fcos_head, seen, "head"),
    ]
    losses = model.train()([{"image": image, "instances": gt}])
    for hook in hooks:
        hook.remove()
    theirs = {k: float(ref[k]) for k in ref.files if k.startswith("loss_")}
    assert losses["loss_fcos_cls"].item() == pytest.approx(theirs["loss_cls"], rel=1e-4)
    assert losses["loss_fcos_ctr"].item() == pytest.approx(theirs["loss_centerness"], rel=1e-4)
    assert losses["loss_mask"].item() == pytest.approx(theirs["loss_mask"], rel=1e-4)

    _, features, gt_instances = seen["args"]
    feats = [features[f] for f in fcos.in_features]
    targets = fcos.label_locations(fcos.level_locations(feats), gt_instances)
    pos = torch.nonzero(targets.labels != fcos.num_classes).squeeze(1)
    np.testing.assert_array_equal(pos.numpy(), ref["pos_inds"])
    np.testing.assert_array_equal(targets.gt_inds[pos].numpy(), ref["pos_gt_inds"])
    assert abs(losses["loss_fcos_loc"].item() - theirs["loss_bbox"]) > 0.01
    reg = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 4) for x in seen["head"].bbox_reg])
    plain = _plain_giou_loss(reg[pos].detach(), targets.reg_targets[pos])
    assert plain == pytest.approx(theirs["loss_bbox"], rel=1e-4)


def test_candidate_options_rank_score_and_clip():
    """One image of 10 x 10, three locations of stride 8, one class."""
    locations = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0]])
    cls = torch.tensor([0.9, 0.6, 0.7])  # sigmoid(cls) per location
    ctr = torch.tensor([0.2, 0.9, 0.5])  # cls * ctr: 0.18, 0.54, 0.35
    # (l, t, r, b) / 8: the 2nd box reaches x = 20 > 10, the 3rd spans y = 10..16 ...
    reg = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 0.5], [0.5, 0.25, 0.5, 0.5]])

    def candidates(**options):
        (result,) = candidates_single_level(
            locations,
            torch.logit(cls).reshape(1, 1, 1, 3),
            reg.t().reshape(1, 4, 1, 3),
            torch.logit(ctr).reshape(1, 1, 1, 3),
            8,
            0,
            [(10, 10)],
            score_thresh=0.05,
            pre_nms_topk=2,
            thresh_with_ctr=False,
            **options,
        )
        order = torch.argsort(result.loc_inds)
        return result.loc_inds[order].tolist(), result.scores[order], result.pred_boxes[order]

    kept, scores, boxes = candidates()  # the authors': top 2 by cls * ctr, sqrt
    assert kept == [1, 2]
    torch.testing.assert_close(scores, torch.tensor([0.54, 0.35]).sqrt())
    torch.testing.assert_close(boxes.tensor[0], torch.tensor([8.0, 0.0, 20.0, 8.0]))
    kept, scores, _ = candidates(topk_with_ctr=False, sqrt_score=False)
    assert kept == [0, 2]  # top 2 by cls alone
    torch.testing.assert_close(scores, torch.tensor([0.18, 0.35]))
    # ... so clipping to the image cuts the 2nd and leaves the 3rd empty (dropped).
    kept, _, boxes = candidates(clip_boxes=True)
    assert kept == [1]
    torch.testing.assert_close(boxes.tensor[0], torch.tensor([8.0, 0.0, 10.0, 8.0]))
