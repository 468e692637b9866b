"""Files that are complete or absent, never half-written."""

import contextlib
import errno
import os
import re
import time
from typing import IO, Iterator, List

__all__ = ["atomic_write", "remove_stale_temporaries"]

# `atomic_write`'s temporary name: the destination, ".tmp", the writing process's id.
_TEMPORARY = re.compile(r"^(?P<path>.+)\.tmp(?P<pid>[0-9]+)$")
# A temporary file younger than this may belong to a live writer on another machine (shared
# folder), whose process id means nothing here: it is left alone.
_STALE_AFTER_S = 60.0


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file next to `path` for writing; on a clean exit it is flushed to disk and
    renamed over `path`, on an error it is removed and `path` is left as it was.

    The file gets the permissions of a new file (0666 minus the umask), not the 0600 of a
    temporary file. A write that fails for lack of space raises OSError(ENOSPC) naming `path`.

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
    except Exception as e:
        _raise_if_disk_full(e, path)
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _raise_if_disk_full(error: BaseException, path: str) -> None:
    """Re-raises a full disk (also when torch's writer wraps it in a RuntimeError) as one OSError
    that names `path`."""
    chain = [error]
    while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG) for e in chain)
    if full:
        raise OSError(
            errno.ENOSPC,
            f"cannot write {path}: no space left on the disk (or over the file-size limit); "
            "free space or write elsewhere",
        ) from error


def remove_stale_temporaries(folder: str) -> List[str]:
    """Removes the temporary files that `atomic_write` left in `folder` when its process was
    killed during a write; returns their paths.

    Only files named `<name>.tmp<pid>` directly in `folder`, whose process is not running and
    which have not been modified for a minute, are removed.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = _TEMPORARY.match(name)
        path = os.path.join(folder, name)
        if match is None or not os.path.isfile(path) or _is_running(int(match["pid"])):
            continue
        if time.time() - os.path.getmtime(path) < _STALE_AFTER_S:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    return removed


def _is_running(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (ours too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process; or an absurd id: leave the file
    return True
