"""Pictures a person looks at: overlays, GIFs, the Dice bar plot, training curves.

matplotlib is used with the non-interactive Agg backend so that everything works
on headless cluster nodes.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mriseg.files import atomic_path, write_bytes_atomic

# --- overlays and GIFs (predict) ---------------------------------------------

PREDICTION_COLOUR = (255, 0, 0)
TRUTH_COLOUR = (0, 255, 0)
# One fixed colour per label value, so that a class looks the same in every picture.
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (255, 64, 64), 2: (64, 220, 64), 3: (64, 128, 255), 4: (255, 220, 0),
    5: (255, 0, 255), 6: (0, 230, 230), 7: (255, 140, 0), 8: (170, 110, 255),
}
LEGEND_HEIGHT = 14
# Smaller pictures are enlarged (whole pixels) so that the legend and slice number fit.
MIN_PICTURE_WIDTH = 160


def outline(mask: np.ndarray) -> np.ndarray:
    """The border pixels of a 2D mask: mask pixels with a non-mask pixel among their 8 neighbours.

    Pixels beyond the image edge count as mask, as in the reference program, so a
    mask touching the edge is not outlined along it.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=True)
    height, width = mask.shape
    interior = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            interior &= padded[dy:dy + height, dx:dx + width]
    return mask & ~interior


def to_grey(volume: np.ndarray) -> np.ndarray:
    """Scale intensities to uint8 between the volume's 0.5th and 99.5th percentiles."""
    low, high = np.percentile(volume, [0.5, 99.5])
    scaled = (volume - low) / (high - low) if high > low else np.zeros_like(volume)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def display_planes(volume: np.ndarray, slice_axis: int, axis_codes: Sequence[str] | None) -> list[np.ndarray]:
    """The slices of ``volume`` along ``slice_axis``, turned so that anterior is up.

    With NIfTI axis codes (e.g. ``("L", "P", "S")``) each slice is shown in the
    radiological convention: anterior at the top, the patient's right on the left of
    the picture. Without codes (TIF stacks) slices are shown as stored.
    """
    planes = list(np.moveaxis(volume, slice_axis, 0))
    if not axis_codes:
        return planes
    rows_code, cols_code = [code for axis, code in enumerate(axis_codes) if axis != slice_axis]
    transpose = rows_code in "LR"  # put the anterior-posterior axis on the rows
    if transpose:
        rows_code, cols_code = cols_code, rows_code
    flip_rows, flip_cols = rows_code == "A", cols_code == "R"
    oriented = []
    for plane in planes:
        plane = plane.T if transpose else plane
        oriented.append(plane[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])
    return oriented


def overlay_binary(grey: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """RGB picture of a grey slice with the predicted outline in red and the true one in green.

    Green is drawn last, as in the reference program, so it wins where the outlines meet.
    """
    picture = np.repeat(grey[..., None], 3, axis=-1)
    picture[outline(predicted)] = PREDICTION_COLOUR
    if truth is not None:
        picture[outline(truth)] = TRUTH_COLOUR
    return picture


def overlay_labels(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB picture of a grey slice with the outline of each label value in its fixed colour."""
    picture = np.repeat(grey[..., None], 3, axis=-1)
    for value in np.unique(labels[labels > 0]):
        picture[outline(labels == value)] = LABEL_COLOURS.get(int(value), (255, 255, 255))
    return picture


def add_legend(picture: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]], caption: str) -> np.ndarray:
    """Append a strip below ``picture`` with ``caption``, then a colour swatch and name per entry,
    wrapped onto more lines where the picture is too narrow for them all.

    The caption comes first so that it stays visible on narrow pictures (it also keeps
    GIF frames distinct: the GIF writer drops a frame identical to the one before).
    """
    width = picture.shape[1]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # (x, line, name, colour) of each item; the caption is an item without a swatch.
    placed, x, line = [], 2, 0
    for name, colour in [(caption, None), *entries]:
        # Digits measured as the widest one, so every frame of a GIF wraps alike and has one size.
        item_width = int(measure.textlength(re.sub(r"\d", "8", name))) + (10 if colour is not None else 0) + 8
        if x > 2 and x + item_width > width:
            x, line = 2, line + 1
        placed.append((x, line, name, colour))
        x += item_width
    strip = Image.new("RGB", (width, LEGEND_HEIGHT * (line + 1)), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for x, line, name, colour in placed:
        top = line * LEGEND_HEIGHT
        if colour is None:
            draw.text((x, top + 1), name, fill=(200, 200, 200))
            continue
        draw.rectangle([x, top + 3, x + 7, top + 10], fill=colour)
        draw.text((x + 10, top + 1), name, fill=(255, 255, 255))
    return np.concatenate([picture, np.asarray(strip)], axis=0)


def overlay_picture(grey: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None,
                    multiclass: bool, label_names: dict[int, str], caption: str) -> np.ndarray:
    """One overlay: binary tasks in red/green on one panel, multi-class tasks as a
    prediction panel (and a truth panel beside it when known) in the fixed colour map,
    each with a legend strip carrying ``caption`` (e.g. the slice number)."""
    if not multiclass:
        entries = [("prediction", PREDICTION_COLOUR)] + ([("truth", TRUTH_COLOUR)] if truth is not None else [])
        return add_legend(enlarged(overlay_binary(grey, predicted, truth)), entries, caption)
    panels = [overlay_labels(grey, predicted)]
    if truth is not None:
        gap = np.full((grey.shape[0], 2, 3), 255, dtype=np.uint8)
        panels += [gap, overlay_labels(grey, truth)]
        caption = f"{caption}  left: prediction, right: truth"
    entries = [(label_names.get(value, str(value)), colour) for value, colour in LABEL_COLOURS.items()
               if value in label_names]
    return add_legend(enlarged(np.concatenate(panels, axis=1)), entries, caption)


def enlarged(picture: np.ndarray) -> np.ndarray:
    """Repeat each pixel so that the picture is at least :data:`MIN_PICTURE_WIDTH` wide."""
    scale = -(-MIN_PICTURE_WIDTH // picture.shape[1])
    return picture.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else picture


def save_png(picture: np.ndarray, path: Path) -> None:
    """Write an RGB array as PNG under a temporary name, then rename it into place."""
    _save_atomically(path, lambda handle: Image.fromarray(picture).save(handle, format="PNG"))


def save_gif(frames: Sequence[np.ndarray], path: Path, frames_per_second: float = 10.0) -> None:
    """Write an animated GIF that loops through ``frames`` (RGB arrays of one size)."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    images = [Image.fromarray(frame) for frame in frames]
    duration_ms = max(int(round(1000 / frames_per_second)), 20)
    _save_atomically(path, lambda handle: images[0].save(handle, format="GIF", save_all=True,
                                                         append_images=images[1:], duration=duration_ms,
                                                         loop=0))


def _save_atomically(path: Path, write) -> None:
    buffer = io.BytesIO()
    write(buffer)
    write_bytes_atomic(path, buffer.getvalue())

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
        axes.axvline(bars.mean, color="red", linewidth=2)
        axes.axvline(bars.median, color="green", linewidth=2)
        axes.set_xlim(0.0, 1.0)
        axes.set_xticks(np.linspace(0.0, 1.0, 11))
        axes.xaxis.grid(color="silver", alpha=0.5, linestyle="--")
        axes.set_xlabel("Dice coefficient")
        # The title doubles as the legend, so no legend box hides a bar.
        axes.set_title(f"{region}: mean {bars.mean:.3f} (red), median {bars.median:.3f} (green)",
                       fontsize="medium")
        drawn[region] = bars
    with atomic_path(path) as temporary:  # a full disk names the picture, not a bare errno
        figure.savefig(temporary, format="png", dpi=100)
    return drawn


# --- training curves (train) -------------------------------------------------


def plot_training_curves(records: list[dict], path: str | Path) -> Path:
    """Write ``curves.png``: loss per step and per epoch (left), validation Dice per epoch (right).

    ``records`` are the lines of a run's metrics.jsonl (``kind`` step or epoch). Written to a
    temporary name and renamed, so a reader never sees half a picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="0.75", lw=0.8,
                       label="train loss (step)")
    if epochs:
        at = [r["step"] for r in epochs]
        loss_axis.plot(at, [r["train_loss"] for r in epochs], "o-", label="train loss (epoch)")
        validated = [r for r in epochs if r.get("val_dice_mean") is not None]  # none with --val-fraction 0
        if validated:
            loss_axis.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "s-", label="val loss")
            numbers = [r["epoch"] for r in validated]
            dice_axis.plot(numbers, [r["val_dice_mean"] for r in validated], "o-", label="mean")
            dice_axis.plot(numbers, [r["val_dice_median"] for r in validated], "s--", label="median")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    dice_axis.set(xlabel="epoch", ylabel="per-volume Dice", title="validation Dice", ylim=(0, 1))
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path

# --- benchmark timeline (benchmark) ------------------------------------------



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
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return path
