"""``mriseg demo``: the whole job on synthetic data (:func:`mriseg.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mriseg.cli.common import app, examples, print_json


@app.command(epilog=examples("mriseg demo", "mriseg demo --layout brats --out brats-demo --json"))
def demo(
    out: Path = typer.Option(Path("mriseg-demo"), "--out", "-o", help="Folder for everything the demo writes."),
    layout: str = typer.Option("lgg", "--layout", help="lgg (kaggle_3m TIF slices, tumour vs background) | "
                                                       "brats (NIfTI, four modalities, WT/TC/ET regions)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data and of training."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print what the demo measured as JSON on stdout."),
) -> None:
    """Run the whole job on synthetic data in a few minutes: synth, preprocess, train, predict, evaluate."""
    from mriseg.demo import run_demo
    from mriseg.log import info

    result = run_demo(out, layout=layout, overwrite=overwrite, seed=seed, device=device)
    if as_json:
        print_json(result.to_dict())
        return
    scores = ", ".join(f"{region} {dice:.3f}" for region, dice in result.test_dice.items())
    info(f"demo done in {result.seconds['total']:.0f} s: best mean per-volume validation Dice "
         f"{result.val_dice:.3f}; held-out cases: mean Dice {scores}")
    info("open these:")
    for what, path in result.files.items():
        info(f"  {path}  ({what})")
    info(f"segment your own scans: mriseg predict SCAN --model {out / 'run'}")
