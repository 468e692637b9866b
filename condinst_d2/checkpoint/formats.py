"""The foreign checkpoint layouts condinst_d2 converts, and their detection.

Adding a layout: write its `KeyFormat` (rules and signature) in a module of this package and list
it in `FORMATS`; `CondInstCheckpointer` and tools/convert_checkpoint.py then handle it.
"""

from typing import Dict, Iterable, Optional

from .authors import AUTHORS
from .efficientnet_lite0 import EFFICIENTNET_LITE0
from .rename import KeyFormat

__all__ = ["FORMATS", "detect_format"]

# Signatures are disjoint, and no checkpoint saved by condinst_d2 matches any of them.
FORMATS: Dict[str, KeyFormat] = {fmt.name: fmt for fmt in (AUTHORS, EFFICIENTNET_LITE0)}


def detect_format(keys: Iterable[str]) -> Optional[KeyFormat]:
    """The format of `FORMATS` whose signature some of `keys` matches; None for none (such as
    condinst_d2's own checkpoints)."""
    keys = list(keys)
    return next((fmt for fmt in FORMATS.values() if fmt.matches(keys)), None)
