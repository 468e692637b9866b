#!/usr/bin/env python
"""Writes a copy of a COCO instance JSON without its masks: every annotation loses its
'segmentation' (boxes, classes and images are kept). BoxInst trains on such a file; evaluating on
the original file measures its masks against the real ones.

    python tools/boxes_only.py data/train.json data/train_boxes_only.json
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from condinst_d2.data import drop_masks
from condinst_d2.utils import atomic_write


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="COCO instance JSON")
    parser.add_argument("output", help="where to write the JSON without masks")
    args = parser.parse_args(argv)
    try:
        with open(args.input) as f:
            data = json.load(f)
        count = drop_masks(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"error: cannot read COCO annotations from {args.input!r}: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output) as f:
        json.dump(data, f)
    print(f"{args.output}: {count} annotations, boxes only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
