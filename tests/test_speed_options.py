"""The opt-in speed options: fold_batchnorm (MODEL.CONDINST.FOLD_BATCHNORM) gives the same
predictions up to float rounding, and bf16 (MODEL.CONDINST.BF16) runs the dense convolutions in
bf16, the rest in float32: at inference it finds the same objects, in training its losses and
gradients are float32's up to bf16 rounding, on the authors' tiny fixture models; training also
runs under autocast (SOLVER.AMP's path, on a GPU), which SOLVER.AMP refuses on a CPU."""

import copy
import logging

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from torch import nn

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.config import get_condinst_cfg
from condinst_d2.engine import check_solver
from condinst_d2.modeling import meta_arch
from condinst_d2.modeling.fold_batchnorm import fold_batchnorm
from condinst_d2.predictor import Predictor

from helpers import condinst_cfg, inference_cases, load_train_batch, require_fixtures, small_cfg


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.modules())


def _fixture_model(case: str) -> nn.Module:
    case_dir = require_fixtures() / case
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml"))
    CondInstCheckpointer(model).load(str(case_dir / "model.pth"))
    return model.eval()


def _predict(model: nn.Module, case: str):
    _, image, _ = next(iter(inference_cases(require_fixtures() / case)))
    with torch.no_grad():
        return model([{"image": torch.as_tensor(image).float()}])[0]["instances"]


def test_the_dynamic_head_in_a_few_instances_per_call_gives_the_masks_of_one_call(monkeypatch):
    """At inference CondInst runs the dynamic head on at most MASK_HEAD_VALUES_PER_CALL mask
    feature values per call: the same probabilities, to the bit, as one call for all."""
    model = _fixture_model("tiny_base")
    _, image, _ = next(iter(inference_cases(require_fixtures() / "tiny_base")))
    with torch.no_grad():
        images = model.preprocess_image([{"image": torch.as_tensor(image).float()}])
        features = model.backbone(images.tensor)
        mask_feats, _ = model.mask_branch(features)
        detections = model.proposal_generator(images, features)[0][0]
        one_call = model.mask_head(mask_feats, detections).sigmoid()
        calls = []
        model.mask_head.register_forward_hook(lambda m, args, out: calls.append(len(out)))
        monkeypatch.setattr(meta_arch, "MASK_HEAD_VALUES_PER_CALL", 3 * mask_feats[0].numel())
        chunked = model.mask_probabilities(mask_feats, detections)
        none = model.mask_probabilities(mask_feats, detections[:0])
    d = len(detections)
    assert d > 10 and calls == [3] * (d // 3) + [d % 3] * (d % 3 > 0) + [0]
    assert torch.equal(chunked, one_call)
    assert none.shape == (0, *one_call.shape[1:])


def test_folded_model_predicts_the_same_up_to_rounding():
    model = _fixture_model("tiny_sem")
    folded = copy.deepcopy(model)
    norms = _norms(model)
    assert norms > 20  # the backbone's FrozenBNs and the mask branch's BNs
    assert fold_batchnorm(folded) == norms and _norms(folded) == 0
    ref, out = _predict(model, "tiny_sem"), _predict(folded, "tiny_sem")
    assert len(out) == len(ref) > 10
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=1e-2)
    assert (out.pred_masks == ref.pred_masks).float().mean() > 0.9999


def test_fold_refuses_a_training_model_and_keeps_group_norm():
    model = build_model(small_cfg())
    with pytest.raises(ValueError, match="model.eval"):
        fold_batchnorm(model)
    group_norms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    fold_batchnorm(model.eval())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == group_norms > 0


@pytest.mark.parametrize("fold", [False, True])
def test_predictor_folds_when_configured(fold):
    cfg = small_cfg(**{"MODEL.WEIGHTS": "", "MODEL.CONDINST.FOLD_BATCHNORM": fold})
    predictor = Predictor(cfg)
    assert (_norms(predictor.model) == 0) == fold


def _output_dtypes(model: nn.Module, names) -> dict:
    """Records the dtype of the output of each named submodule at its last call."""
    dtypes = {}
    for name in names:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, args, out, n=name: dtypes.update({n: out.dtype}))
    return dtypes


def test_bf16_runs_the_dense_convs_in_bf16_and_finds_the_same_objects():
    """bf16 keeps 8 bits of mantissa: on this random tiny model the near-tied scores reorder, so
    the bar is that each of float32's 5 best boxes is found again (IoU > 0.5)."""
    model = _fixture_model("tiny_base")
    ref = _predict(model, "tiny_base")
    model.bf16 = True
    dense = ["proposal_generator.fcos_head.cls_logits", "mask_branch.tower"]
    dtypes = _output_dtypes(model, dense + ["mask_head"])
    out = _predict(model, "tiny_base")
    assert dtypes == {
        dense[0]: torch.bfloat16,
        dense[1]: torch.bfloat16,
        "mask_head": torch.float32,
    }
    assert out.scores.dtype == out.pred_boxes.tensor.dtype == torch.float32
    assert out.pred_masks.shape[1:] == ref.pred_masks.shape[1:]
    assert len(out) > 50 and abs(len(out) - len(ref)) <= 5
    assert (pairwise_iou(ref.pred_boxes[:5], out.pred_boxes).max(dim=1).values > 0.5).all()


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_arithmetic_warns(monkeypatch, caplog, has_bf16):
    monkeypatch.setattr(meta_arch, "_cpu_has_bf16", lambda: has_bf16)
    # Detectron2's setup_logger (run by other tests' tools) stops it from propagating.
    monkeypatch.setattr(logging.getLogger("condinst_d2"), "propagate", True)
    build_model(small_cfg(**{"MODEL.WEIGHTS": "", "MODEL.CONDINST.BF16": True}))
    assert ("this CPU has no bf16 arithmetic" in caplog.text) == (not has_bf16)


def test_a_config_saved_with_the_replaced_bf16_backbone_key_still_loads(tmp_path):
    saved = tmp_path / "config.yaml"
    cfg = small_cfg()
    saved.write_text(cfg.dump().replace("    BF16: false", "    BF16_BACKBONE: false"))
    assert "BF16_BACKBONE" in saved.read_text()
    assert get_condinst_cfg(str(saved)).MODEL.CONDINST.BF16 is False


def test_training_runs_under_autocast_with_close_losses():
    """AMPTrainer runs the model's forward under autocast (float16 on a GPU); here bfloat16 on
    the CPU: every loss stays float32, finite and within bf16's precision of float32's."""
    model = _fixture_model("tiny_base").train()
    batch = load_train_batch(require_fixtures() / "tiny_base")
    torch.manual_seed(0)
    ref = model(batch)
    dtypes = _output_dtypes(model, ["proposal_generator.fcos_head.cls_logits"])
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    sum(losses.values()).backward()
    assert dtypes == {"proposal_generator.fcos_head.cls_logits": torch.bfloat16}
    assert set(losses) == set(ref)
    for name, loss in losses.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        torch.testing.assert_close(loss, ref[name], rtol=0.05, atol=0.02, msg=name)


@pytest.mark.parametrize("case", ["tiny_base", "tiny_sem"])
def test_bf16_training_runs_the_dense_convs_in_bf16_with_float32_losses_and_gradients(case):
    """The losses and the mask head stay float32, and so do the gradients. bf16 rounds the dense
    convs' products to 8 bits of mantissa, which this random tiny model amplifies layer by layer
    on the way down (its deepest layers' gradients keep a cosine of ~0.5 with float32's): the
    bar is the layers that make the outputs, whose gradients point the way float32's do, and
    the whole gradient's norm."""
    model = _fixture_model(case).train()
    batch = load_train_batch(require_fixtures() / case)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def losses_and_gradients():
        torch.manual_seed(0)
        losses = model(batch)
        grads = torch.autograd.grad(sum(losses.values()), list(params.values()), allow_unused=True)
        return losses, {n: g for n, g in zip(params, grads) if g is not None}

    ref, ref_grads = losses_and_gradients()
    model.bf16 = True
    dense = ["proposal_generator.fcos_head.cls_logits", "mask_branch.tower"]
    dtypes = _output_dtypes(model, dense + ["mask_head"])
    losses, grads = losses_and_gradients()
    assert dtypes == {
        dense[0]: torch.bfloat16,
        dense[1]: torch.bfloat16,
        "mask_head": torch.float32,
    }
    assert set(losses) == set(ref) and ("loss_sem" in losses) == (case == "tiny_sem")
    for name, loss in losses.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        torch.testing.assert_close(loss, ref[name], rtol=0.02, atol=0.01, msg=name)
    assert grads.keys() == ref_grads.keys()
    assert all(g.dtype == torch.float32 for g in grads.values())
    head = "proposal_generator.fcos_head."
    outputs = [head + "cls_logits", head + "bbox_pred", head + "ctrness", head + "controller"]
    for name in outputs + ["mask_branch.tower.4"]:
        cosine = torch.cosine_similarity(
            grads[name + ".weight"].flatten(), ref_grads[name + ".weight"].flatten(), dim=0
        )
        assert cosine > 0.94, name
    norm, ref_norm = (
        torch.cat([g.flatten() for g in x.values()]).norm() for x in (grads, ref_grads)
    )
    assert 0.9 < norm / ref_norm < 1.1


def test_amp_on_a_cpu_is_refused_with_a_clear_message():
    cfg = small_cfg(**{"SOLVER.AMP.ENABLED": True})
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED needs a CUDA GPU"):
        check_solver(cfg)
