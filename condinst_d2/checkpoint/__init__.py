"""Checkpoints: foreign layouts as rename tables, loading with clear errors, atomic saves.

Importing it registers `efficientnet-lite0://` with Detectron2's PathManager.
"""

from .atomic import AtomicPathManager, make_saves_atomic
from .authors import AUTHORS
from .checkpointer import CondInstCheckpointer
from .efficientnet_lite0 import EFFICIENTNET_LITE0, IMAGENET_URI
from .formats import FORMATS, detect_format, unwrap_state_dict
from .mmdet import MMDET
from .rename import Conversion, Derived, KeyFormat, Rule, check_derived, convert_state_dict

__all__ = [
    "AUTHORS",
    "AtomicPathManager",
    "CondInstCheckpointer",
    "Conversion",
    "Derived",
    "EFFICIENTNET_LITE0",
    "FORMATS",
    "IMAGENET_URI",
    "MMDET",
    "KeyFormat",
    "Rule",
    "check_derived",
    "convert_state_dict",
    "detect_format",
    "make_saves_atomic",
    "unwrap_state_dict",
]
