"""Files that are complete or absent, never half-written."""

import contextlib
import os
from typing import IO, Iterator

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file next to `path` for writing; on a clean exit it is flushed to disk and
    renamed over `path`, on an error it is removed and `path` is left as it was.

    Args:
        path: the destination file; its folder must exist.
        mode: "w" (text) or "wb" (binary).
    """
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
