"""Foreign checkpoint layouts: the rename tables, loading the authors' files directly with
CondInstCheckpointer, and converting them explicitly with tools/convert_checkpoint.py."""

import logging
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from detectron2.modeling import build_model

from condinst_d2.checkpoint import (
    AUTHORS,
    FORMATS,
    MMDET,
    CondInstCheckpointer,
    KeyFormat,
    convert_state_dict,
    detect_format,
)

from helpers import CASES, ROOT, SHARED, condinst_cfg, load_reporting_incompatible, require_fixtures

TOOL = str(ROOT / "tools" / "convert_checkpoint.py")
MMDET_KEYS = SHARED / "fixtures" / "mmdet_condinst" / "keys.txt"


def _authors_state(case: str = "tiny_base"):
    return torch.load(require_fixtures() / case / "model.pth", map_location="cpu")


def _model(case: str = "tiny_base", **overrides):
    return build_model(
        condinst_cfg(require_fixtures() / case / "config_condinst.yaml", **overrides)
    )


def _convert(*args):
    return subprocess.run(
        [sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, check=False
    )


def test_rules_apply_in_order_with_groups_drops_and_left_overs():
    fmt = KeyFormat(
        name="toy",
        description="a toy layout",
        signature=r"head\..+",
        rules=(
            (r"head\.counter", None),
            (r"head\.(\w+)", r"proposal_generator.head.\1"),
            (r"backbone\..+", r"\g<0>"),
        ),
    )
    state = OrderedDict(
        [
            (k, torch.tensor([float(i)]))
            for i, k in enumerate(["head.w", "head.counter", "backbone.b", "x"])
        ]
    )
    state._metadata = OrderedDict([("backbone", {"version": 2})])
    conversion = convert_state_dict(state, fmt)
    assert list(conversion.state_dict) == ["proposal_generator.head.w", "backbone.b", "x"]
    assert conversion.renamed == [("head.w", "proposal_generator.head.w")]
    assert list(conversion.dropped) == ["head.counter"]
    assert conversion.left_over == ["x"]
    assert conversion.summary() == "1 renamed, 1 kept, 1 dropped, 1 left over"
    assert conversion.state_dict._metadata == state._metadata
    assert list(state) == ["head.w", "head.counter", "backbone.b", "x"]  # input untouched


def test_two_keys_mapping_to_one_is_an_error():
    fmt = KeyFormat("toy", "a toy layout", r"a", ((r"a|b", "c"),))
    with pytest.raises(ValueError, match="'a' and 'b' both map to 'c'"):
        convert_state_dict({"a": torch.zeros(1), "b": torch.zeros(1)}, fmt)


@pytest.mark.parametrize("case", CASES)
def test_authors_table_renames_the_controller_and_drops_the_mask_head_buffers(case):
    state = _authors_state(case)["model"]
    assert detect_format(state) is AUTHORS
    conversion = convert_state_dict(state, AUTHORS)
    assert conversion.renamed == [
        (f"controller.{p}", f"proposal_generator.fcos_head.controller.{p}")
        for p in ("weight", "bias")
    ]
    assert sorted(conversion.dropped) == ["mask_head._iter", "mask_head.sizes_of_interest"]
    assert conversion.left_over == []


def test_condinst_d2_and_mmdet_checkpoints_are_not_taken_for_the_authors():
    model = _model()
    assert detect_format(model.state_dict()) is None
    if MMDET_KEYS.is_file():  # a second layout must not be converted with the authors' table
        keys = [line.split("\t")[0] for line in MMDET_KEYS.read_text().splitlines()]
        assert not AUTHORS.matches(keys)
        assert detect_format(keys) is MMDET


@pytest.mark.parametrize("case", CASES)
def test_authors_checkpoint_loads_every_tensor(case):
    model = _model(case)
    incompatible = load_reporting_incompatible(model, require_fixtures() / case / "model.pth")
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    authors = _authors_state(case)["model"]
    ours = model.state_dict()
    torch.testing.assert_close(
        ours["proposal_generator.fcos_head.controller.weight"], authors["controller.weight"]
    )
    torch.testing.assert_close(
        ours["mask_branch.tower.4.weight"], authors["mask_branch.tower.4.weight"]
    )


def test_conversion_on_load_is_logged_in_one_line(caplog, monkeypatch):
    # Detectron2's setup_logger (train_net, quick-start) stops propagation at "condinst_d2".
    monkeypatch.setattr(logging.getLogger("condinst_d2"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="condinst_d2.checkpoint.checkpointer"):
        CondInstCheckpointer(_model()).load(str(require_fixtures() / "tiny_base" / "model.pth"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Converted")]
    assert len(lines) == 1
    assert lines[0].endswith(
        "model.pth from the authors' CondInst (AdelaiDet): 2 renamed, 368 kept, 2 dropped, 0 left over"
    )


def test_mismatched_sizes_of_interest_is_a_clear_error(tmp_path):
    state = _authors_state()
    state["model"]["mask_head.sizes_of_interest"] = torch.tensor([32.0, 64, 128, 256, 512])
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    message = (
        r"mask_head.sizes_of_interest in the checkpoint is \[32.0, .*\] but the model has \[64, "
    )
    with pytest.raises(RuntimeError, match=message):
        CondInstCheckpointer(_model()).load(str(path))


def test_own_checkpoint_round_trip(tmp_path):
    model = _model()
    CondInstCheckpointer(model).load(str(require_fixtures() / "tiny_base" / "model.pth"))
    CondInstCheckpointer(model, save_dir=str(tmp_path)).save("ours")
    saved = torch.load(tmp_path / "ours.pth", map_location="cpu")["model"]
    assert "proposal_generator.fcos_head.controller.weight" in saved
    assert not any(k.startswith("controller.") or k.startswith("mask_head.") for k in saved)
    fresh = _model()
    incompatible = load_reporting_incompatible(fresh, tmp_path / "ours.pth")
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)


def test_convert_tool_prints_mapping_and_writes_loadable_file(tmp_path):
    case_dir = require_fixtures() / "tiny_base"
    out = tmp_path / "converted.pth"
    result = _convert(
        case_dir / "model.pth",
        out,
        "--from",
        "authors",
        "--config-file",
        case_dir / "config_condinst.yaml",
    )
    assert result.returncode == 0, result.stderr
    assert (
        "renamed  controller.weight -> proposal_generator.fcos_head.controller.weight"
        in result.stdout
    )
    assert "dropped  mask_head._iter" in result.stdout
    assert "dropped  mask_head.sizes_of_interest = [64, 128, 256, 512, 1024]" in result.stdout
    assert "370 tensors: 2 renamed, 368 kept, 2 dropped, 0 left over" in result.stdout
    assert "missing keys: 0" in result.stdout and "unexpected keys: 0" in result.stdout
    converted = torch.load(out, map_location="cpu")["model"]
    assert len(converted) == 370 and "controller.weight" not in converted
    incompatible = load_reporting_incompatible(_model(), out)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []


def test_convert_tool_reports_left_overs_and_config_mismatches(tmp_path):
    case_dir = require_fixtures() / "tiny_base"
    state = _authors_state()
    state["model"]["extra.weight"] = torch.zeros(2)
    state["model"]["mask_head.sizes_of_interest"] = torch.tensor([32, 64, 128, 256, 512])
    edited = tmp_path / "edited.pth"
    torch.save(state, edited)
    result = _convert(
        edited, tmp_path / "o.pth", "--config-file", case_dir / "config_condinst.yaml"
    )
    assert result.returncode == 1, result.stderr
    assert "left over  extra.weight" in result.stdout
    assert re.search(r"unexpected keys: 1\n  extra.weight\n", result.stdout)
    assert "mismatch: mask_head.sizes_of_interest in the checkpoint is [32, 64" in result.stdout


def test_convert_tool_refuses_a_file_of_no_known_format(tmp_path):
    ours = tmp_path / "ours.pth"
    torch.save({"model": _model().state_dict()}, ours)
    result = _convert(ours, tmp_path / "o.pth", "--from", "authors")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        f"error: {str(ours)!r} is not in the layout of the authors' CondInst (AdelaiDet): it "
        f"matches none of the known formats ({', '.join(FORMATS)})"
    ]
    assert not (tmp_path / "o.pth").exists()


def test_convert_tool_rejects_missing_and_truncated_files(tmp_path):
    missing = _convert(tmp_path / "nope.pth", tmp_path / "o.pth")
    assert missing.returncode != 0 and "nope.pth" in missing.stderr
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((require_fixtures() / "tiny_base" / "model.pth").read_bytes()[:1000])
    bad = _convert(truncated, tmp_path / "o.pth")
    assert bad.returncode != 0 and "truncated.pth" in bad.stderr
    assert not (tmp_path / "o.pth").exists()
