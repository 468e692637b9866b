#!/usr/bin/env python
"""Converts an authors' CondInst checkpoint (AdelaiDet model zoo layout) to condinst_d2's layout.

Not needed to use such a file (DetectionCheckpointer loads it directly); this writes the
converted file explicitly, prints each renamed / dropped key and, given --config-file, checks the
result against the model that config builds.

    python tools/convert_checkpoint.py CondInst_MS_R_50_1x.pth converted.pth \
        --config-file configs/CondInst/MS_R_50_1x.yaml
"""
import argparse
import os
import sys
import tempfile

import torch

from condinst_d2.checkpoint import convert_authors_state_dict


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint file {path!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file: say which file
        sys.exit(f"error: cannot read checkpoint {path!r}: {e}")
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        sys.exit(f"error: {path!r} is not a state dict nor a {{'model': state_dict}} checkpoint")
    return state


def _check_against_config(state: dict, config_file: str) -> int:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from condinst_d2 import add_condinst_config

    cfg = get_cfg()
    add_condinst_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    expected = build_model(cfg).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        print(f"{title} keys: {len(keys)}")
        for key in keys:
            print(f"  {key}")
    return 1 if missing or unexpected or wrong_shape else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the authors' checkpoint (.pth)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--config-file", help="check the converted keys against this config's model")
    args = parser.parse_args(argv)

    state, renamed, dropped = convert_authors_state_dict(_load(args.input))
    for old, new in renamed:
        print(f"renamed  {old} -> {new}")
    for key in dropped:
        print(f"dropped  {key} (not kept: condinst_d2 takes it from the config)")
    print(f"{len(state)} tensors, {len(renamed)} renamed, {len(dropped)} dropped")
    status = _check_against_config(state, args.config_file) if args.config_file else 0
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    # Written next to the destination then renamed: an interrupted run leaves no partial file.
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False) as tmp:
        torch.save({"model": state}, tmp)
    os.replace(tmp.name, args.output)
    print(f"wrote {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
