"""Foreseeable mistakes and faults beyond the data: one-line errors from train_net.py (one process
or several, --debug for the traceback), bad configs and solver values, checkpoints of the wrong
kind or model, resuming with another config, a full disk, left-over temporary files, SIGTERM
during a video demo, huge demo images, the mode of converted checkpoints."""

import errno
import importlib.util
import os
import pickle
import resource
import signal
import stat
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone
from detectron2.utils import comm
from PIL import Image

from condinst_d2.checkpoint import CondInstCheckpointer, make_saves_atomic
from condinst_d2.engine import build_cfg, check_solver, user_error_message

from helpers import FIXTURES, ROOT, require_fixtures, small_cfg

SMALL = str(ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml")


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_net = _module(ROOT / "train_net.py", "train_net")


# --- train_net.py: one line, non-zero exit; --debug keeps the traceback -------------------------


def test_reporting_prints_one_line_and_exits_1_or_keeps_the_traceback_with_debug(capsys):
    def fails(args):
        raise FileNotFoundError(errno.ENOENT, "config file not found", "/nope.yaml")

    args = train_net.parse_args(["--config-file", "/nope.yaml"])
    with pytest.raises(SystemExit) as exit_info:
        train_net.reporting(fails, args)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: [Errno 2] config file not found: '/nope.yaml'\n"
    args.debug = True
    with pytest.raises(FileNotFoundError):
        train_net.reporting(fails, args)
    with pytest.raises(ZeroDivisionError):  # a bug, not a mistake in the inputs: traceback
        train_net.reporting(lambda args: 1 / 0, train_net.parse_args([]))


def test_debug_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONDINST_DEBUG", "1")
    assert train_net.parse_args([]).debug
    monkeypatch.setenv("CONDINST_DEBUG", "0")
    assert not train_net.parse_args([]).debug


def test_options_after_the_overrides_are_options():
    args = train_net.parse_args(
        ["--config-file", "c.yaml", "SOLVER.MAX_ITER", "10", "--resume", "OUTPUT_DIR", "o"]
    )
    assert args.resume and args.opts == ["SOLVER.MAX_ITER", "10", "OUTPUT_DIR", "o"]
    args = train_net.parse_args(["SOLVER.MAX_ITER", "10", "--eval-only", "--num-gpus", "2"])
    assert args.eval_only and args.num_gpus == 2 and args.opts == ["SOLVER.MAX_ITER", "10"]
    assert train_net.parse_args(["A", "1", "--"]).opts == ["A", "1", "--"]  # ends; as Detectron2


def test_two_processes_report_a_bad_dataset_once(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_net.py"), "--num-gpus", "2", "--config-file", SMALL]
        + ["--train-dataset", str(tmp_path / "absent.json"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: dataset annotation file '{tmp_path / 'absent.json'}' does not exist"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "yaml_text, opts, message",
    [
        ("MODEL:\n  FOO: 1\n", [], r"bad.yaml': Non-existent config key: MODEL.FOO"),
        ("MODEL: [1,\n", [], r"bad.yaml': while parsing a flow node"),
        ('_BASE_: "absent.yaml"\n', [], r"absent.yaml"),
        ("SOLVER:\n  MAX_ITER: many\n", [], r"for config key: SOLVER.MAX_ITER"),
        ("- 1\n", [], r"not a YAML mapping of config keys"),
        ("", ["SOLVER.MAX_ITER"], r"Override list has odd length"),
        ("", ["SOLVER.NOPE", "1"], r"Non-existent key: SOLVER.NOPE"),
    ],
)
def test_config_mistakes_name_the_file_or_key(tmp_path, yaml_text, opts, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f'_BASE_: "{SMALL}"\n' if not yaml_text else yaml_text)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        build_cfg(str(path), opts)
    assert user_error_message(info.value).startswith("error: ")


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.CHECKPOINT_PERIOD", "0"], r"SOLVER.CHECKPOINT_PERIOD is 0; it must be >= 1"),
        (["SOLVER.MAX_ITER", "0"], r"SOLVER.MAX_ITER is 0; it must be >= 1"),
        (["SOLVER.BASE_LR", "-0.01"], r"SOLVER.BASE_LR is -0.01; it must be a positive number"),
        (["INPUT.MASK_FORMAT", "rle"], r"INPUT.MASK_FORMAT is 'rle'; use polygon or bitmask"),
    ],
)
def test_solver_values_detectron2_would_trip_over_are_refused_at_start_up(opts, message):
    with pytest.raises(ValueError, match=message):
        check_solver(build_cfg(SMALL, opts))


def test_a_batch_not_divisible_by_the_processes_is_refused(monkeypatch):
    cfg = build_cfg(SMALL, ["SOLVER.IMS_PER_BATCH", "4"])
    monkeypatch.setattr(comm, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH 4 is not divisible by the 3 processes"):
        check_solver(cfg)


# --- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return build_model(small_cfg(**{"MODEL.FCOS.NUM_CLASSES": 4}))


def _tiny(shape):
    """A tensor of `shape` whose file holds one number (stride-0 storage)."""
    return torch.zeros(()).expand(tuple(shape))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("list.pth", [1, 2, 3], "its model has list"),
        ("ints.pth", {"model": {"a": 1, "b": 2}}, "entries such as 'a'"),
        ("strings.pkl", {"a": "not an array"}, "entries such as 'a'"),
    ],
)
def test_checkpoint_of_the_wrong_kind_names_the_file(small_model, tmp_path, name, content, message):
    path = tmp_path / name
    if name.endswith(".pkl"):
        path.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=rf"'{path}' is not a checkpoint of weights.*{message}"):
        CondInstCheckpointer(small_model).load(str(path))


def test_a_checkpoint_with_nan_weights_is_refused(small_model, tmp_path):
    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    key = next(k for k in state if k.endswith("cls_logits.weight"))
    state[key][0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "diverged.pth")
    with pytest.raises(ValueError, match=rf"NaN or infinite values in 1 tensors \['{key}'\]"):
        CondInstCheckpointer(small_model).load(str(tmp_path / "diverged.pth"))


def _mask_rcnn_r50_state():
    """Key names and shapes of a Detectron2 Mask R-CNN R-50-FPN (values: tiny stride-0 tensors)."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    with torch.device("meta"):
        bottom_up = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    state = {f"backbone.bottom_up.{k}": _tiny(v.shape) for k, v in bottom_up.state_dict().items()}
    for level, channels in zip(range(2, 6), (256, 512, 1024, 2048)):
        state[f"backbone.fpn_lateral{level}.weight"] = _tiny((256, channels, 1, 1))
        state[f"backbone.fpn_output{level}.weight"] = _tiny((256, 256, 3, 3))
        state[f"backbone.fpn_lateral{level}.bias"] = _tiny((256,))
        state[f"backbone.fpn_output{level}.bias"] = _tiny((256,))
    state["roi_heads.box_head.fc1.weight"] = _tiny((1024, 12544))
    state["roi_heads.mask_head.predictor.weight"] = _tiny((80, 256, 1, 1))
    return state


def test_a_checkpoint_of_another_architecture_is_refused(small_model, tmp_path):
    path = tmp_path / "mask_rcnn_R_50_FPN.pth"
    torch.save({"model": _mask_rcnn_r50_state()}, path)
    with pytest.raises(ValueError, match=rf"'{path}' is not of this model: 23 of the 32 param"):
        CondInstCheckpointer(small_model).load(str(path))
    condinst_r50 = tmp_path / "CondInst_MS_R_50_1x.pth"  # every name of the model, R-50 shapes
    r50 = build_model(build_cfg(str(ROOT / "configs/CondInst/MS_R_50_1x.yaml"), _NO_WEIGHTS))
    torch.save({"model": {k: _tiny(v.shape) for k, v in r50.state_dict().items()}}, condinst_r50)
    with pytest.raises(ValueError, match=r"is not of this model: \d+ of the \d+ parameters"):
        CondInstCheckpointer(small_model).load(str(condinst_r50))


def test_a_new_classifier_and_an_imagenet_backbone_stay_allowed(small_model, tmp_path):
    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    key = next(k for k in state if k.endswith("cls_logits.weight"))
    state[key] = _tiny((7, *state[key].shape[1:]))  # trained with 7 classes
    torch.save({"model": state}, tmp_path / "other_classes.pth")
    CondInstCheckpointer(small_model).load(str(tmp_path / "other_classes.pth"))

    r50 = build_model(build_cfg(str(ROOT / "configs/CondInst/MS_R_50_1x.yaml"), _NO_WEIGHTS))
    backbone = {k: _tiny(v.shape) for k, v in r50.state_dict().items() if ".bottom_up." in k}
    torch.save({"model": backbone}, tmp_path / "imagenet_r50.pth")  # 69 % of the parameters
    CondInstCheckpointer(r50).load(str(tmp_path / "imagenet_r50.pth"))
    assert float(r50.backbone.bottom_up.stem.conv1.weight.abs().sum()) == 0.0


_NO_WEIGHTS = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]


def test_resume_in_a_folder_trained_with_other_classes_is_refused(small_model, tmp_path):
    DetectionCheckpointer(small_model, save_dir=str(tmp_path)).save("model_0000009")
    other = build_model(small_cfg(**{"MODEL.FCOS.NUM_CLASSES": 3}))
    checkpointer = CondInstCheckpointer(other, save_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot resume from .*model_0000009.pth.*cls_logits"):
        checkpointer.resume_or_load("", resume=True)
    checkpointer.resume_or_load(str(tmp_path / "model_0000009.pth"), resume=False)  # fine-tune


def test_a_last_checkpoint_naming_a_missing_file_names_it(small_model, tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*model_0000099.pth"):
        CondInstCheckpointer(small_model, save_dir=str(tmp_path)).resume_or_load("", resume=True)


def test_stale_temporaries_of_killed_saves_are_removed_and_nothing_else(small_model, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    names = [
        f"model_0000009.pth.tmp{dead.pid}",  # stale: removed
        f"last_checkpoint.tmp{dead.pid}",  # stale: removed
        f"model_0000019.pth.tmp{alive.pid}",  # a running writer
        f"model_0000029.pth.tmp{dead.pid}x",  # not our pattern
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (0, 1e9))
    (tmp_path / f"fresh.pth.tmp{dead.pid}").write_bytes(b"x")  # maybe another host's live save
    try:
        CondInstCheckpointer(small_model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[2:] + [f"fresh.pth.tmp{dead.pid}"]
    )


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_last_checkpoint(tmp_path):
    """A file-size limit makes torch's writer fail as a full disk does (EFBIG instead of ENOSPC,
    wrapped by torch in a RuntimeError "enforce fail at inline_container.cc")."""
    model = torch.nn.Linear(500, 500)
    checkpointer = make_saves_atomic(DetectionCheckpointer(model, save_dir=str(tmp_path)))
    checkpointer.save("model_0000009")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    model.weight.data.fill_(1.0)
    try:
        with pytest.raises(OSError) as info:
            checkpointer.save("model_0000019")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.errno == errno.ENOSPC
    assert f"cannot write {tmp_path / 'model_0000019.pth'}: no space left" in str(info.value)
    assert user_error_message(info.value).startswith("error: [Errno 28] cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert float(torch.load(tmp_path / "model_0000009.pth")["model"]["weight"].sum()) != 500 * 500


# --- the demo and the tools --------------------------------------------------------------------

sys.path.insert(0, str(ROOT / "demo"))
import demo  # noqa: E402


class _ListSink:
    def __init__(self):
        self.frames, self.kept = [], None

    def write(self, frame):
        self.frames.append(frame)
        return True

    def close(self, keep=True):
        self.kept = keep
        return "video.mp4" if keep else None


def test_sigterm_during_a_video_keeps_the_frames_written(tmp_path):
    def frames():
        for i in range(100):
            if i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield np.zeros((4, 4, 3), np.uint8)

    before = signal.getsignal(signal.SIGTERM)
    sink = _ListSink()
    count, written = demo.write_frames(frames(), sink, 100, "video")
    assert (count, written, sink.kept, len(sink.frames)) == (3, "video.mp4", True, 3)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_huge_image_is_skipped_naming_it_and_the_others_processed(tmp_path, monkeypatch):
    case_dir = require_fixtures() / "tiny_base"
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    cv2.imwrite(str(folder / "b_small.png"), np.full((64, 80, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "a_huge.png"), np.zeros((300, 400, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 120000 px > 2x: a "bomb"
    errors = []
    monkeypatch.setattr(demo.logger, "error", lambda fmt, *a: errors.append(fmt % a))
    status = demo.main(
        ["--input", str(folder), "--output", str(out), "--config-file"]
        + [str(case_dir / "config_condinst.yaml"), "--opts", "MODEL.WEIGHTS", ""]
    )
    assert status == 1
    assert len(errors) == 1 and str(folder / "a_huge.png") in errors[0]
    assert "DecompressionBombError" in errors[0]
    assert [p.name for p in out.iterdir()] == ["b_small.png"]


def test_converted_checkpoints_get_the_mode_of_a_new_file(tmp_path):
    require_fixtures()
    convert = _module(ROOT / "tools" / "convert_checkpoint.py", "convert_checkpoint")
    old = os.umask(0o022)
    try:
        status = convert.main([str(FIXTURES / "tiny_base" / "model.pth"), str(tmp_path / "c.pth")])
    finally:
        os.umask(old)
    assert status == 0
    assert stat.S_IMODE(os.stat(tmp_path / "c.pth").st_mode) == 0o644


def test_user_error_message_of_a_non_finite_loss_is_one_line_with_a_hint():
    message = user_error_message(
        FloatingPointError("Loss became infinite or NaN at iteration=3!\nloss_dict = {}")
    )
    assert message == (
        "error: Loss became infinite or NaN at iteration=3! loss_dict = {} "
        "(lower SOLVER.BASE_LR, or check the data of the last batches)"
    )
    assert user_error_message(RuntimeError("a bug")) is None


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        try:
            raise KeyError("cause")
        except KeyError as e:
            raise ValueError("cannot read image 'x.jpg': broken") from e


def test_an_error_in_a_data_loader_worker_is_one_line_without_the_workers_traceback():
    with pytest.raises(ValueError) as info:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(info.value)
    assert user_error_message(info.value) == "error: cannot read image 'x.jpg': broken"
