from .atomic import AtomicPathManager, make_saves_atomic
from .checkpointer import CondInstCheckpointer
from .authors import AUTHORS_DROPPED_BUFFERS, AUTHORS_RENAMES, convert_authors_state_dict, rename_authors_keys

__all__ = [
    "AtomicPathManager",
    "CondInstCheckpointer",
    "make_saves_atomic",
    "AUTHORS_DROPPED_BUFFERS",
    "AUTHORS_RENAMES",
    "convert_authors_state_dict",
    "rename_authors_keys",
]
