"""fold_batchnorm: the frozen / eval-mode norms folded into their convs give the same
predictions up to float rounding (on the authors' tiny fixture model), and the Predictor folds
only when MODEL.CONDINST.FOLD_BATCHNORM is set."""

import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.modeling.fold_batchnorm import fold_batchnorm
from condinst_d2.predictor import Predictor

from helpers import condinst_cfg, inference_cases, require_fixtures, small_cfg


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.modules())


def test_folded_model_predicts_the_same_up_to_rounding():
    case_dir = require_fixtures() / "tiny_sem"
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml"))
    CondInstCheckpointer(model).load(str(case_dir / "model.pth"))
    model.eval()
    folded = copy.deepcopy(model)
    norms = _norms(model)
    assert norms > 20  # the backbone's FrozenBNs and the mask branch's BNs
    assert fold_batchnorm(folded) == norms and _norms(folded) == 0
    _, image, _ = next(iter(inference_cases(case_dir)))
    inputs = [{"image": torch.as_tensor(image).float()}]
    with torch.no_grad():
        ref, out = model(inputs)[0]["instances"], folded(inputs)[0]["instances"]
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
