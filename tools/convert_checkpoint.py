#!/usr/bin/env python
"""Converts a checkpoint of another codebase to condinst_d2's key layout, printing each mapping.

Not needed to use such a file (CondInstCheckpointer, hence train_net.py and the demo, converts it
on load); this writes the converted file explicitly, prints every renamed / dropped / left-over key
and, given --config-file, checks the result against the model that config builds.

    python tools/convert_checkpoint.py CondInst_MS_R_50_1x.pth converted.pth --from authors \
        --config-file configs/CondInst/MS_R_50_1x.yaml
    python tools/convert_checkpoint.py condinst_r50_fpn_ms-poly-90k_coco_instance.pth \
        converted.pth --from mmdet --config-file configs/CondInst/mmdet_R_50_1x.yaml
"""

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.modeling import build_model
from torch import nn

from condinst_d2.checkpoint import (
    FORMATS,
    Conversion,
    KeyFormat,
    check_derived,
    convert_state_dict,
    detect_format,
    unwrap_state_dict,
)
from condinst_d2.config import get_condinst_cfg
from condinst_d2.utils import atomic_write


def _load(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in `path` (a state dict, {"model": state dict} or a format's nesting such
    as mmdetection's {"meta", "state_dict"}); exits naming the file."""
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint file {path!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file: say which file
        sys.exit(f"error: cannot read checkpoint {path!r}: {e}")
    state = unwrap_state_dict(loaded.get("model", loaded)) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        sys.exit(
            f"error: {path!r} is not a state dict nor a {{'model': state_dict}} or "
            "{'state_dict': state_dict} checkpoint"
        )
    return state


def _require_format(state: Dict[str, torch.Tensor], fmt: KeyFormat, path: str) -> None:
    """Exits with one line unless `state` is in the layout of `fmt`."""
    if fmt.matches(state):
        return
    detected = detect_format(state)
    if detected is None:
        found = f"it matches none of the known formats ({', '.join(FORMATS)})"
    else:
        found = f"it is {detected.description} (--from {detected.name})"
    sys.exit(f"error: {path!r} is not in the layout of {fmt.description}: {found}")


def _print_conversion(state: Dict[str, torch.Tensor], conversion: Conversion) -> None:
    """Prints every renamed, transformed (with the shapes), dropped (with its value when small)
    and left-over key of `state`, then counts."""
    for old, new in conversion.renamed:
        print(f"renamed  {old} -> {new}")
    for old, new in conversion.transformed:
        before, after = tuple(state[old].shape), tuple(conversion.state_dict[new].shape)
        print(f"transformed  {old} {before} -> {new} {after}")
    for key, tensor in conversion.dropped.items():
        value = f" = {tensor.tolist()}" if tensor.numel() <= 8 else ""
        print(f"dropped  {key}{value} (no place in condinst_d2)")
    for key in conversion.left_over:
        print(f"left over  {key} (no rule matches it; kept as it is)")
    print(f"{len(conversion.state_dict)} tensors: {conversion.summary()}")


def _config_problems(conversion: Conversion, fmt: KeyFormat, model: nn.Module) -> List[str]:
    """Prints the converted keys the model of a config lacks, misses or shapes differently, and
    the dropped buffers that disagree with it; returns every problem found."""
    state, expected = conversion.state_dict, model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    for title, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong_shape),
    ):
        print(f"{title} keys: {len(keys)}")
        for key in keys:
            print(f"  {key}")
    derived = check_derived(conversion, fmt, model)
    for problem in derived:
        print(f"mismatch: {problem}")
    return missing + unexpected + wrong_shape + derived


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Converts, prints, checks against --config-file if given, writes; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="the foreign checkpoint (.pth)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument(
        "--from",
        dest="fmt",
        choices=sorted(FORMATS),
        default="authors",
        help="the layout of the input (default: authors)",
    )
    parser.add_argument(
        "--config-file", help="check the converted keys against this config's model"
    )
    args = parser.parse_args(argv)

    fmt = FORMATS[args.fmt]
    state = _load(args.input)
    _require_format(state, fmt, args.input)
    conversion = convert_state_dict(state, fmt)
    _print_conversion(state, conversion)
    problems = []
    if args.config_file:
        cfg = get_condinst_cfg(args.config_file, ["MODEL.DEVICE", "cpu"])
        problems = _config_problems(conversion, fmt, build_model(cfg))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output, "wb") as f:
        torch.save({"model": conversion.state_dict}, f)
    print(f"wrote {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
