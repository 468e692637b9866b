"""Small helpers used across condinst_d2 (each exists only here)."""

from .file_io import atomic_write, remove_stale_temporaries

__all__ = ["atomic_write", "remove_stale_temporaries"]
