"""demo/demo.py: overlays for image folders (16-bit PNGs too), videos that play, raw JSON
predictions, clear errors.

Runs the tiny reference model of ../shared/fixtures (seeded random weights that yield tens of
detections) on its fixture images and on the first frames of ../shared/media/vtest.avi.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from condinst_d2.data import read_image

from helpers import FIXTURES, ROOT, SHARED, inference_cases, require_fixtures

sys.path.insert(0, str(ROOT / "demo"))
import demo  # noqa: E402  (demo/demo.py; its own imports need demo/ on sys.path)

from predictions_json import decode_masks  # noqa: E402
from predictor import BatchPredictor  # noqa: E402
from video_io import (  # noqa: E402
    AtomicVideoWriter,
    browser_video_suffix,
    choose_codec,
    plays_in_browsers,
)

VTEST = SHARED / "media" / "vtest.avi"
THRESHOLD = 0.3


@pytest.fixture
def logs(caplog):
    """Records of the demo's and condinst_d2's loggers (Detectron2's setup_logger stops them from
    propagating)."""
    loggers = [logging.getLogger(name) for name in ("demo", "condinst_d2")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The fixture's inference inputs written as a PNG and a JPG into a folder."""
    case_dir = require_fixtures() / "tiny_base"
    folder = tmp_path_factory.mktemp("images")
    for (name, image_chw, _), suffix in zip(inference_cases(case_dir), (".png", ".jpg")):
        cv2.imwrite(str(folder / f"{name}{suffix}"), image_chw.transpose(1, 2, 0))
    return folder


def model_opts(weights: bool = True, min_size: int = 384) -> list:
    """--config-file and --opts for the tiny reference model, with COCO class names."""
    case_dir = FIXTURES / "tiny_base"
    opts = ["MODEL.WEIGHTS", str(case_dir / "model.pth") if weights else ""]
    opts += ["INPUT.MIN_SIZE_TEST", str(min_size), "DATASETS.TEST", "('coco_2017_val',)"]
    return ["--config-file", str(case_dir / "config_condinst.yaml"), "--opts", *opts]


def run_demo(*args, weights: bool = True, min_size: int = 384) -> int:
    """demo.main in this process, with the tiny reference model and --opts last."""
    return demo.main([*map(str, args), *model_opts(weights, min_size)])


def test_image_folder_overlays_and_json(images, tmp_path, logs):
    out, json_path = tmp_path / "out", tmp_path / "predictions.json"
    args = ["--input", images, "--output", out, "--json", json_path]
    np.random.seed(0)  # the Visualizer picks random mask colours: keep the check deterministic
    assert run_demo(*args, "--confidence-threshold", THRESHOLD) == 0
    if not torch.cuda.is_available():
        assert "CUDA is not available: running on the CPU" in logs.text
    records = json.loads(json_path.read_text())
    assert [r["source"] for r in records] == [str(p) for p in sorted(images.iterdir())]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in images.iterdir())

    cfg = demo.setup_cfg(demo.get_parser().parse_args(["--input", "x", *model_opts()]))
    predictor = BatchPredictor(cfg, THRESHOLD)
    for record in records:
        image = read_image(record["source"], format="BGR")
        expected = predictor([image])[0]
        assert len(expected) > 0, "the reference model should detect something"
        assert (expected.scores >= THRESHOLD).all()
        masks = decode_masks(record)
        np.testing.assert_array_equal(masks, expected.pred_masks.numpy())
        boxes = np.array([item["bbox"] for item in record["instances"]])
        np.testing.assert_allclose(boxes, expected.pred_boxes.tensor.numpy(), atol=1e-4)
        assert [
            item["category_id"] for item in record["instances"]
        ] == expected.pred_classes.tolist()
        assert all(item["category_name"] for item in record["instances"])
        assert (record["height"], record["width"]) == image.shape[:2]

        overlay = cv2.imread(str(out / Path(record["source"]).name))
        assert overlay.shape == image.shape
        # A margin for the JPEG output, re-encoded; the masks are blended at alpha 0.5.
        changed = np.abs(overlay.astype(int) - image.astype(int)).max(axis=2) > 24
        # (a colour close to the image's own changes it less; nothing drawn would give 0)
        assert changed[masks.any(axis=0)].mean() > 0.8, "masks should be drawn"
        far = np.ones_like(changed)
        for x0, y0, x1, y1 in boxes.astype(int):
            far[max(y0 - 40, 0) : y1 + 40, max(x0 - 40, 0) : x1 + 40] = False
        assert changed[far].mean() < 1e-2, "pixels away from every detection should be unchanged"


def test_16_bit_grayscale_png_draws_like_its_8_bit_version(images, tmp_path):
    """Detectron2's read_image clips 16-bit values to 255 (an almost white drawing)."""
    gray = cv2.cvtColor(cv2.imread(str(sorted(images.glob("*.png"))[0])), cv2.COLOR_BGR2GRAY)
    drawn = {}
    for bits, pixels in ((8, gray), (16, gray.astype(np.uint16) * 257)):  # 257: x >> 8 is x
        source, output = tmp_path / f"gray{bits}.png", tmp_path / f"drawn{bits}.png"
        assert cv2.imwrite(str(source), pixels)
        np.random.seed(0)  # the same mask colours for both
        assert run_demo("--input", source, "--output", output, min_size=128) == 0
        drawn[bits] = cv2.imread(str(output))
    assert abs(drawn[16].mean() - gray.mean()) < 20 < 255 - gray.mean()
    np.testing.assert_array_equal(drawn[16], drawn[8])


def test_video_plays_with_input_size_and_rate(tmp_path):
    require_fixtures()
    if not VTEST.is_file():
        pytest.skip(f"{VTEST} is absent")
    out, json_path = tmp_path / "vtest_out.mp4", tmp_path / "video.json"
    args = ["--video-input", VTEST, "--output", out, "--max-frames", 6, "--batch-size", 4]
    command = [
        sys.executable,
        str(ROOT / "demo" / "demo.py"),
        *map(str, args),
        "--json",
        str(json_path),
    ]
    result = subprocess.run(
        [*command, *model_opts(min_size=256)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "frame/s" in result.stderr, "the progress bar should show frames per second"
    log = result.stdout + result.stderr  # the codec, and whether browsers play it, is logged
    assert "MPEG-4 Part 2, which web browsers do not play" in log or (
        "H.264, plays in web browsers" in log
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.json", "vtest_out.mp4"]

    source, written = cv2.VideoCapture(str(VTEST)), cv2.VideoCapture(str(out))
    for prop in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT, cv2.CAP_PROP_FPS):
        assert written.get(prop) == source.get(prop)
    frames = []
    while True:
        ok, frame = written.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 6 and frames[0].shape == (576, 768, 3)
    assert [r["frame"] for r in json.loads(json_path.read_text())] == list(range(6))


def test_missing_input_exits_nonzero_naming_it(tmp_path):
    missing = tmp_path / "nowhere.jpg"
    command = [sys.executable, str(ROOT / "demo" / "demo.py"), "--config-file", "unused.yaml"]
    result = subprocess.run(
        [*command, "--input", str(missing), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"input not found: {missing}" in result.stdout + result.stderr


def test_corrupt_image_is_reported_and_the_others_processed(images, tmp_path, logs):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(images.iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    assert run_demo("--input", folder, "--output", tmp_path / "out", min_size=128) == 1
    assert f"cannot read image {str(folder / 'broken.jpg')!r}" in logs.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == [good.name]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--video-input", "{tmp}/bad.avi", "--output", "{tmp}"],
            "cannot read video {tmp}/bad.avi",
        ),
        (
            ["--video-input", "{tmp}/none.avi", "--output", "{tmp}"],
            "video not found: {tmp}/none.avi",
        ),
        (["--input", "{tmp}/*.png", "--output", "{tmp}/out"], "no file matches {tmp}/*.png"),
        (
            ["--input", "{tmp}", "--output", "{tmp}/file.txt/out"],
            "output folder {tmp}/file.txt/out is not writable",
        ),
        (
            ["--input", "{tmp}/a.jpg", "--output", "{tmp}/o", "--json", "{tmp}/file.txt/p.json"],
            "{tmp}/file.txt is not",
        ),
        (
            ["--input", "{tmp}/a.jpg", "{tmp}/b.jpg", "--output", "{tmp}/o.jpg"],
            "is a file name but there are 2",
        ),
        (["--input", "{tmp}/a.jpg", "--output", "{tmp}"], "would overwrite the input {tmp}/a.jpg"),
        (["--input", "{tmp}/a.jpg"], "no display"),
    ],
)
def test_clear_errors_before_the_model_is_built(tmp_path, logs, monkeypatch, args, message):
    (tmp_path / "bad.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "file.txt").write_text("a regular file")
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setattr(demo, "build_predictor", lambda args: pytest.fail("built the model"))
    assert demo.main([a.format(tmp=tmp_path) for a in args] + ["--config-file", "unused.yaml"]) == 1
    assert message.format(tmp=tmp_path) in logs.text


def test_webcam_without_camera(tmp_path, logs):
    if cv2.VideoCapture(0).isOpened():
        pytest.skip("this machine has a camera")
    assert demo.main(["--config-file", "unused.yaml", "--webcam", "--output", str(tmp_path)]) == 1
    assert "cannot open camera 0" in logs.text
    assert list(tmp_path.iterdir()) == []


def test_no_weights_warns_and_still_runs(images, tmp_path, logs):
    image = sorted(images.iterdir())[0]
    assert (
        run_demo("--input", image, "--output", tmp_path / "o.png", weights=False, min_size=128) == 0
    )
    assert "RANDOM weights" in logs.text
    assert cv2.imread(str(tmp_path / "o.png")).shape == cv2.imread(str(image)).shape


def test_confidence_threshold_keeps_every_candidate():
    def candidate_threshold(*args):
        parsed = demo.get_parser().parse_args(["--input", "x", *map(str, args), *model_opts()])
        return demo.setup_cfg(parsed).MODEL.FCOS.INFERENCE_TH_TEST

    require_fixtures()
    assert candidate_threshold("--confidence-threshold", 0.1) == pytest.approx(0.01)
    assert candidate_threshold("--confidence-threshold", 0.5) == 0.05  # the config's own value


def test_codec_fallback_and_no_empty_video(tmp_path):
    path, fourcc = choose_codec(str(tmp_path / "clip.flv"), (64, 48))
    assert (path, fourcc) == (str(tmp_path / "clip.webm"), "VP80")  # browsers play it

    writer = AtomicVideoWriter(str(tmp_path / "empty.mp4"), 10.0)
    assert writer.close() is None
    writer.write(np.zeros((48, 64, 3), np.uint8))
    assert writer.close(keep=False) is None
    assert list(tmp_path.iterdir()) == []

    writer = AtomicVideoWriter(str(tmp_path / "two.mp4"), 10.0)
    for value in (0, 200):
        writer.write(np.full((48, 64, 3), value, np.uint8))
    assert writer.close() == str(tmp_path / "two.mp4")
    assert [p.name for p in tmp_path.iterdir()] == ["two.mp4"]
    assert cv2.VideoCapture(str(tmp_path / "two.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 2


def test_videos_written_into_a_folder_play_in_browsers(tmp_path):
    path = demo.video_destination(str(tmp_path), "clip")
    assert path == str(tmp_path / ("clip" + browser_video_suffix()))
    chosen, fourcc = choose_codec(path, (64, 48))
    assert chosen == path and plays_in_browsers(chosen, fourcc), fourcc
