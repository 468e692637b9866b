"""A DetectionCheckpointer that converts foreign layouts and fails clearly on unusable files.

Files in a layout of `formats.FORMATS` (the authors' CondInst checkpoints, the package's ImageNet
EfficientNet-Lite0) are detected from their keys and converted to condinst_d2's layout on load,
so they work as MODEL.WEIGHTS as they are.

`DetectionCheckpointer.load` reports a truncated or corrupt file with torch's message, which does
not name the file, and loads a checkpoint of an unrelated model (no key in common) with warnings
only, leaving every weight at its random initialization. `CondInstCheckpointer` turns both into a
`ValueError` naming the file. Partial overlaps (ImageNet backbone weights into a detector) and shape
mismatches (fine-tuning with another number of classes) keep Detectron2's warnings.
"""

import errno
import logging
import os
from typing import Any, Dict, Iterable, List, Sequence
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys

from ..classes import CHECKPOINT_FIELD
from .formats import detect_format, unwrap_state_dict
from .rename import check_derived, convert_state_dict

__all__ = ["CondInstCheckpointer"]

logger = logging.getLogger(__name__)

_SHOWN_KEYS = 5


def _preview(keys: Iterable[str]) -> str:
    """The first few `keys`, sorted, with a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN_KEYS])
    rest = len(keys) - _SHOWN_KEYS
    return f"[{shown}{f', ... ({rest} more)' if rest > 0 else ''}]"


class CondInstCheckpointer(DetectionCheckpointer):
    """Same as `DetectionCheckpointer`, converting foreign layouts, with clear errors for files it
    cannot use.

    Raises (from `load` / `resume_or_load`):
        FileNotFoundError: a local checkpoint path that does not exist.
        ValueError: a file that cannot be read (truncated, corrupt, not a checkpoint), or whose
            weights share no parameter with the model.
        RuntimeError: a foreign file whose buffers disagree with the model's config (e.g. the
            authors' `sizes_of_interest`).

    Attributes:
        class_names: the model's class names, recorded in every file that `save` writes (as the
            field `condinst_d2.classes.CHECKPOINT_FIELD`); empty: none recorded.
    """

    class_names: Sequence[str] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loading_file = ""

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Loads `path` like `DetectionCheckpointer.load`; an empty path loads nothing."""
        if path and "://" not in path:
            local = urlparse(path)._replace(query="").geturl()
            if not os.path.isfile(local):
                raise FileNotFoundError(errno.ENOENT, "checkpoint not found", local)
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """Reads `filename` like Detectron2, wrapping any read failure in a ValueError naming it."""
        self._loading_file = filename
        try:
            return super()._load_file(filename)
        except FileNotFoundError:
            raise
        except Exception as e:  # torch, zipfile and pickle raise many unrelated types
            raise ValueError(f"cannot read checkpoint {filename!r}: {e}") from e

    def _load_model(self, checkpoint: Any) -> _IncompatibleKeys:
        """Unwraps a nested state dict (mmdetection's), converts a foreign layout, then loads the
        weights like Detectron2; raises ValueError if none belongs to the model."""
        if isinstance(checkpoint, dict) and "model" in checkpoint:
            checkpoint["model"] = unwrap_state_dict(checkpoint["model"])
        file_keys = list(checkpoint.get("model", {}).keys()) if isinstance(checkpoint, dict) else []
        if file_keys:
            checkpoint["model"] = self._convert_foreign(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        self._check_some_weights_loaded(incompatible, file_keys)
        return incompatible

    def _convert_foreign(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """`state_dict` in condinst_d2's layout: converted if its keys match a foreign format."""
        fmt = detect_format(state_dict)
        if fmt is None:
            return state_dict
        conversion = convert_state_dict(state_dict, fmt)
        problems = check_derived(conversion, fmt, self.model)
        if problems:
            raise RuntimeError(f"checkpoint {self._loading_file!r}: " + "; ".join(problems))
        logger.info(
            "Converted %s from %s: %s", self._loading_file, fmt.description, conversion.summary()
        )
        return conversion.state_dict

    def _check_some_weights_loaded(
        self, incompatible: _IncompatibleKeys, file_keys: List[str]
    ) -> None:
        """Raises ValueError if every model parameter is missing from the checkpoint.

        Parameters skipped for a shape mismatch count as present: the file is of this model.
        """
        params = [name for name, _ in self.model.named_parameters()]
        present = set(params) - set(incompatible.missing_keys)
        present |= {key for key, _, _ in incompatible.incorrect_shapes}
        if not params or present:
            return
        raise ValueError(
            f"file {self._loading_file!r} holds no weights of this model: none of its "
            f"{len(file_keys)} keys {_preview(file_keys)} matches one of the model's "
            f"{len(params)} parameters {_preview(params)}"
        )

    def save(self, name: str, **kwargs: Any) -> None:
        """Saves like Detectron2, with the model's `class_names` in the file when they are set."""
        if self.class_names:
            kwargs.setdefault(CHECKPOINT_FIELD, list(self.class_names))
        super().save(name, **kwargs)
