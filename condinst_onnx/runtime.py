"""The runtime side of condinst_d2's ONNX export: BGR image of any size in, detections at that
size out.

The exported graph (condinst_d2/export/onnx_export.py) takes the image already resized to the
test size, in the config's channel order, and the size to return boxes and masks at; this module
does the resizing and the channel order from the file's metadata, as Detectron2's predictor does.
"""

import json
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import onnxruntime as ort

__all__ = ["CondInstOnnx", "Detections", "NotCondInstOnnxError", "resized_size"]

# Written by condinst_d2.export (METADATA_MARKER, FORMAT_VERSION); this module reads version 1.
MARKER = "condinst_d2.onnx_format"
SUPPORTED_VERSION = "1"
INPUTS = ("image", "output_hw")
OUTPUTS = ("boxes", "scores", "classes", "masks")


class NotCondInstOnnxError(ValueError):
    """A file that is not an ONNX model exported by condinst_d2; the message names it."""


class Detections(NamedTuple):
    """One image's detections, by decreasing score, at the image's size (H, W)."""

    boxes: np.ndarray  # (D, 4) float32 XYXY pixels
    scores: np.ndarray  # (D,) float32
    classes: np.ndarray  # (D,) int64 contiguous class indices
    masks: np.ndarray  # (D, H, W) bool


def resized_size(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """The (h, w) Detectron2's ResizeShortestEdge([min_size, min_size], max_size) gives an image
    of (height, width): short side to min_size unless the long side would exceed max_size."""
    scale = min_size / min(height, width)
    new_h, new_w = height * scale, width * scale
    longest = max(new_h, new_w)
    if longest > max_size:
        new_h, new_w = new_h * max_size / longest, new_w * max_size / longest
    return int(new_h + 0.5), int(new_w + 0.5)


def _open_session(
    path: str, providers: Optional[Sequence[str]], threads: Optional[int], memory_arena: bool
):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            path, options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as e:  # onnxruntime raises its own types for unreadable files
        raise NotCondInstOnnxError(f"{path} is not a readable ONNX model: {e}") from e


class CondInstOnnx:
    """A CondInst ONNX model: call it on BGR images."""

    def __init__(
        self,
        path: str,
        providers: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
        memory_arena: bool = True,
    ):
        """
        Args:
            path: an .onnx file written by condinst_d2's tools/export_onnx.py.
            providers: ONNX Runtime execution providers (default: CPU).
            threads: intra-op threads (default: ONNX Runtime's choice).
            memory_arena: ONNX Runtime's CPU arena, which keeps every block it allocated. False
                hands freed activations back to malloc: with glibc, and
                MALLOC_MMAP_THRESHOLD_=1048576 in the environment, back to the system at once
                (R-50 at 2500x1800: peak 634 instead of ~1100 MiB, for ~40 % more latency).
        Raises:
            FileNotFoundError: no such file.
            NotCondInstOnnxError: the file is not ONNX, or not one exported by condinst_d2.
        """
        self.session = _open_session(path, providers, threads, memory_arena)
        meta = self.session.get_modelmeta().custom_metadata_map
        names_in = tuple(x.name for x in self.session.get_inputs())
        names_out = tuple(x.name for x in self.session.get_outputs())
        if meta.get(MARKER) is None or names_in != INPUTS or names_out != OUTPUTS:
            raise NotCondInstOnnxError(
                f"{path} is an ONNX model but not one exported by condinst_d2's "
                f"tools/export_onnx.py (no {MARKER!r} metadata or other inputs/outputs)"
            )
        if meta[MARKER] != SUPPORTED_VERSION:
            raise NotCondInstOnnxError(
                f"{path} has export format {meta[MARKER]}; this runtime reads "
                f"{SUPPORTED_VERSION}: re-export it with this version's tools/export_onnx.py"
            )
        self.input_format = meta["input_format"]
        self.min_size = int(meta["min_size_test"])
        self.max_size = int(meta["max_size_test"])
        self.class_names: List[str] = json.loads(meta["class_names"])

    def model_input(self, bgr_image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 BGR -> the graph's (3, h, w) uint8 image: resized to the test size
        (bilinear, OpenCV's; MIN_SIZE_TEST 0 keeps the size) in the model's channel order."""
        if bgr_image.ndim != 3 or bgr_image.shape[2] != 3 or bgr_image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 BGR image, got {bgr_image.shape} {bgr_image.dtype}"
            )
        image = bgr_image[:, :, ::-1] if self.input_format == "RGB" else bgr_image
        if self.min_size > 0:
            h, w = resized_size(*image.shape[:2], self.min_size, self.max_size)
            if (h, w) != image.shape[:2]:
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def run(self, image_chw: np.ndarray, output_hw: Tuple[int, int]) -> Detections:
        """Runs the graph on a prepared (3, h, w) uint8 image; detections at `output_hw`."""
        outputs = self.session.run(
            list(OUTPUTS),
            {"image": image_chw, "output_hw": np.asarray(output_hw, dtype=np.int64)},
        )
        return Detections(*outputs)

    def __call__(self, bgr_image: np.ndarray) -> Detections:
        """Detections of one (H, W, 3) uint8 BGR image, at (H, W)."""
        return self.run(self.model_input(bgr_image), bgr_image.shape[:2])
