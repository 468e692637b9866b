"""Every YAML merges and builds; the authors' merged configs merge unchanged; bad settings fail early."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from condinst_d2 import add_condinst_config

from helpers import CASES, ROOT, condinst_cfg, require_fixtures

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SMALL = ROOT / "configs/CondInst/Small_R_18_CPU.yaml"


def test_add_condinst_config_leaves_detectron2_defaults_alone():
    add_condinst_config(get_cfg())
    assert not hasattr(get_cfg().MODEL, "FCOS")
    assert not hasattr(get_cfg().MODEL, "CONDINST")


def test_defaults_are_the_authors():
    cfg = get_cfg()
    add_condinst_config(cfg)
    assert cfg.MODEL.FCOS.SIZES_OF_INTEREST == [64, 128, 256, 512]
    assert (cfg.MODEL.FCOS.NMS_TH, cfg.MODEL.FCOS.POS_RADIUS, cfg.MODEL.FCOS.THRESH_WITH_CTR) == (
        0.6,
        1.5,
        False,
    )
    assert (cfg.MODEL.CONDINST.MASK_OUT_STRIDE, cfg.MODEL.CONDINST.MASK_HEAD.CHANNELS) == (4, 8)
    ci = cfg.MODEL.CONDINST
    assert ci.MASK_NMS is False
    # mask NMS keeps the numbers it had while it shared FCOS's NMS_TH / PRE_ / POST_NMS_TOPK_TEST
    assert (ci.MASK_NMS_TH, ci.MASK_NMS_PRE_TOPK, ci.MASK_NMS_POST_TOPK) == (0.6, 1000, 100)


def test_training_time_detection_keys_load_but_change_nothing():
    """FCOS decodes no detections in training: the authors' *_TRAIN keys merge and are ignored."""
    train_keys = {
        "MODEL.FCOS.INFERENCE_TH_TRAIN": 0.9,
        "MODEL.FCOS.PRE_NMS_TOPK_TRAIN": 1,
        "MODEL.FCOS.POST_NMS_TOPK_TRAIN": 1,
    }
    settings = ("score_thresh", "pre_nms_topk", "nms_thresh", "max_detections_per_image", "box_nms")
    for overrides in ({}, train_keys):
        fcos = build_model(condinst_cfg(SMALL, **overrides)).proposal_generator
        assert [getattr(fcos, k) for k in settings] == [0.05, 1000, 0.6, 100, True]


def test_mask_nms_replaces_box_nms():
    overrides = {"MODEL.CONDINST.MASK_NMS": True, "MODEL.CONDINST.MASK_NMS_PRE_TOPK": 300}
    model = build_model(condinst_cfg(SMALL, **overrides))
    fcos = model.proposal_generator
    assert fcos.box_nms is False and fcos.max_detections_per_image == 300
    assert model.mask_nms and (model.mask_nms_thresh, model.mask_nms_post_topk) == (0.6, 100)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_merges_and_builds(path):
    cfg = condinst_cfg(path)
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE == "CondInst"
    head = model.proposal_generator.fcos_head
    # BoxInst's mask branch has 16 output channels: (16+2)*8+8 + 8*8+8 + 8+1 parameters
    num_params = 233 if cfg.MODEL.BOXINST.ENABLED else 169
    assert head.controller.out_channels == model.mask_head.num_params == num_params
    assert model.mask_head.mask_loss.names == (
        ("loss_prj", "loss_pairwise") if cfg.MODEL.BOXINST.ENABLED else ("loss_mask",)
    )
    assert head.cls_logits.out_channels == cfg.MODEL.FCOS.NUM_CLASSES
    assert hasattr(model.mask_branch, "seg_head") == cfg.MODEL.CONDINST.MASK_BRANCH.SEMANTIC_LOSS_ON


def test_paper_variants_differ_as_named():
    depth = {p.stem: condinst_cfg(p).MODEL.RESNETS.DEPTH for p in CONFIGS}
    assert (
        depth["MS_R_50_3x"] == 50
        and depth["MS_R_101_3x"] == 101
        and depth["MS_R_101_3x_sem"] == 101
    )
    assert condinst_cfg(ROOT / "configs/CondInst/MS_R_50_3x.yaml").SOLVER.MAX_ITER == 270000
    assert condinst_cfg(ROOT / "configs/CondInst/MS_R_50_1x.yaml").SOLVER.MAX_ITER == 90000
    assert condinst_cfg(
        ROOT / "configs/CondInst/MS_R_50_3x_sem.yaml"
    ).MODEL.CONDINST.MASK_BRANCH.SEMANTIC_LOSS_ON


@pytest.mark.parametrize("case", CASES)
def test_authors_merged_config_merges_unchanged(case):
    path = require_fixtures() / case / "config_condinst.yaml"
    cfg = condinst_cfg(path)
    assert cfg.MODEL.CONDINST.MAX_PROPOSALS == 500 and cfg.MODEL.FCOS.THRESH_WITH_CTR


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  CONDINST:\n    MASK_HEADS:\n      CHANNELS: 8\n")
    cfg = get_cfg()
    add_condinst_config(cfg)
    with pytest.raises(KeyError, match="MODEL.CONDINST.MASK_HEADS"):
        cfg.merge_from_file(str(bad))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"MODEL.CONDINST.MAX_PROPOSALS": 500, "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM": 64},
            "cannot both be set",
        ),
        ({"MODEL.CONDINST.BOTTOM_PIXELS_REMOVED": 10}, "BOTTOM_PIXELS_REMOVED"),
        ({"MODEL.FCOS.USE_DEFORMABLE": True}, "USE_DEFORMABLE"),
        ({"MODEL.FCOS.TOP_LEVELS": 1}, "TOP_LEVELS"),
        ({"MODEL.FCOS.FPN_STRIDES": [8, 16, 32]}, "FPN_STRIDES"),
        ({"MODEL.FCOS.LOSS_NORMALIZER_CLS": "moving_fg"}, "LOSS_NORMALIZER_CLS"),
        ({"MODEL.PROPOSAL_GENERATOR.NAME": "RPN"}, "PROPOSAL_GENERATOR.NAME"),
        ({"MODEL.CONDINST.MASK_OUT_STRIDE": 16}, "MASK_OUT_STRIDE"),
    ],
)
def test_inconsistent_settings_fail_at_build(overrides, message):
    cfg = condinst_cfg(SMALL, **overrides)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_p2_config_reads_its_mask_features_at_stride_4():
    cfg = condinst_cfg(ROOT / "configs/CondInst/EfficientNetLite0_P2_CPU.yaml")
    model = build_model(cfg).eval()
    shapes = []
    model.mask_branch.register_forward_hook(lambda m, args, out: shapes.append(out[0].shape))
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 255, (3, 128, 160)).float()}])
    assert model.mask_branch.in_features == ["p2", "p3", "p4", "p5"]
    assert shapes[0][-2:] == (32, 40)  # stride 4 of the 128x160 input
    assert out["instances"].pred_masks.shape[1:] == (128, 160)
    assert model.proposal_generator.in_features == ["p3", "p4", "p5", "p6", "p7"]
