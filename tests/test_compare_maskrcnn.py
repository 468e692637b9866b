"""tools/compare_maskrcnn.py: CondInst and Mask R-CNN on the same backbone train and evaluate on the
same split, side by side; its user mistakes; the deterministic one-class split (condinst_d2.data.splits).
AP values after a few iterations are not asserted, only that both are measured."""

import importlib.util
import json
import math

import pytest
import torch

from condinst_d2.data import write_coco_split
from condinst_d2.data.splits import split_one_class, write_one_class_split

from helpers import ROOT, SHARED

COCO_SUBSET = SHARED / "datasets" / "coco_val2017_subset"
COCO_JSON = COCO_SUBSET / "annotations" / "instances_val2017_subset.json"
TINY = [  # images of 128x160, 3 iterations of batch 1: both models build, train and evaluate
    "SOLVER.MAX_ITER", 3, "SOLVER.IMS_PER_BATCH", 1, "SOLVER.WARMUP_ITERS", 1, "SOLVER.STEPS", "()",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 160,
    "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 160, "DATALOADER.NUM_WORKERS", 0,
    # barely trained models: keep every candidate of each, so that COCOeval scores something
    "MODEL.FCOS.INFERENCE_TH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "TEST.DETECTIONS_PER_IMAGE", 20, "MODEL.FCOS.POST_NMS_TOPK_TEST", 20,
]  # fmt: skip


def _tool():
    spec = importlib.util.spec_from_file_location(
        "compare_maskrcnn", ROOT / "tools" / "compare_maskrcnn.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exits_with_one(tool, argv):
    with pytest.raises(SystemExit) as exited:
        tool.main(argv)
    assert exited.value.code == 1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train = write_coco_split(str(root), "train", 4, (128, 160), seed=0)
    test = write_coco_split(str(root), "test", 2, (128, 160), seed=1)
    return [train, str(root / "train")], [test, str(root / "test")]


def test_both_models_train_and_evaluate_side_by_side(shapes, tmp_path, capsys):
    (train, train_dir), (test, test_dir) = shapes
    out = tmp_path / "results.json"
    argv = ["--train-dataset", train, train_dir, "--test-dataset", test, test_dir]
    argv += ["--output-dir", str(tmp_path), "--json", str(out), "--seeds", "1"]
    assert _tool().main(argv + [str(x) for x in TINY]) == 0
    table = capsys.readouterr().out
    assert "| CondInst, seed 1 |" in table and "| Mask R-CNN, seed 1 |" in table

    results = json.loads(out.read_text())
    assert [(r["model"], r["seed"]) for r in results["runs"]] == [
        ("condinst", 1),
        ("mask_rcnn", 1),
    ]
    for run in results["runs"]:
        for task in ("segm", "bbox"):
            for metric in ("AP", "AP50", "AP75"):
                assert math.isfinite(run[task][metric]), (run["model"], task, metric)
        assert run["seconds_per_iter"] > 0
    summary = results["summary"]["mask_rcnn"]["segm/AP"]
    assert summary == {"mean": results["runs"][1]["segm"]["AP"], "spread": 0.0}

    # Mask R-CNN ran with the heads, on CondInst's backbone and schedule.
    weights = torch.load(tmp_path / "mask_rcnn" / "seed1" / "model_final.pth")["model"]
    condinst = torch.load(tmp_path / "condinst" / "seed1" / "model_final.pth")["model"]
    assert weights["roi_heads.box_head.fc2.weight"].shape == (256, 256)
    assert weights["roi_heads.mask_head.mask_fcn4.weight"].shape == (64, 64, 3, 3)
    assert "backbone.fpn_lateral2.weight" in weights  # P2, Mask R-CNN's finest level
    shared = [k for k in condinst if k.startswith("backbone.bottom_up.")]
    assert shared and all(weights[k].shape == condinst[k].shape for k in shared)
    assert all(k in weights for k in shared)


def test_user_mistakes_are_one_line(shapes, tmp_path, capsys):
    (train, train_dir), (test, test_dir) = shapes
    tool = _tool()
    missing = str(tmp_path / "missing.json")
    argv = ["--train-dataset", missing, train_dir, "--test-dataset", test, test_dir]
    _exits_with_one(tool, argv + ["--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "missing.json" in err

    _exits_with_one(tool, ["--train-dataset", train, train_dir])
    assert "--test-dataset" in capsys.readouterr().err

    argv = ["--train-dataset", train, train_dir, "--test-dataset", test, test_dir]
    _exits_with_one(tool, argv + ["SOLVER.MAX_ITER", "2", "--seeds", "2"])
    assert "--seeds after the KEY VALUE overrides" in capsys.readouterr().err


def test_seeds_then_overrides_are_parsed():
    args = _tool().parse_args(["--seeds", "1", "2", "3", "SOLVER.MAX_ITER", "20"])
    assert args.seeds == [1, 2, 3] and args.opts == ["SOLVER.MAX_ITER", "20"]


def test_split_rule_holds_out_every_fourth_image_by_id():
    images = [
        {"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10} for i in range(9, 0, -1)
    ]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1 if i != 5 else 2, "iscrowd": int(i == 7)}
        for i in range(1, 10)
    ]
    data = {"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "person"}, {"id": 2, "name": "dog"}
    ]}  # fmt: skip
    train, val = split_one_class(data, "person")
    # Images with a non-crowd person: 1, 2, 3, 4, 6, 8, 9; ranks 3 (id 4) held out
    assert [i["id"] for i in train["images"]] == [1, 2, 3, 6, 8, 9]
    assert [i["id"] for i in val["images"]] == [4]
    assert [a["id"] for a in train["annotations"]] == [1, 2, 3, 6, 8, 9]
    assert train["categories"] == [{"id": 1, "name": "person"}]
    with pytest.raises(ValueError, match="no category 'cat'.*'dog', 'person'"):
        split_one_class(data, "cat")


def test_person_split_of_the_coco_subset(tmp_path, capsys):
    if not COCO_JSON.is_file():
        pytest.skip(f"the COCO val2017 subset is not at {COCO_SUBSET} (set CONDINST_SHARED)")
    argv = ["--split", str(COCO_JSON), "person", str(tmp_path / "a")]
    assert _tool().main(argv) == 0
    assert "person_train.json" in capsys.readouterr().out
    again = write_one_class_split(str(COCO_JSON), "person", str(tmp_path / "b"))
    splits = {}
    for split, path in zip(("train", "val"), again):
        text = (tmp_path / "a" / f"person_{split}.json").read_text()
        assert text == open(path).read()  # deterministic
        splits[split] = json.loads(text)
    train, val = splits["train"], splits["val"]
    assert (len(train["images"]), len(val["images"])) == (69, 23)
    instances = [sum(not a["iscrowd"] for a in s["annotations"]) for s in (train, val)]
    assert instances == [269, 81]  # the 350 person instances of the 92 images
    train_ids = {i["id"] for i in train["images"]}
    val_ids = {i["id"] for i in val["images"]}
    assert not train_ids & val_ids
    ranked = sorted(train_ids | val_ids)
    assert val_ids == set(ranked[3::4])
    assert all((COCO_SUBSET / "val2017" / i["file_name"]).is_file() for i in val["images"])


def test_a_diverging_run_is_reported_and_the_comparison_goes_on(shapes, tmp_path, capsys):
    (train, train_dir), (test, test_dir) = shapes
    out = tmp_path / "results.json"
    argv = ["--train-dataset", train, train_dir, "--test-dataset", test, test_dir]
    argv += ["--output-dir", str(tmp_path), "--json", str(out), "--seeds", "1"]
    assert _tool().main(argv + [str(x) for x in TINY] + ["SOLVER.BASE_LR", "1e9"]) == 0
    table = capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert [r["model"] for r in runs] == ["condinst", "mask_rcnn"]  # the second one still ran
    for run, name in zip(runs, ("CondInst", "Mask R-CNN")):
        assert run["diverged"].startswith("diverged at iteration "), run
        assert run["segm"]["AP"] is None and run["bbox"]["AP"] is None  # NaN in the JSON
        assert f"| {name}, seed 1 ({run['diverged'].split(':')[0]}) | - |" in table
