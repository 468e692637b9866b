"""Loading the authors' checkpoints and converting them explicitly."""
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from helpers import CASES, ROOT, condinst_cfg, require_fixtures


def _load_reporting_incompatible(model, path):
    checkpointer = DetectionCheckpointer(model)
    reports = []
    checkpointer._log_incompatible_keys = reports.append
    checkpointer.load(str(path))
    return reports[0]


@pytest.mark.parametrize("case", CASES)
def test_authors_checkpoint_loads_every_tensor(case):
    case_dir = require_fixtures() / case
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml"))
    incompatible = _load_reporting_incompatible(model, case_dir / "model.pth")
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    authors = torch.load(case_dir / "model.pth", map_location="cpu")["model"]
    ours = model.state_dict()
    torch.testing.assert_close(ours["proposal_generator.fcos_head.controller.weight"], authors["controller.weight"])
    torch.testing.assert_close(ours["mask_branch.tower.4.weight"], authors["mask_branch.tower.4.weight"])


def test_mismatched_sizes_of_interest_is_a_clear_error(tmp_path):
    case_dir = require_fixtures() / "tiny_base"
    state = torch.load(case_dir / "model.pth", map_location="cpu")
    state["model"]["mask_head.sizes_of_interest"] = torch.tensor([32.0, 64, 128, 256, 512])
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    model = build_model(condinst_cfg(case_dir / "config_condinst.yaml"))
    with pytest.raises(RuntimeError, match="sizes_of_interest"):
        DetectionCheckpointer(model).load(str(path))


def test_own_checkpoint_round_trip(tmp_path):
    case_dir = require_fixtures() / "tiny_base"
    cfg = condinst_cfg(case_dir / "config_condinst.yaml")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(case_dir / "model.pth"))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ours")
    saved = torch.load(tmp_path / "ours.pth", map_location="cpu")["model"]
    assert "proposal_generator.fcos_head.controller.weight" in saved
    assert not any(k.startswith("controller.") or k.startswith("mask_head.") for k in saved)
    fresh = build_model(cfg)
    incompatible = _load_reporting_incompatible(fresh, tmp_path / "ours.pth")
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)


def test_convert_tool_prints_mapping_and_writes_loadable_file(tmp_path):
    case_dir = require_fixtures() / "tiny_base"
    out = tmp_path / "converted.pth"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(case_dir / "model.pth"), str(out),
         "--config-file", str(case_dir / "config_condinst.yaml")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "renamed  controller.weight -> proposal_generator.fcos_head.controller.weight" in result.stdout
    assert "dropped  mask_head._iter" in result.stdout
    assert "missing keys: 0" in result.stdout and "unexpected keys: 0" in result.stdout
    converted = torch.load(out, map_location="cpu")["model"]
    assert len(converted) == 370
    assert "controller.weight" not in converted


def test_convert_tool_rejects_missing_and_truncated_files(tmp_path):
    tool = str(ROOT / "tools" / "convert_checkpoint.py")
    missing = subprocess.run([sys.executable, tool, str(tmp_path / "nope.pth"), str(tmp_path / "o.pth")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "nope.pth" in missing.stderr
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((require_fixtures() / "tiny_base" / "model.pth").read_bytes()[:1000])
    bad = subprocess.run([sys.executable, tool, str(truncated), str(tmp_path / "o.pth")], capture_output=True, text=True)
    assert bad.returncode != 0 and "truncated.pth" in bad.stderr
    assert not (tmp_path / "o.pth").exists()
