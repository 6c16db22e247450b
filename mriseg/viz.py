"""Pictures a person looks at: overlays, GIFs, the Dice bar plot, training curves.

matplotlib is used with the non-interactive Agg backend so that everything works
on headless cluster nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --- overlays and GIFs (predict) ---------------------------------------------

# --- evaluation plots (evaluate) ---------------------------------------------

@dataclass
class DiceBars:
    """What one panel of the Dice bar plot drew: cases bottom to top, in ascending Dice."""

    region: str
    case_ids: list[str]
    dice: list[float]
    mean: float
    median: float


def plot_dice_bars(dice_by_region: dict[str, dict[str, float]], path: Path) -> dict[str, DiceBars]:
    """Draw the per-case Dice bar plot, one panel per region, and save it as PNG at ``path``.

    As in the reference program: horizontal bars sorted by Dice (the worst case at the
    bottom), the mean as a red line and the median as a green line. Cases whose Dice is
    not defined are left out by the caller. Returns the data each panel drew.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    panels = {region: values for region, values in dice_by_region.items() if values}
    if not panels:
        raise ValueError("no defined Dice value to plot")
    most_cases = max(len(values) for values in panels.values())
    figure = Figure(figsize=(5.5 * len(panels), max(3.0, 1.2 + 0.28 * most_cases)), layout="constrained")
    drawn: dict[str, DiceBars] = {}
    for index, (region, values) in enumerate(panels.items()):
        ordered = sorted(values.items(), key=lambda item: (item[1], item[0]))
        bars = DiceBars(region=region, case_ids=[case for case, _ in ordered],
                        dice=[float(dice) for _, dice in ordered],
                        mean=float(np.mean(list(values.values()))),
                        median=float(np.median(list(values.values()))))
        axes = figure.add_subplot(1, len(panels), index + 1)
        positions = np.arange(len(ordered))
        axes.barh(positions, bars.dice, color="skyblue")
        axes.set_yticks(positions, bars.case_ids, fontsize="small")
        axes.axvline(bars.mean, color="red", linewidth=2, label=f"mean {bars.mean:.3f}")
        axes.axvline(bars.median, color="green", linewidth=2, label=f"median {bars.median:.3f}")
        axes.set_xlim(0.0, 1.0)
        axes.set_xticks(np.linspace(0.0, 1.0, 11))
        axes.xaxis.grid(color="silver", alpha=0.5, linestyle="--")
        axes.set_xlabel("Dice coefficient")
        axes.set_title(region)
        axes.legend(loc="lower right", fontsize="small")
        drawn[region] = bars
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(temporary, format="png", dpi=100)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return drawn


# --- training curves (train) -------------------------------------------------

# --- benchmark timeline (benchmark) ------------------------------------------
