from .authors import AUTHORS_DROPPED_BUFFERS, AUTHORS_RENAMES, convert_authors_state_dict, rename_authors_keys

__all__ = ["AUTHORS_DROPPED_BUFFERS", "AUTHORS_RENAMES", "convert_authors_state_dict", "rename_authors_keys"]
