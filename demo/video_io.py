"""Video reading and writing for the demo, with OpenCV.

Writing picks, for the output's container, the first codec that this OpenCV build can really
encode (probed by writing two frames and reading them back), falls back to VP8 in .webm (else
Motion-JPEG in .avi) with a warning, logs the codec and whether web browsers play it, and writes to a hidden partial file that is renamed only once at least one frame
is in it: an interrupted or failed run never leaves an empty or half-written video.
"""

import contextlib
import logging
import math
import os
import sys
import tempfile
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "VIDEO_SUFFIXES",
    "browser_video_suffix",
    "AtomicVideoWriter",
    "capture_fps",
    "choose_codec",
    "frame_batches",
    "open_capture",
]

logger = logging.getLogger("demo")

# Codecs tried per container, the most widely playable first (H.264 needs an FFmpeg encoder that
# OpenCV's wheels lack). VP8 before VP9: every browser plays both, and VP8 encodes about 4x faster.
CODECS = {
    ".mp4": ("avc1", "mp4v"),
    ".m4v": ("avc1", "mp4v"),
    ".mov": ("avc1", "mp4v"),
    ".mkv": ("avc1", "mp4v", "MJPG"),
    ".avi": ("MJPG", "XVID"),
    ".webm": ("VP80", "VP90"),
}
VIDEO_SUFFIXES = tuple(CODECS)
FALLBACKS = ((".webm", "VP80"), (".avi", "MJPG"))
CODEC_NAMES = {
    "avc1": "H.264",
    "mp4v": "MPEG-4 Part 2",
    "MJPG": "Motion-JPEG",
    "XVID": "MPEG-4 Part 2 (Xvid)",
    "VP80": "VP8",
    "VP90": "VP9",
}
# (container, codec) pairs that web browsers play.
BROWSER_PLAYABLE = {(".mp4", "avc1"), (".m4v", "avc1"), (".webm", "VP80"), (".webm", "VP90")}
DEFAULT_FPS = 30.0


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silences OpenCV and its FFmpeg while probing codecs or a camera that may be missing.

    FFmpeg can write to the process's stderr directly (depending on which libraries were loaded
    first), so file descriptor 2 goes to /dev/null as well, for the duration of the probe only.
    """
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        cv2.utils.logging.setLogLevel(level)


def count_frames(path: str) -> int:
    """The number of frames OpenCV decodes from `path` (by reading them all)."""
    capture = cv2.VideoCapture(path)
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def codec_works(fourcc: str, suffix: str, size: Tuple[int, int]) -> bool:
    """Whether this OpenCV writes a readable `fourcc` video in a `suffix` file of `size` (w, h)."""
    with tempfile.TemporaryDirectory() as folder, _quiet_opencv():
        path = os.path.join(folder, "probe" + suffix)
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 10.0, size)
        if not writer.isOpened():
            return False
        for value in (0, 255):
            writer.write(np.full((size[1], size[0], 3), value, dtype=np.uint8))
        writer.release()
        return count_frames(path) == 2


def choose_codec(path: str, size: Tuple[int, int]) -> Tuple[str, str]:
    """(path, fourcc) to write a video of `size` (w, h): `path` itself, or a fallback (.webm, else
    .avi) with the same stem.

    Raises:
        OSError: when this OpenCV can write no video at all.
    """
    stem, suffix = os.path.splitext(path)
    for fourcc in CODECS.get(suffix.lower(), ()):
        if codec_works(fourcc, suffix, size):
            return path, fourcc
    for suffix, fourcc in FALLBACKS:
        if codec_works(fourcc, suffix, size):
            logger.warning(
                "this OpenCV cannot write %s: writing %s with %s instead",
                path,
                stem + suffix,
                CODEC_NAMES[fourcc],
            )
            return stem + suffix, fourcc
    raise OSError(f"this OpenCV build can write no video codec (tried for {path})")


def browser_video_suffix() -> str:
    """The container of the videos written into a folder: .mp4 (H.264) when this OpenCV encodes
    H.264, else .webm (VP8); web browsers play both."""
    return ".mp4" if codec_works("avc1", ".mp4", (64, 48)) else ".webm"


def plays_in_browsers(path: str, fourcc: str) -> bool:
    """Whether web browsers play a `fourcc` video in `path`'s container."""
    return (os.path.splitext(path)[1].lower(), fourcc) in BROWSER_PLAYABLE


def describe_codec(path: str, fourcc: str) -> str:
    """The codec `fourcc` in `path`'s container, and whether web browsers play it."""
    name = CODEC_NAMES.get(fourcc, fourcc)
    if plays_in_browsers(path, fourcc):
        return f"{name}, plays in web browsers"
    return f"{name}, which web browsers do not play (a {browser_video_suffix()} output plays)"


class AtomicVideoWriter:
    """Writes BGR frames to a partial file beside `path`, opened on the first frame at its size.

    `close()` renames the partial file to the final path when at least one frame was written and
    `keep` is true, else deletes it. The final path differs from `path` when the codec fell back.
    """

    def __init__(self, path: str, fps: float):
        self.path = path
        self.fps = fps
        self.frames = 0
        self._writer: Optional[cv2.VideoWriter] = None
        self._partial = ""
        self._size = (0, 0)

    def _open(self, size: Tuple[int, int]) -> None:
        self.path, fourcc = choose_codec(self.path, size)
        folder, name = os.path.split(self.path)
        stem, suffix = os.path.splitext(name)
        self._partial = os.path.join(folder, f".{stem}.partial{suffix}")
        with _quiet_opencv():  # FFmpeg reports OpenCV's fourcc tags for WebM as unsupported
            writer = cv2.VideoWriter(self._partial, cv2.VideoWriter_fourcc(*fourcc), self.fps, size)
        if not writer.isOpened():
            self._remove_partial()
            raise OSError(f"cannot write the video {self.path}")
        self._writer, self._size = writer, size
        log = logger.info if plays_in_browsers(self.path, fourcc) else logger.warning
        log(
            "writing %s (%s; %dx%d, %.4g fps)",
            self.path,
            describe_codec(self.path, fourcc),
            size[0],
            size[1],
            self.fps,
        )

    def write(self, frame: np.ndarray) -> bool:
        """Appends an (H, W, 3) uint8 BGR frame; always True (a frame sink that never stops)."""
        size = (frame.shape[1], frame.shape[0])
        if self._writer is None:
            self._open(size)
        elif size != self._size:
            raise ValueError(
                f"frame of {size[0]}x{size[1]} for a {self._size[0]}x{self._size[1]} video"
            )
        self._writer.write(frame)
        self.frames += 1
        return True

    def close(self, keep: bool = True) -> Optional[str]:
        """Finishes the file; returns its final path, or None when nothing was kept."""
        if self._writer is None:
            return None
        self._writer.release()
        self._writer = None
        if keep and self.frames > 0:
            os.replace(self._partial, self.path)
            return self.path
        self._remove_partial()
        return None

    def _remove_partial(self) -> None:
        if os.path.exists(self._partial):
            os.unlink(self._partial)


def open_capture(source: str) -> cv2.VideoCapture:
    """Opens a video file, or a camera given as its index ("0").

    Raises:
        OSError: naming the source, when it is missing or OpenCV cannot open it.
    """
    if source.isdigit():
        with _quiet_opencv():  # every backend reports a missing camera at length
            capture = cv2.VideoCapture(int(source))
        if not capture.isOpened():
            raise OSError(f"cannot open camera {source} (is a camera connected and accessible?)")
        return capture
    if not os.path.isfile(source):
        raise OSError(f"video not found: {source}")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise OSError(f"cannot read video {source}: not a video format this OpenCV decodes")
    return capture


def capture_fps(capture: cv2.VideoCapture) -> float:
    """The capture's frame rate, or DEFAULT_FPS (with a warning) when it reports none."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not fps or math.isnan(fps) or fps <= 0:
        logger.warning("the input reports no frame rate: writing at %g fps", DEFAULT_FPS)
        return DEFAULT_FPS
    return fps


def frame_batches(
    capture: cv2.VideoCapture, batch_size: int, max_frames: Optional[int]
) -> Iterator[List[np.ndarray]]:
    """Reads BGR frames in lists of up to `batch_size`, stopping after `max_frames` if given."""
    batch: List[np.ndarray] = []
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            break
        batch.append(frame)
        count += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
