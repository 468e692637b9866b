"""Interrupted training: checkpoints are complete or absent, and --resume after SIGKILL continues
at the right iteration with the same learning-rate schedule."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler

from condinst_d2.checkpoint import make_saves_atomic
from condinst_d2.data import write_coco_split
from condinst_d2.engine import Trainer, build_cfg

from helpers import ROOT, require_fixtures

SMALL = str(ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml")


def _save_that_dies(checkpointer, monkeypatch):
    """Saves "model_final" with a torch.save that writes part of the file and then fails."""

    def dying_save(obj, f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    monkeypatch.undo()


@pytest.mark.parametrize("atomic", [True, False])
def test_a_save_killed_midway_leaves_the_last_good_checkpoint(tmp_path, monkeypatch, atomic):
    model = torch.nn.Linear(3, 2)
    checkpointer = DetectionCheckpointer(model, save_dir=str(tmp_path))
    if atomic:
        make_saves_atomic(checkpointer)
    checkpointer.save("model_0000009")
    _save_that_dies(checkpointer, monkeypatch)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    if atomic:
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "last_checkpoint",
            "model_0000009.pth",
        ]
        assert set(torch.load(tmp_path / "model_0000009.pth")["model"]) == {"weight", "bias"}
    else:  # what fvcore does on its own: a truncated model_final.pth is left behind
        assert (tmp_path / "model_final.pth").read_bytes() == b"partial bytes of a checkpoint"


def _expected_lr(cfg, iteration: int) -> float:
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(iteration):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def test_sigkill_then_resume_continues_where_it_stopped(tmp_path):
    data = tmp_path / "data"
    train = write_coco_split(str(data), "train", 6, (128, 160), seed=0)
    test = write_coco_split(str(data), "test", 2, (128, 160), seed=1)
    out = tmp_path / "out"
    opts = [
        "SOLVER.MAX_ITER",
        "60",
        "SOLVER.CHECKPOINT_PERIOD",
        "10",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "INPUT.MIN_SIZE_TRAIN",
        "(128,)",
        "INPUT.MIN_SIZE_TEST",
        "128",
        "OUTPUT_DIR",
        str(out),
    ]
    cmd = [
        sys.executable,
        str(ROOT / "train_net.py"),
        "--config-file",
        SMALL,
        "--train-dataset",
        train,
        str(data / "train"),
        "--test-dataset",
        test,
        str(data / "test"),
    ]
    job = subprocess.Popen(cmd + opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # The checkpointer renames model_0000009.pth into place, then last_checkpoint: wait for both.
    while not (out / "last_checkpoint").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (out / "model_final.pth").exists(), "training ended before it could be killed"
    last = (out / "last_checkpoint").read_text().strip()
    saved_iter = torch.load(out / last, map_location="cpu")["iteration"]  # complete, loadable
    assert saved_iter >= 9

    resumed = subprocess.run(cmd + ["--resume"] + opts, capture_output=True, text=True, timeout=600)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"Starting training from iteration {saved_iter + 1}" in log
    assert (out / "model_final.pth").is_file()
    cfg = build_cfg(SMALL, opts)
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last_train = max((r for r in records if "lr" in r), key=lambda r: r["iteration"])
    assert last_train["iteration"] == 59
    assert last_train["lr"] == pytest.approx(_expected_lr(cfg, 59), rel=1e-6)
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def _shapes(tmp_path, n=4):
    data = tmp_path / "data"
    return write_coco_split(str(data), "train", n, (96, 128), seed=0), str(data / "train")


def test_unknown_category_ids_fail_before_training(tmp_path):
    train_json, image_dir = _shapes(tmp_path)
    data = json.loads(open(train_json).read())
    data["annotations"][0]["category_id"] = 42
    bad = tmp_path / "bad_categories.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad_categories.json.*category ids \[42\]"):
        build_cfg(SMALL, [], train_dataset=(str(bad), image_dir))


def test_num_classes_not_matching_the_dataset_fails_at_start_up(tmp_path):
    cfg = build_cfg(SMALL, ["MODEL.FCOS.NUM_CLASSES", 7], train_dataset=_shapes(tmp_path))
    cfg.defrost()
    cfg.MODEL.FCOS.NUM_CLASSES = 7  # --train-dataset set 4; a user's override comes after
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 7 but dataset .* has 4 classes"):
        Trainer(cfg)


def test_non_finite_loss_stops_training_naming_the_loss_and_iteration(tmp_path):
    cfg = build_cfg(
        SMALL,
        [
            "SOLVER.MAX_ITER",
            10,
            "SOLVER.IMS_PER_BATCH",
            2,
            "INPUT.MIN_SIZE_TRAIN",
            "(96,)",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        train_dataset=_shapes(tmp_path),
    )
    trainer = Trainer(cfg)
    forward = trainer.model.forward

    def forward_with_nan_at_iteration_3(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 3:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    trainer.model.forward = forward_with_nan_at_iteration_3
    with pytest.raises(FloatingPointError, match=r"(?s)iteration=3.*loss_mask"):
        trainer.train()


_PEAK_MEMORY_SCRIPT = """
import sys, json, torch
sys.path.insert(0, {tests!r})
from detectron2.modeling import build_model
from condinst_d2.checkpoint import CondInstCheckpointer
from helpers import FIXTURES, condinst_cfg, inference_cases

def mib(field):
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

case = FIXTURES / "tiny_base"
model = build_model(condinst_cfg(case / "config_condinst.yaml")).eval()
CondInstCheckpointer(model).load(str(case / "model.pth"))
image = torch.as_tensor(next(inference_cases(case))[1]).float()
open("/proc/self/clear_refs", "w").write("5")  # peak RSS counted from here
before = mib("VmRSS")
with torch.no_grad():
    out = model([{{"image": image, "height": 2400, "width": 3200}}])[0]["instances"]
print(json.dumps({{"detections": len(out), "peak_mib": mib("VmHWM") - before,
                   "masks_mib": out.pred_masks.numel() / 2**20}}))
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS"
)
def test_large_output_with_many_instances_stays_within_the_memory_bound():
    """97 detections pasted at 2400x3200: the peak is the bool masks themselves plus < 256 MiB
    (one float mask per instance at once would take ~2.8 GiB more)."""
    require_fixtures()
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT.format(tests=str(ROOT / "tests"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["detections"] == 97
    assert measured["peak_mib"] <= measured["masks_mib"] + 256, measured


def test_degenerate_annotations_are_skipped_or_fixed_and_training_goes_on(tmp_path, caplog):
    train_json, image_dir = _shapes(tmp_path, n=2)
    data = json.loads(open(train_json).read())
    image_id = data["images"][0]["id"]

    def ann(i, bbox, segmentation):
        return {
            "id": 1000 + i,
            "image_id": image_id,
            "category_id": 1,
            "iscrowd": 0,
            "area": 10.0,
            "bbox": bbox,
            "segmentation": segmentation,
        }

    data["annotations"] += [
        ann(0, [10, 10, 5, 5], [[10, 10, 15, 15]]),  # a 2-point polygon
        ann(1, [10, 10, 20, 20], [[10, 10, 20, 20, 30, 30]]),  # a zero-area (collinear) polygon
        ann(2, [100, 60, 80, 80], [[100, 60, 180, 60, 180, 140, 100, 140]]),  # partly outside
        ann(3, [500, 500, 20, 20], [[500, 500, 520, 500, 520, 520]]),  # entirely outside
        ann(4, [5, 5, 10, 10], []),  # empty segmentation
    ]
    path = tmp_path / "degenerate.json"
    path.write_text(json.dumps(data))
    cfg = build_cfg(
        SMALL,
        ["SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.RANDOM_FLIP", "none"],
        train_dataset=(str(path), image_dir),
    )
    with caplog.at_level("WARNING"):
        batch = next(iter(Trainer.build_train_loader(cfg)))
    assert "instances without valid segmentation" in caplog.text  # said once, by the loader
    for x in batch:
        boxes = x["instances"].gt_boxes
        assert boxes.nonempty().all() and (boxes.tensor[:, 2:] <= torch.tensor([128.0, 96.0])).all()
    model = build_model(cfg).train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())


def test_config_value_of_the_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="MODEL.CONDINST.MAX_PROPOSALS"):
        build_cfg(SMALL, ["MODEL.CONDINST.MAX_PROPOSALS", "many"])
