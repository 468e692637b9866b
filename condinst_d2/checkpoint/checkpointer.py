"""A DetectionCheckpointer that converts foreign layouts and fails clearly on unusable files.

Files in a layout of `formats.FORMATS` (the authors' CondInst checkpoints, the package's ImageNet
EfficientNet-Lite0) are detected from their keys and converted to condinst_d2's layout on load,
so they work as MODEL.WEIGHTS as they are.

`DetectionCheckpointer.load` reports a truncated or corrupt file with torch's message, which does
not name the file, and loads a checkpoint of an unrelated model (no key in common) with warnings
only, leaving every weight at its random initialization. `CondInstCheckpointer` turns both into a
`ValueError` naming the file. So are a file whose "model" is not a dict of arrays, a file that
would leave most of the model's parameters (`_MAX_NOT_LOADED`) at their random initialization (an
R-50 detector into an R-18 config), and, on resume, a last checkpoint with other shapes than the
model (a folder trained with another config). Partial overlaps (ImageNet backbone weights into a
detector) and a few shape mismatches (fine-tuning with another number of classes) keep
Detectron2's warnings. `resume_or_load` first removes the temporary files of killed saves.
"""

import errno
import logging
import os
from typing import Any, Dict, Iterable, List, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys

from ..classes import CHECKPOINT_FIELD
from ..utils import remove_stale_temporaries
from .formats import detect_format, unwrap_state_dict
from .rename import check_derived, convert_state_dict

__all__ = ["CondInstCheckpointer"]

logger = logging.getLogger(__name__)

_SHOWN_KEYS = 5
# A file belongs to another model when it leaves more than this fraction of the model's parameter
# elements random (missing, or skipped for another shape), or when more than this fraction of the
# parameter tensors it names have another shape. An ImageNet backbone leaves 31 % of R-50 CondInst
# random and names nothing of another shape; fine-tuning with another number of classes skips 2
# of about 140 tensors. A Detectron2 Mask R-CNN R-50 in an R-18 config leaves 47 % random (R-50's
# 3x3 convs happen to have R-18's shapes) but 23 of the 32 tensors it names have other shapes.
_MAX_NOT_LOADED = 0.5


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
        ValueError: a file that cannot be read (truncated, corrupt, not a checkpoint), whose
            weights share no or too few parameters with the model, or, resuming, whose shapes
            differ from the model's.
        RuntimeError: a foreign file whose buffers disagree with the model's config (e.g. the
            authors' `sizes_of_interest`).

    Attributes:
        class_names: the model's class names, recorded in every file that `save` writes (as the
            field `condinst_d2.classes.CHECKPOINT_FIELD`); empty: none recorded.
    """

    class_names: Sequence[str] = ()

    def __init__(self, *args: Any, for_inference: bool = False, **kwargs: Any) -> None:
        """`for_inference`: refuse weights whose shapes differ from the model's (Detectron2 skips
        them with a warning, which fine-tuning wants but which leaves a predictor random)."""
        super().__init__(*args, **kwargs)
        self.for_inference = for_inference
        self._loading_file = ""
        self._resuming = False

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Like Detectron2, after removing the temporary files of saves killed midway; resuming
        refuses a last checkpoint whose shapes differ from the model's (another config)."""
        if self.save_dir and self.save_to_disk and "://" not in self.save_dir:
            for stale in remove_stale_temporaries(self.save_dir):
                logger.info("Removed %s, left by a save that was killed", stale)
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Loads `path` like `DetectionCheckpointer.load`; an empty path loads nothing."""
        if path and "://" not in path:
            local = urlparse(path)._replace(query="").geturl()
            if not os.path.isfile(local):
                raise FileNotFoundError(errno.ENOENT, "checkpoint not found", local)
        try:
            return super().load(path, *args, **kwargs)
        finally:  # Detectron2 resets it only after a successful load; a refusal must too
            self._parsed_url_during_load = None

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
        weights like Detectron2; raises ValueError if the file is not of this model."""
        if isinstance(checkpoint, dict) and "model" in checkpoint:
            checkpoint["model"] = unwrap_state_dict(checkpoint["model"])
        self._check_is_state_dict(checkpoint)
        self._check_finite(checkpoint["model"])
        file_keys = list(checkpoint["model"].keys())
        if file_keys:
            checkpoint["model"] = self._convert_foreign(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        self._check_some_weights_loaded(incompatible, file_keys)
        self._check_most_weights_loaded(incompatible)
        if self.for_inference and incompatible.incorrect_shapes:
            raise ValueError(self._shape_mismatch_message(incompatible.incorrect_shapes))
        if self._resuming and incompatible.incorrect_shapes:
            key, file_shape, model_shape = incompatible.incorrect_shapes[0]
            raise ValueError(
                f"cannot resume from {self._loading_file!r}: it was trained with another config "
                f"({len(incompatible.incorrect_shapes)} tensors of other shapes, e.g. {key!r} "
                f"{tuple(file_shape)} in the file, {tuple(model_shape)} in the model, such as "
                "another number of classes); use another OUTPUT_DIR, or train without --resume"
            )
        return incompatible

    def _shape_mismatch_message(self, incorrect_shapes: List[Tuple[str, tuple, tuple]]) -> str:
        """Names the tensors of other shapes and the config key to set when it is the classes."""
        listed = ", ".join(
            f"{k!r} {tuple(f)} in the file, {tuple(m)} in the model"
            for k, f, m in incorrect_shapes[:3]
        )
        more = f" and {len(incorrect_shapes) - 3} more" if len(incorrect_shapes) > 3 else ""
        classes = [f[0] for k, f, _ in incorrect_shapes if k.endswith("cls_logits.weight")]
        hint = (
            f"the file has {classes[0]} classes: set MODEL.FCOS.NUM_CLASSES {classes[0]}, or use "
            "the config.yaml of its training run"
            if classes
            else "use the config the file was trained with (backbone depth, head widths)"
        )
        return f"weights {self._loading_file!r} do not fit this config: {listed}{more}; {hint}"

    def _check_is_state_dict(self, checkpoint: Any) -> None:
        """Raises ValueError naming the file unless its "model" maps names to arrays."""
        state = checkpoint.get("model") if isinstance(checkpoint, dict) else checkpoint
        bad = (
            [k for k, v in state.items() if not (torch.is_tensor(v) or isinstance(v, np.ndarray))]
            if isinstance(state, dict)
            else None
        )
        if bad is None or bad:
            what = type(state).__name__ if bad is None else f"entries such as {bad[0]!r}"
            raise ValueError(
                f"{self._loading_file!r} is not a checkpoint of weights (its model has {what}, "
                "not tensors); give a .pth saved by training or a converted checkpoint"
            )

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

    def _check_finite(self, state_dict: Dict[str, Any]) -> None:
        """Raises ValueError naming the file and tensors if a floating-point value is NaN or
        infinite (a diverged run saved as it was): it would predict garbage without a sign."""
        bad = [
            k
            for k, v in state_dict.items()
            if torch.is_floating_point(torch.as_tensor(v))
            and not torch.isfinite(torch.as_tensor(v)).all()
        ]
        if bad:
            raise ValueError(
                f"checkpoint {self._loading_file!r} has NaN or infinite values in {len(bad)} "
                f"tensors {_preview(bad)} (saved from a diverged run?); use an earlier checkpoint"
            )

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

    def _check_most_weights_loaded(self, incompatible: _IncompatibleKeys) -> None:
        """Raises ValueError if the file is of another model: more than `_MAX_NOT_LOADED` of the
        model's parameter elements would keep their random initialization (missing, or skipped
        for another shape), or more than `_MAX_NOT_LOADED` of the parameter tensors the file
        names have another shape."""
        params = dict(self.model.named_parameters())
        not_loaded = sorted(set(incompatible.missing_keys) & set(params))
        skipped = [k for k, _, _ in incompatible.incorrect_shapes if k in params]
        random = sum(params[k].numel() for k in not_loaded) / max(
            sum(p.numel() for p in params.values()), 1
        )
        named = len(params) - len(not_loaded) + len(skipped)
        if random > _MAX_NOT_LOADED:
            why = f"{random:.0%} of the model's parameters would stay random"
        elif skipped and len(skipped) / named > _MAX_NOT_LOADED:
            why = f"{len(skipped)} of the {named} parameters it names have other shapes"
        else:
            return
        raise ValueError(
            f"file {self._loading_file!r} is not of this model: {why} ({len(not_loaded)} "
            f"tensors not loaded, e.g. {_preview(skipped or not_loaded)}); check MODEL.WEIGHTS "
            "against the config (backbone depth, FPN and head widths)"
        )
