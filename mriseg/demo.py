"""``mriseg demo``: the whole job on synthetic data, sized for a laptop CPU.

synthetic cases -> ``preprocess`` -> ``train`` a narrow 2D U-Net -> ``predict`` held-out cases with
overlays and GIFs -> ``evaluate`` them with the Dice bar plot. Every step is the library function
the matching command calls, so the demo shows exactly what the commands do. The held-out cases
are generated with the training cases (same seed, later indices) and moved aside before
preprocessing, so the model never sees them.

Output folder (default ``mriseg-demo/``)::

    data/         synthetic training cases in the real on-disk format (kaggle_3m TIFs or BraTS NIfTI)
    test/         held-out synthetic cases, same format
    cache/        the preprocess cache of data/
    run/          the training run (best.pt, curves.png, train.log, metrics.jsonl, ...)
    predictions/  masks of test/, overlays/<case>/*.png, <case>.gif
    evaluation/   metrics.csv, summary.json, dsc.png
    demo.json     what the demo did and measured
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mriseg import log
from mriseg.devices import choose_device
from mriseg.errors import MrisegError
from mriseg.options import number

DEFAULT_OUT = Path("mriseg-demo")

# What the demo makes; --overwrite removes exactly these and nothing else in OUT.
OUTPUT_NAMES = ("data", "test", "cache", "run", "predictions", "evaluation", "demo.json")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and settings of one layout's demo (measured to finish in a few minutes on 2 CPU cores)."""

    cases: int                  # synthetic cases generated; the last ``held_out`` become test/
    held_out: int
    size: tuple[int, int, int]  # write_synthetic's size: lgg (slices, H, W), brats (X, Y, Z)
    train: dict[str, Any]       # mriseg.train.train settings
    regions: str                # mriseg evaluate's --regions


PLANS = {
    # 12 training patients (two of them tumour-free, as NO_TUMOUR_EVERY makes cases 5 and 11),
    # 4 held-out patients, 16 slices of 128x128 each.
    "lgg": DemoPlan(cases=16, held_out=4, size=(16, 128, 128), regions="binary", train={
        "model": "unet", "model_options": {"features": 8}, "loss": "dice", "lr": 3e-3, "batch_size": 8,
        "epochs": 12, "steps_per_epoch": 25, "patience": 0, "seed": 0}),
    # 8 training cases, 2 held out, 64x64x48 voxels, four modalities; WT/TC/ET as three sigmoid channels.
    "brats": DemoPlan(cases=10, held_out=2, size=(64, 64, 48), regions="brats", train={
        "model": "unet", "model_options": {"features": 8}, "loss": "bce-dice", "lr": 3e-3, "batch_size": 8,
        "epochs": 16, "steps_per_epoch": 25, "patience": 0, "seed": 0}),
}


@dataclass
class DemoResult:
    """What the demo measured and where it put things."""

    out: Path
    layout: str
    val_dice: float          # best mean per-volume validation Dice during training
    test_dice: dict[str, float]  # mean per-volume Dice of the held-out cases, per region
    seconds: dict[str, float]    # wall time of each step
    files: dict[str, str]        # the files a person should open, by what they show

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "layout": self.layout, "val_dice": self.val_dice,
                "test_dice": self.test_dice, "seconds": self.seconds, "files": self.files}


def prepare_demo_folder(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse one that holds an earlier demo unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise MrisegError(f"{out}: exists and is not a folder")
    found = [name for name in OUTPUT_NAMES if (out / name).exists()]
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES) if out.is_dir() else []
    if others and not found:  # a folder of the user's (a dataset, a home folder), not an earlier demo's
        raise MrisegError(f"{out}: holds files that are not a demo's ({', '.join(others[:3])}"
                          f"{' ...' if len(others) > 3 else ''}); choose an empty or new folder with --out")
    if found and not overwrite:
        raise MrisegError(f"{out}: holds an earlier demo ({', '.join(found)}); pass --overwrite to replace it "
                          "or --out to choose another folder")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise MrisegError(f"{out}: cannot write the demo here ({error.strerror or error})") from error


def write_demo_data(out: Path, layout: str, plan: DemoPlan, seed: int) -> tuple[Path, Path]:
    """Synthetic cases in ``out/data``, the last ``plan.held_out`` of them moved to ``out/test``."""
    from mriseg.data.synthetic import write_synthetic

    data, test = out / "data", out / "test"
    folders = write_synthetic(data, layout=layout, cases=plan.cases, seed=seed, size=plan.size)
    test.mkdir()
    for folder in folders[-plan.held_out:]:
        os.replace(folder, test / folder.name)
    return data, test


def _pick_overlay(overlays: Path) -> str | None:
    """The overlay PNG of the slice with the most drawn outline pixels (the tumour's middle)."""
    import numpy as np
    from PIL import Image

    best, best_count = None, -1
    for png in sorted(overlays.rglob("*.png")):
        picture = np.asarray(Image.open(png).convert("RGB")).astype(int)
        coloured = int((np.abs(picture[..., 0] - picture[..., 1]) > 100).sum())
        if coloured > best_count:
            best, best_count = png, coloured
    return str(best) if best is not None else None


def files_to_open(out: Path, plan: "DemoPlan") -> dict[str, str]:
    """What a person should look at after the demo, by what it shows."""
    predictions = out / "predictions"
    gifs = sorted(predictions.glob("*.gif"))
    files = {
        ("overlay (prediction red, truth green)" if plan.regions == "binary" else
         "overlay (prediction left, truth right, a colour per label)"): _pick_overlay(predictions / "overlays"),
        "GIF through one volume": str(gifs[0]) if gifs else None,
        "Dice bar plot of the held-out cases": str(out / "evaluation" / "dsc.png"),
        "per-case metrics": str(out / "evaluation" / "metrics.csv"),
        "training curves": str(out / "run" / "curves.png"),
        "training log": str(out / "run" / "train.log"),
        "the trained model (mriseg predict --model)": str(out / "run"),
    }
    return {k: v for k, v in files.items() if v is not None}


def run_demo(out: str | Path = DEFAULT_OUT, layout: str = "lgg", overwrite: bool = False, seed: int = 0,
             device: str = "auto") -> DemoResult:
    """Synthetic data -> preprocess -> train -> predict with overlays and GIFs -> evaluate.

    Returns the measured Dice scores and the files to look at; ``out/demo.json`` holds the same.

    Raises:
        MrisegError: unknown layout, or ``out`` holds an earlier demo and ``overwrite`` is False.
    """
    from mriseg.data.cache import build_cache
    from mriseg.files import write_json_atomic
    from mriseg.data.preprocess import PreprocessParams
    from mriseg.evaluate import evaluate
    from mriseg.predict import PredictOptions, predict
    from mriseg.train import train

    if layout not in PLANS:
        raise MrisegError(f"--layout must be one of {', '.join(PLANS)}, got {layout!r}")
    plan, out = PLANS[layout], Path(out)
    number("seed", seed, integer=True, low=0, high=2**32 - 1)
    choose_device(device)  # an unusable --device fails here, not at step 3 of 5
    prepare_demo_folder(out, overwrite)
    seconds: dict[str, float] = {}
    started = time.monotonic()

    @contextmanager
    def step(number: int, name: str, what: str) -> Iterator[None]:
        log.info(f"[{number}/5] {name}: {what} ({time.monotonic() - started:.0f} s so far)")
        clock = time.monotonic()
        yield
        seconds[name] = time.monotonic() - clock

    with step(1, "synth", f"{plan.cases} synthetic {layout} cases, {plan.held_out} held out for testing"):
        data, test = write_demo_data(out, layout, plan, seed)
    with step(2, "preprocess", f"{data} -> {out / 'cache'}"):
        build_cache(data, out / "cache", PreprocessParams(norm="zscore", dtype="float16"), layout=layout)

    settings = {**plan.train, "seed": seed, "device": device}
    with step(3, "train", f"a {settings['model']} of width {settings['model_options']['features']}, "
                          f"{settings['epochs']} epochs of {settings['steps_per_epoch']} steps"):
        summary = train(out / "cache", out=out / "run", **settings)
    predictions = out / "predictions"
    with step(4, "predict", f"{test} with the best checkpoint, overlays and GIFs"):
        results = predict([str(test)], model=out / "run", options=PredictOptions(
            out=predictions, overlay=True, gif=True, gif_fps=4.0, device=device))
    failed = [result for result in results if result.status != "ok"]
    if failed:
        raise MrisegError(f"demo: predicting {failed[0].input} failed: {failed[0].error}")
    with step(5, "evaluate", f"{predictions} against {test}"):
        evaluation = evaluate(predictions, test, out / "evaluation", regions=plan.regions, strict=True)
    seconds["total"] = time.monotonic() - started

    result = DemoResult(out=out, layout=layout, val_dice=float(summary["best_val_dice_mean"]),
                        test_dice={region: stats["metrics"]["dice"]["mean"]
                                   for region, stats in evaluation.summary["regions"].items()},
                        seconds={k: round(v, 1) for k, v in seconds.items()},
                        files=files_to_open(out, plan))
    write_json_atomic(out / "demo.json", result.to_dict())
    return result
