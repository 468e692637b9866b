"""Test helpers: the reference fixtures in ../shared and small CondInst models on CPU."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances, PolygonMasks

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.config import get_condinst_cfg
from condinst_d2.data import drop_masks

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONDINST_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "authors_condinst"
CASES = ["tiny_base", "tiny_sem", "tiny_variants"]


def require_fixtures() -> Path:
    if not (FIXTURES / "tiny_base" / "model.pth").is_file():
        pytest.skip(f"the authors' reference fixtures are not at {FIXTURES} (set CONDINST_SHARED)")
    return FIXTURES


def condinst_cfg(config_file, **overrides):
    """A frozen-free CfgNode from `config_file` on CPU; overrides given as KEY=value pairs."""
    opts = ["MODEL.DEVICE", "cpu"] + [x for kv in overrides.items() for x in kv]
    return get_condinst_cfg(str(config_file), opts)


def write_boxes_only(data: dict, folder: Path) -> str:
    """COCO `data` without its masks (as tools/boxes_only.py writes it) in folder/boxes_only.json."""
    drop_masks(data)
    out_file = folder / "boxes_only.json"
    out_file.write_text(json.dumps(data))
    return str(out_file)


def small_cfg(**overrides):
    return condinst_cfg(ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml", **overrides)


def load_reporting_incompatible(model: torch.nn.Module, path):
    """Loads `path` into `model` with CondInstCheckpointer; returns the incompatible keys
    (missing_keys, unexpected_keys, incorrect_shapes) that Detectron2 would log."""
    checkpointer = CondInstCheckpointer(model)
    reports = []
    checkpointer._log_incompatible_keys = reports.append
    checkpointer.load(str(path))
    return reports[0]


def load_train_batch(case_dir: Path):
    """The fixture's 2-image training batch as Detectron2 input dicts (polygon GT masks)."""
    meta = json.loads((case_dir / "train" / "train_batch.json").read_text())
    arrays = np.load(case_dir / "train" / "train_batch.npz")
    inputs = []
    for i, image_meta in enumerate(meta["images"]):
        image = arrays[f"image_chw_im{i}"]
        anns = image_meta["annotations"]
        gt = Instances(tuple(image_meta["image_hw"]))
        gt.gt_boxes = Boxes(torch.tensor([a["bbox_xyxy"] for a in anns], dtype=torch.float32))
        gt.gt_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
        gt.gt_masks = PolygonMasks([[np.asarray(a["polygon"], dtype=np.float64)] for a in anns])
        inputs.append({"image": torch.as_tensor(image).float(), "instances": gt})
    return inputs


def inference_cases(case_dir: Path):
    """(name, image_chw uint8, reference prediction arrays) of each inference input."""
    for path in sorted((case_dir / "infer").glob("*_input.npz")):
        name = path.name[: -len("_input.npz")]
        yield name, np.load(path)["image_chw"], np.load(case_dir / "infer" / f"{name}_pred.npz")


def synthetic_instances(h: int, w: int, boxes, classes) -> Instances:
    """Ground truth with rectangular polygon masks for the given xyxy boxes."""
    gt = Instances((h, w))
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    gt.gt_classes = torch.tensor(classes, dtype=torch.long)
    gt.gt_masks = PolygonMasks(
        [[np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)] for x0, y0, x1, y1 in boxes]
    )
    return gt


def assert_same_detections(out, ref, what: str):
    """Parity bar of the reference fixtures: count, classes, boxes, scores and mask pixels."""
    assert len(out) == len(ref["scores"]), (
        f"{what}: {len(out)} detections, reference {len(ref['scores'])}"
    )
    np.testing.assert_array_equal(out.pred_classes.numpy(), ref["pred_classes"], err_msg=what)
    np.testing.assert_allclose(out.scores.numpy(), ref["scores"], rtol=0, atol=1e-4, err_msg=what)
    np.testing.assert_allclose(
        out.pred_boxes.tensor.numpy(), ref["pred_boxes"], rtol=0, atol=1e-2, err_msg=what
    )
    agreement = (out.pred_masks.numpy() == ref["pred_masks"].astype(bool)).mean()
    assert agreement >= 0.9999, f"{what}: masks agree on {agreement:.6%} of pixels"
