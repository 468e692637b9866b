"""Foreign checkpoint layouts as data: an ordered table of key rules, applied to a state dict.

A `KeyFormat` describes another codebase's key layout: a signature (a key that only that layout
has, to detect it), rules `(regex, template)` or `(regex, template, transform)` tried in order on
each key (the first full match wins; the template is expanded with the match's groups, a template
of None drops the key; the optional transform maps the file's tensor to condinst_d2's, e.g. a
reshape where the two codebases store a parameter in different shapes) and the dropped buffers
whose value condinst_d2 derives from the config (checked against the model).
`convert_state_dict` applies a format to a state dict and says what it did to every key.
"""

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "Derived",
    "KeyFormat",
    "Conversion",
    "Rule",
    "convert_state_dict",
    "check_derived",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
# (regex, template or None) or (regex, template, transform of the tensor).
Rule = Union[Tuple[str, Optional[str]], Tuple[str, Optional[str], Transform]]


class Derived(NamedTuple):
    """A buffer of the foreign file that condinst_d2 computes from its config instead."""

    key: str  # the file's key (dropped by a rule)
    attribute: str  # dotted attribute of the model holding condinst_d2's value, e.g. "mask_head.x"
    source: str  # where the model's value comes from, for the error message


@dataclass(frozen=True)
class KeyFormat:
    """A foreign key layout.

    Attributes:
        name: short name, e.g. "authors" (tools/convert_checkpoint.py --from).
        description: what the layout is, for messages.
        signature: regex; the layout is detected when some key fully matches it.
        rules: `Rule`s, tried in order; the first whose regex fully matches a key renames it to
            `match.expand(template)`, or drops it when the template is None, and replaces its
            tensor by `transform(tensor)` when the rule has a transform.
        derived: dropped buffers to check against the model (see `check_derived`).
        container: the key under which the layout's files nest the state dict (e.g.
            mmdetection's "state_dict"), or None when the weights are at the top level or
            under Detectron2's "model" (see `unwrap_state_dict`).
    """

    name: str
    description: str
    signature: str
    rules: Tuple[Rule, ...]
    derived: Tuple[Derived, ...] = ()
    container: Optional[str] = None

    def matches(self, keys: Iterable[str]) -> bool:
        """Whether some of `keys` fully matches the signature."""
        return any(re.fullmatch(self.signature, key) for key in keys)


@dataclass
class Conversion:
    """A state dict converted to condinst_d2's layout, with what happened to each file key.

    Attributes:
        state_dict: the converted tensors, in the file's order; left-over keys keep their name.
        renamed: (file key, condinst_d2 key) of every key whose name changed.
        dropped: the file's tensors that have no place in condinst_d2.
        left_over: file keys that no rule matches.
        transformed: (file key, condinst_d2 key) of every tensor a rule's transform changed.
    """

    state_dict: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    renamed: List[Tuple[str, str]] = field(default_factory=list)
    dropped: Dict[str, torch.Tensor] = field(default_factory=dict)
    left_over: List[str] = field(default_factory=list)
    transformed: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def num_kept(self) -> int:
        """Keys matched by a rule that keeps their name."""
        return len(self.state_dict) - len(self.renamed) - len(self.left_over)

    def summary(self) -> str:
        """E.g. "2 renamed, 368 kept, 2 dropped, 0 left over"."""
        return (
            f"{len(self.renamed)} renamed, {self.num_kept} kept, {len(self.dropped)} dropped, "
            f"{len(self.left_over)} left over"
        )


def _apply_rules(
    key: str, rules: Tuple[Rule, ...]
) -> Tuple[bool, Optional[str], Optional[Transform]]:
    """(whether a rule matches `key`, its new name: itself if none does, None if dropped, the
    matching rule's transform or None)."""
    for pattern, template, *transform in rules:
        match = re.fullmatch(pattern, key)
        if match:
            new = None if template is None else match.expand(template)
            return True, new, transform[0] if transform else None
    return False, key, None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], fmt: KeyFormat) -> Conversion:
    """Applies `fmt.rules` to every key of `state_dict` (which is not modified).

    The file's `_metadata` (module versions used by `_load_from_state_dict`) is carried over.

    Raises:
        ValueError: two file keys map to the same condinst_d2 key.
    """
    conversion = Conversion()
    origin: Dict[str, str] = {}
    for key, tensor in state_dict.items():
        matched, new, transform = _apply_rules(key, fmt.rules)
        if new is None:
            conversion.dropped[key] = tensor
            continue
        if new in origin:
            raise ValueError(f"{fmt.description}: {origin[new]!r} and {key!r} both map to {new!r}")
        origin[new] = key
        if transform is not None:
            tensor = transform(tensor)
            conversion.transformed.append((key, new))
        conversion.state_dict[new] = tensor
        if not matched:
            conversion.left_over.append(key)
        elif new != key:
            conversion.renamed.append((key, new))
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        conversion.state_dict._metadata = metadata
    return conversion


def check_derived(conversion: Conversion, fmt: KeyFormat, model: nn.Module) -> List[str]:
    """Compares each of `fmt.derived` that the file had with the model's value.

    Returns:
        One message per buffer whose value differs from the model's.
    """
    problems = []
    for derived in fmt.derived:
        if derived.key not in conversion.dropped:
            continue
        in_file = torch.as_tensor(conversion.dropped[derived.key]).tolist()
        in_model = list(attrgetter(derived.attribute)(model))
        if in_file != in_model:
            problems.append(
                f"{derived.key} in the checkpoint is {in_file} but the model has {in_model} "
                f"({derived.source})"
            )
    return problems
