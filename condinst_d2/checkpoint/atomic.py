"""Checkpoint files that are complete or absent, never half-written.

fvcore's Checkpointer writes `model_*.pth` and `last_checkpoint` in place, so a job killed during
a save leaves a truncated file that `--resume` then fails on. `AtomicPathManager` wraps the
checkpointer's path manager: files opened for writing go to a temporary name in the same folder
and are renamed over the destination only once completely written and flushed to disk.
"""

from typing import IO, Any, ContextManager

from ..utils import atomic_write

__all__ = ["AtomicPathManager", "make_saves_atomic"]


class AtomicPathManager:
    """Delegates to `base`, except that local files opened for writing are written atomically."""

    def __init__(self, base: Any):
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def open(self, path: str, mode: str = "r", **kwargs: Any) -> ContextManager[IO]:
        if "w" not in mode or "://" in path:  # reads, and remote paths, as before
            return self._base.open(path, mode, **kwargs)
        return atomic_write(path, mode)


def make_saves_atomic(checkpointer: Any) -> Any:
    """Makes `checkpointer` (fvcore / Detectron2) write its files atomically; returns it."""
    if not isinstance(checkpointer.path_manager, AtomicPathManager):
        checkpointer.path_manager = AtomicPathManager(checkpointer.path_manager)
    return checkpointer
