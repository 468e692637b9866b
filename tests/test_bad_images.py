"""Bad and unusual input images through CondInstDatasetMapper: clear errors or correct reads."""

from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from PIL import Image

from condinst_d2.data.dataset_mapper import CondInstDatasetMapper, read_image
from condinst_d2.engine import build_cfg

from helpers import ROOT

# INPUT.FORMAT is BGR in these configs: channel 2 is red, channel 0 is blue.
OPTS = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.RANDOM_FLIP", "none"]


@pytest.fixture(scope="module")
def cfg():
    return build_cfg(str(ROOT / "configs/CondInst/Small_R_18_CPU.yaml"), OPTS)


@pytest.fixture(scope="module")
def mapper(cfg) -> CondInstDatasetMapper:
    return CondInstDatasetMapper(cfg, is_train=True)


def record(path: Path, height: int, width: int) -> Dict[str, Any]:
    """A dataset dict with one polygon annotation covering the whole image."""
    poly = [0.0, 0.0, width, 0.0, width, height, 0.0, height]
    ann = {
        "bbox": [0, 0, width, height],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 0,
        "segmentation": [poly],
    }
    return {
        "file_name": str(path),
        "height": height,
        "width": width,
        "image_id": 0,
        "annotations": [ann],
    }


def save(path: Path, array: np.ndarray, **kwargs) -> Tuple[Path, int, int]:
    """Saves `array` with PIL; returns (path, height, width)."""
    Image.fromarray(array).save(path, **kwargs)
    return path, array.shape[0], array.shape[1]


def map_ok(mapper: CondInstDatasetMapper, path: Path, height: int, width: int) -> Dict[str, Any]:
    """Maps a good image and checks the output's structure."""
    out = mapper(record(path, height, width))
    image = out["image"]
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    assert len(out["instances"]) == 1 and out["instances"].has("gt_masks")
    return out


def jpeg_bytes(tmp_path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    path, _, _ = save(tmp_path / "full.jpg", noise, quality=90)
    return path.read_bytes()


def test_missing_file_names_path(mapper, tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        mapper(record(path, 10, 10))


@pytest.mark.parametrize("kind", ["random_bytes", "truncated_jpeg"])
def test_undecodable_file_names_path(mapper, tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:
        data = jpeg_bytes(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read image .*{kind}.jpg"):
        mapper(record(path, 200, 200))


def test_size_mismatch_names_path(mapper, tmp_path):
    path, _, _ = save(tmp_path / "small.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(SizeMismatchError, match="small.png"):
        mapper(record(path, 20, 10))


def test_grayscale_becomes_three_equal_channels(mapper, tmp_path):
    out = map_ok(mapper, *save(tmp_path / "gray.png", np.full((32, 48), 77, np.uint8)))
    assert tuple(out["image"].shape) == (3, 64, 96)
    assert (out["image"] == 77).all()


def test_rgba_drops_alpha(mapper, tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[...] = (10, 20, 30, 200)
    out = map_ok(mapper, *save(tmp_path / "rgba.png", rgba))
    assert out["image"][:, 5, 5].tolist() == [30, 20, 10]  # BGR


def test_16bit_png_is_scaled_not_clipped(mapper, tmp_path):
    out = map_ok(mapper, *save(tmp_path / "grey16.png", np.full((32, 32), 32768, np.uint16)))
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    assert (out["image"] == 128).all()


def test_32bit_integer_image_with_16bit_values(tmp_path):
    path, _, _ = save(tmp_path / "i32.tif", np.full((8, 8), 0xFFFF, np.int32))
    assert (read_image(str(path), "RGB") == 255).all()
    path, _, _ = save(tmp_path / "big.tif", np.full((8, 8), 70000, np.int32))
    with pytest.raises(ValueError, match="big.tif"):
        read_image(str(path), "RGB")


def test_exif_rotation_is_applied(mapper, tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored: 40 wide, 20 tall
    stored[:10] = (255, 0, 0)  # top half red
    stored[10:] = (0, 0, 255)  # bottom half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: top -> right
    path, _, _ = save(tmp_path / "exif.jpg", stored, exif=exif, quality=95)
    out = map_ok(mapper, path, 40, 20)  # the dict gives the displayed size
    image = out["image"].int()
    assert tuple(image.shape) == (3, 128, 64)
    assert image[2, :, 40:].float().mean() > 200 and image[0, :, 40:].float().mean() < 50
    assert image[0, :, :24].float().mean() > 200 and image[2, :, :24].float().mean() < 50


def test_one_pixel_and_huge_images(mapper, tmp_path):
    out = map_ok(mapper, *save(tmp_path / "one.png", np.full((1, 1, 3), 9, np.uint8)))
    assert tuple(out["image"].shape) == (3, 64, 64)
    out = map_ok(mapper, *save(tmp_path / "huge.jpg", np.zeros((4000, 6000, 3), np.uint8)))
    assert tuple(out["image"].shape) == (3, 64, 96)
    assert out["instances"].image_size == (64, 96)


def test_training_step_on_tiny_and_gray_images(cfg, mapper, tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for name, array in (
        ("one.png", np.full((1, 1, 3), 9, np.uint8)),
        ("gray.png", np.full((32, 48), 77, np.uint8)),
    ):
        losses = model([map_ok(mapper, *save(tmp_path / name, array))])
        assert losses and all(torch.isfinite(v).all() for v in losses.values()), (name, losses)
