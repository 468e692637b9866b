"""The authors' CondInst checkpoints (AdelaiDet model zoo) in condinst_d2's key layout.

Almost every module keeps the authors' name, so their files load directly with
`DetectionCheckpointer(model).load(path)`: `CondInst._load_from_state_dict` applies
`AUTHORS_RENAMES` and `DynamicMaskHead._load_from_state_dict` drops the authors' mask-head buffers.
`convert_authors_state_dict` does the same to a file explicitly (tools/convert_checkpoint.py).
"""
from typing import Dict, List, MutableMapping, Tuple

import torch

__all__ = ["AUTHORS_RENAMES", "AUTHORS_DROPPED_BUFFERS", "rename_authors_keys", "convert_authors_state_dict"]

# (authors' prefix, condinst_d2 prefix): the controller is part of the FCOS head here.
AUTHORS_RENAMES: List[Tuple[str, str]] = [("controller.", "proposal_generator.fcos_head.controller.")]

# Buffers of the authors' dynamic mask head that condinst_d2 derives from the config (or, for the
# iteration counter, does not have).
AUTHORS_DROPPED_BUFFERS: List[str] = ["mask_head._iter", "mask_head.sizes_of_interest"]


def rename_authors_keys(state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> List[Tuple[str, str]]:
    """Renames, in place, the keys under `prefix` that follow AUTHORS_RENAMES.

    Returns:
        The (old, new) key pairs renamed.
    """
    renamed = []
    for old_prefix, new_prefix in AUTHORS_RENAMES:
        old_prefix, new_prefix = prefix + old_prefix, prefix + new_prefix
        for key in [k for k in state_dict if k.startswith(old_prefix)]:
            new_key = new_prefix + key[len(old_prefix) :]
            state_dict[new_key] = state_dict.pop(key)
            renamed.append((key, new_key))
    return renamed


def convert_authors_state_dict(
    state_dict: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str]], List[str]]:
    """A copy of `state_dict` in condinst_d2's layout.

    Returns:
        (converted state dict, renamed (old, new) pairs, dropped keys).
    """
    converted = dict(state_dict)
    dropped = [k for k in AUTHORS_DROPPED_BUFFERS if converted.pop(k, None) is not None]
    renamed = rename_authors_keys(converted)
    return converted, renamed, dropped
