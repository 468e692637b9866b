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
LEVEL_LOSSES = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")  # fcos_<level>/<loss>
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
    """Writes a PNG: the losses (left) and the APs (right) over iterations, and below them, for a
    run with MODEL.FCOS.LOG_LEVEL_LOSSES, each FCOS loss split by FPN level.

    Raises:
        ValueError: when `series` has no loss.
    """
    losses = sorted(k for k in series if k.startswith("loss_")) + (
        ["total_loss"] if "total_loss" in series else []
    )
    if not losses:
        raise ValueError(f"no losses in {title}: is it a training run's metrics.json?")
    levels = sorted({k.split("/")[0] for k in series if k.startswith("fcos_p")}, key=_level_order)
    rows, columns = (2, len(LEVEL_LOSSES)) if levels else (1, 2)
    figure, axes = plt.subplots(
        rows, columns, figsize=(6 * columns, 4.5 * rows), sharex=True, squeeze=False
    )
    _plot_lines(axes[0][0], series, losses, "training losses", "loss")
    _plot_aps(axes[0][1], series)
    for axis in axes[0][2:]:
        axis.axis("off")
    for axis, loss in zip(axes[1] if levels else [], LEVEL_LOSSES):
        keys = [f"{level}/{loss}" for level in levels]
        _plot_lines(axis, series, keys, f"{loss} by FPN level", "share of the loss")
    for axis in axes.flat:
        if not axis.axison:
            continue
        axis.grid(alpha=0.3)
        axis.tick_params(labelbottom=True)  # on every row, though the x axis is shared
        axis.set_xlim(left=0)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def _level_order(name: str) -> int:
    """fcos_p3 -> 3, so that the levels are drawn finest first."""
    return int(name[len("fcos_p") :])


def _plot_lines(axis, series: Series, keys: Sequence[str], title: str, ylabel: str) -> None:
    for key in keys:
        if key in series:
            iterations, values = zip(*series[key])
            width = 2.0 if key == "total_loss" else 1.2
            axis.plot(iterations, values, marker=".", label=key, linewidth=width)
    axis.set(title=title, xlabel="iteration", ylabel=ylabel)
    axis.legend()


def _plot_aps(axis, series: Series) -> None:
    aps = [k for k in AP_KEYS if k in series]
    for key in aps:
        iterations, values = zip(*series[key])
        axis.plot(iterations, values, marker="o", label=key)
    axis.set(title="evaluation", xlabel="iteration", ylabel="AP (%)")
    if aps:
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no evaluation in this run", ha="center", transform=axis.transAxes)


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
