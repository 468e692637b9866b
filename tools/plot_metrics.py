#!/usr/bin/env python
"""Plots a training run's metrics.json: the losses and the evaluation APs over iterations.

    python tools/plot_metrics.py OUTPUT_DIR            # writes OUTPUT_DIR/metrics.png
    python tools/plot_metrics.py run/metrics.json --output curves.png

Detectron2's JSONWriter appends one JSON object per logging period (losses, lr, times) and one per
evaluation (bbox/AP, segm/AP, ...). A resumed run writes some iterations again: the last value of
an iteration is plotted.
"""

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

AP_KEYS = ("segm/AP", "bbox/AP", "segm/AP50", "bbox/AP50")
Series = Dict[str, List[Tuple[int, float]]]


def read_metrics(path: str) -> Series:
    """metric name -> [(iteration, value)] sorted by iteration, the last value of each iteration.

    Raises:
        ValueError: a line that is not a JSON object with an "iteration".
    """
    values: Dict[str, Dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number} is not a metrics record ({e})") from e
            for key, value in record.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "iteration":
                    values.setdefault(key, {})[iteration] = float(value)
    return {key: sorted(points.items()) for key, points in values.items()}


def plot(series: Series, title: str, output: str) -> None:
    """Writes a PNG: the losses (left) and the APs (right) over iterations.

    Raises:
        ValueError: when `series` has no loss.
    """
    losses = sorted(k for k in series if k.startswith("loss_")) + (
        ["total_loss"] if "total_loss" in series else []
    )
    if not losses:
        raise ValueError(f"no losses in {title}: is it a training run's metrics.json?")
    aps = [k for k in AP_KEYS if k in series]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for key in losses:
        iterations, values = zip(*series[key])
        width = 2.0 if key == "total_loss" else 1.2
        left.plot(iterations, values, marker=".", label=key, linewidth=width)
    left.set(title="training losses", xlabel="iteration", ylabel="loss")
    left.legend()
    for key in aps:
        iterations, values = zip(*series[key])
        right.plot(iterations, values, marker="o", label=key)
    right.set(title="evaluation", xlabel="iteration", ylabel="AP (%)")
    if aps:
        right.legend()
    else:
        right.text(0.5, 0.5, "no evaluation in this run", ha="center", transform=right.transAxes)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.set_xlim(left=0)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: returns 0, or 1 with a one-line error."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("metrics", help="a run's OUTPUT_DIR, or its metrics.json")
    parser.add_argument("--output", help="the PNG to write (default: metrics.png beside the JSON)")
    args = parser.parse_args(argv)
    path = args.metrics
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    output = args.output or os.path.join(os.path.dirname(path), "metrics.png")
    try:
        plot(read_metrics(path), path, output)
    except (OSError, ValueError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
