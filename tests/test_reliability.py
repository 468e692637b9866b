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
from detectron2.solver import build_lr_scheduler

from condinst_d2.checkpoint import make_saves_atomic
from condinst_d2.data import write_coco_split
from condinst_d2.engine import build_cfg
from conftest import ROOT

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
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
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
    opts = ["SOLVER.MAX_ITER", "60", "SOLVER.CHECKPOINT_PERIOD", "10", "SOLVER.IMS_PER_BATCH", "2",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128", "OUTPUT_DIR", str(out)]
    cmd = [sys.executable, str(ROOT / "train_net.py"), "--config-file", SMALL,
           "--train-dataset", train, str(data / "train"), "--test-dataset", test, str(data / "test")]
    job = subprocess.Popen(cmd + opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "model_0000009.pth").exists() and job.poll() is None and time.time() < deadline:
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
