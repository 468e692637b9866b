"""CondInstCheckpointer: clear errors for unreadable files and checkpoints of other models."""

import os
import re
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from condinst_d2.checkpoint.checkpointer import CondInstCheckpointer
from condinst_d2.engine import build_cfg

from helpers import load_reporting_incompatible, require_fixtures

_PROBE = "mask_branch.tower.4.weight"


@pytest.fixture(scope="module")
def case_dir() -> Path:
    """The tiny_base fixture of the authors' checkpoints (skips without ../shared)."""
    return require_fixtures() / "tiny_base"


@pytest.fixture
def model(case_dir: Path) -> torch.nn.Module:
    """A freshly initialized CondInst model of the fixture's config, on CPU."""
    cfg = build_cfg(str(case_dir / "config_condinst.yaml"), ["MODEL.DEVICE", "cpu"])
    return build_model(cfg)


def test_truncated_file_names_it(model, case_dir, tmp_path):
    path = tmp_path / "truncated.pth"
    data = (case_dir / "model.pth").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"cannot read checkpoint {str(path)!r}")):
        CondInstCheckpointer(model).load(str(path))


def test_random_bytes_name_the_file(model, tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=re.escape(f"cannot read checkpoint {str(path)!r}")):
        CondInstCheckpointer(model).load(str(path))


def test_missing_file_names_it(model, tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        CondInstCheckpointer(model).load(str(path))


def test_empty_path_loads_nothing(model):
    before = model.state_dict()[_PROBE].clone()
    assert CondInstCheckpointer(model).load("") == {}
    torch.testing.assert_close(model.state_dict()[_PROBE], before)


def test_unrelated_model_holds_no_weights(model, tmp_path):
    path = tmp_path / "classifier.pth"
    torch.save(
        {
            "model": {
                "features.0.weight": torch.zeros(64, 3, 11, 11),
                "classifier.1.bias": torch.zeros(10),
            }
        },
        path,
    )
    with pytest.raises(ValueError, match="holds no weights of this model") as info:
        CondInstCheckpointer(model).load(str(path))
    message = str(info.value)
    assert str(path) in message and "features.0.weight" in message and "backbone." in message


def test_authors_checkpoint_loads_and_changes_weights(model, case_dir):
    before = model.state_dict()[_PROBE].clone()
    incompatible = load_reporting_incompatible(model, case_dir / "model.pth")
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    authors = torch.load(case_dir / "model.pth", map_location="cpu")["model"]
    torch.testing.assert_close(model.state_dict()[_PROBE], authors[_PROBE])
    assert not torch.equal(model.state_dict()[_PROBE], before)


def test_backbone_only_subset_is_a_legit_partial_init(model, case_dir, tmp_path):
    state = torch.load(case_dir / "model.pth", map_location="cpu")
    backbone = {k: v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert backbone
    path = tmp_path / "backbone.pth"
    torch.save({"model": backbone}, path)
    key = next(k for k in backbone if k.endswith(".weight"))
    incompatible = load_reporting_incompatible(model, path)
    assert incompatible.missing_keys and not incompatible.unexpected_keys
    torch.testing.assert_close(model.state_dict()[key], backbone[key])


def test_shape_mismatch_keeps_detectron2_warnings(model, case_dir, tmp_path):
    state = torch.load(case_dir / "model.pth", map_location="cpu")
    key = next(k for k in state["model"] if k.endswith("cls_logits.weight"))
    state["model"][key] = torch.zeros(7, *state["model"][key].shape[1:])
    path = tmp_path / "other_classes.pth"
    torch.save(state, path)
    incompatible = load_reporting_incompatible(model, path)
    assert [k for k, _, _ in incompatible.incorrect_shapes] == [key]


def test_inference_refuses_head_shapes_of_another_config(case_dir, tmp_path):
    """A model trained for 4 classes, loaded for inference into the fixture's 80-class config:
    refused, naming the tensor and the key to set; fine-tuning still skips it with a warning."""
    four = build_model(
        build_cfg(
            str(case_dir / "config_condinst.yaml"),
            ["MODEL.DEVICE", "cpu", "MODEL.FCOS.NUM_CLASSES", "4"],
        )
    )
    path = tmp_path / "four_classes.pth"
    torch.save({"model": four.state_dict()}, path)
    cfg = build_cfg(str(case_dir / "config_condinst.yaml"), ["MODEL.DEVICE", "cpu"])
    eighty = build_model(cfg)
    message = r"cls_logits\.weight' \(4, .*set MODEL\.FCOS\.NUM_CLASSES 4"
    with pytest.raises(ValueError, match=message):
        CondInstCheckpointer(eighty, for_inference=True).load(str(path))
    incompatible = load_reporting_incompatible(eighty, str(path))
    assert {k for k, _, _ in incompatible.incorrect_shapes} == {
        "proposal_generator.fcos_head.cls_logits.weight",
        "proposal_generator.fcos_head.cls_logits.bias",
    }
