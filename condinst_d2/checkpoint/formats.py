"""The foreign checkpoint layouts condinst_d2 converts, and their detection.

Adding a layout: write its `KeyFormat` (rules and signature) in a module of this package and list
it in `FORMATS`; `CondInstCheckpointer` and tools/convert_checkpoint.py then handle it.
"""

from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from .authors import AUTHORS
from .efficientnet_lite0 import EFFICIENTNET_LITE0
from .mmdet import MMDET
from .rename import KeyFormat

__all__ = ["FORMATS", "detect_format", "unwrap_state_dict"]

# Signatures are disjoint, and no checkpoint saved by condinst_d2 matches any of them.
FORMATS: Dict[str, KeyFormat] = {fmt.name: fmt for fmt in (AUTHORS, EFFICIENTNET_LITE0, MMDET)}


def detect_format(keys: Iterable[str]) -> Optional[KeyFormat]:
    """The format of `FORMATS` whose signature some of `keys` matches; None for none (such as
    condinst_d2's own checkpoints)."""
    keys = list(keys)
    return next((fmt for fmt in FORMATS.values() if fmt.matches(keys)), None)


def unwrap_state_dict(loaded: Any) -> Any:
    """The state dict of a file that nests it under a format's `container` (mmdetection's
    {"meta": ..., "state_dict": weights}); `loaded` itself otherwise (a state dict, or anything
    else, left to the caller to judge)."""
    if not isinstance(loaded, Mapping) or any(torch.is_tensor(v) for v in loaded.values()):
        return loaded
    for container in {fmt.container for fmt in FORMATS.values()} - {None}:
        if isinstance(loaded.get(container), Mapping):
            return loaded[container]
    return loaded
