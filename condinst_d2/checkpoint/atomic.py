"""Checkpoint files that are complete or absent, never half-written.

fvcore's Checkpointer writes `model_*.pth` and `last_checkpoint` in place, so a job killed during
a save leaves a truncated file that `--resume` then fails on. `AtomicPathManager` wraps the
checkpointer's path manager: files opened for writing go to a temporary name in the same folder
and are renamed over the destination only once completely written and flushed to disk.
"""
import contextlib
import os
from typing import Any, Iterator

__all__ = ["AtomicPathManager", "make_saves_atomic"]


class AtomicPathManager:
    """Delegates to `base`, except that local files opened for writing are written atomically."""

    def __init__(self, base: Any):
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def open(self, path: str, mode: str = "r", **kwargs: Any):
        if "w" not in mode or "://" in path:  # reads, and remote paths, as before
            return self._base.open(path, mode, **kwargs)
        return _atomic_open(path, mode)


@contextlib.contextmanager
def _atomic_open(path: str, mode: str) -> Iterator[Any]:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_saves_atomic(checkpointer: Any) -> Any:
    """Makes `checkpointer` (fvcore / Detectron2) write its files atomically; returns it."""
    if not isinstance(checkpointer.path_manager, AtomicPathManager):
        checkpointer.path_manager = AtomicPathManager(checkpointer.path_manager)
    return checkpointer
