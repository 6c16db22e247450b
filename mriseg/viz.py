"""Pictures a person looks at: overlays, GIFs, the Dice bar plot, training curves.

matplotlib is used with the non-interactive Agg backend so that everything works
on headless cluster nodes.
"""

from __future__ import annotations

# --- overlays and GIFs (predict) ---------------------------------------------

# --- evaluation plots (evaluate) ---------------------------------------------

# --- training curves (train) -------------------------------------------------

# --- benchmark timeline (benchmark) ------------------------------------------

import os  # noqa: E402  (kept in this section so the sections merge cleanly)
from pathlib import Path  # noqa: E402


def draw_benchmark_timeline(report: dict, path: str | os.PathLike) -> Path:
    """Draw which stage computes when, on each device, during one step of each split configuration.

    One panel for the naive split and one for the fastest pipeline, sharing the time
    axis so the idle gaps (the bubble) compare directly. Forward bars are light,
    backward bars dark; each bar is labelled with its micro-batch.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mriseg.errors import MrisegError

    splits = [e for e in report["results"] if e.get("timeline")]
    if not splits:
        raise MrisegError("no split configuration was measured, so there is no timeline to draw "
                          "(give two devices, e.g. --devices cpu,cpu)")
    naive = next((e for e in splits if e["mode"] == "naive split"), None)
    pipelined = [e for e in splits if e["mode"] == "pipelined"]
    panels = [e for e in (naive, max(pipelined, key=lambda e: e["speedup"]) if pipelined else None) if e]
    colours = {("F", 0): "#9ecae1", ("B", 0): "#3182bd", ("F", 1): "#fdae6b", ("B", 1): "#e6550d"}
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 1.8 * len(panels) + 0.8), squeeze=False,
                                sharex=True)
    for axis, entry in zip(axes[:, 0], panels):
        for event in entry["timeline"]:
            stage, kind = event["stage"], event["kind"]
            width = event["end_s"] - event["start_s"]
            axis.barh(stage, width, left=event["start_s"], color=colours[(kind, stage % 2)], edgecolor="black",
                      linewidth=0.5)
            axis.text(event["start_s"] + width / 2, stage, f"{kind}{event['micro_batch']}", ha="center",
                      va="center", fontsize=7)
        title = ("naive split" if entry["mode"] == "naive split"
                 else f"{entry['schedule']}, {entry['micro_batches']} micro-batches")
        axis.set_title(f"{title} ({entry['split']}): step {entry['step_s']['median'] * 1000:.0f} ms median, "
                       f"{entry['speedup']:.2f}x single", fontsize=9)
        groups = entry["groups"]
        axis.set_yticks([0, 1], [f"device 0: {groups[0][0]}..{groups[0][-1]}",
                                 f"device 1: {groups[1][0]}..{groups[1][-1]}"], fontsize=8)
        axis.invert_yaxis()
    axes[-1, 0].set_xlabel("seconds since the step started (F = forward, B = backward, number = micro-batch)")
    figure.suptitle(f"{report['model']} {'x'.join(map(str, report['input_shape']))} on "
                    f"{','.join(report['devices'])}: one training step", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path
