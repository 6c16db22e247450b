"""``mriseg evaluate``: parse the options, call :mod:`mriseg.evaluate`, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mriseg.cli.common import app, examples, print_json
from mriseg.errors import MrisegError
from mriseg.log import console


@app.command("evaluate", epilog=examples(
    "mriseg evaluate predictions/ labels/ --out evaluation/",
    "mriseg evaluate predictions/ BraTS2021_Validation/ --regions brats --json > summary.json",
    "mriseg evaluate --model runs/latest data/ --out evaluation/"))
def evaluate_command(
    paths: list[Path] = typer.Argument(..., metavar="PRED GT | DATA",
                                       help="Predicted masks and the truth (files or folders, matched by case "
                                            "id; GT may be a labelled dataset); with --model, one labelled DATA."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o",
                             help="Folder for metrics.csv, summary.json and dsc.png.", rich_help_panel="Output"),
    model: Optional[list[Path]] = typer.Option(None, "--model", metavar="RUN",
                                               help="Run folder or checkpoint: predict DATA in memory and score "
                                                    "it. Repeat it, or give a folder of folds (train --folds), "
                                                    "for an ensemble that averages the probabilities.",
                                               rich_help_panel="With --model"),
    regions: str = typer.Option("auto", "--regions",
                                help="auto | binary | labels | brats | brats2023 | msd | NAME=1,2;NAME=4 "
                                     "(auto: the dataset's or the checkpoint's regions, else binary).",
                                rich_help_panel="Scoring"),
    empty: str = typer.Option("score", "--empty",
                              help="Empty-mask policy. score: both empty -> Dice 1, distances 0; one empty -> "
                                   "Dice 0, distances the image diagonal (BraTS: 373.13 mm). ignore: also leave "
                                   "out cases whose truth is empty. nan: nnU-Net's mean (both-empty cases "
                                   "left out, one empty scores 0).",
                              rich_help_panel="Scoring"),
    strict: bool = typer.Option(False, "--strict", help="Case ids present on one side only are an error.",
                                rich_help_panel="Scoring"),
    modalities: Optional[str] = typer.Option(None, "--modalities",
                                             help="BraTS file-name map of the GT dataset, e.g. "
                                                  "flair=Flair_x,t1ce=T1c_x,seg=OTMultiClass.",
                                             rich_help_panel="Scoring"),
    device: str = typer.Option("auto", "--device", help="With --model: cpu, cuda, cuda:1 or auto.",
                               rich_help_panel="With --model"),
    batch_size: int = typer.Option(8, "--batch-size", help="With --model: slices or patches per batch.",
                                   rich_help_panel="With --model"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta",
                                       help="With --model: average predictions over flips (default: on for "
                                            "2D models, off for 3D).",
                                       rich_help_panel="With --model"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp",
                                       help="With --model: mixed precision (default: as predict's).",
                                       rich_help_panel="With --model"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="With --model: channels-last memory format (default: as "
                                                      "predict's).", rich_help_panel="With --model"),
    largest_component: Optional[bool] = typer.Option(
        None, "--largest-component/--no-largest-component",
        help="With --model: keep only the largest tumour blob. (default: the folds' cross-validated choice)",
        rich_help_panel="With --model"),
    interpolation: str = typer.Option("linear", "--interpolation",
                                      help="With --model: back to the source grid, linear or nearest.",
                                      rich_help_panel="With --model"),
    workers: int = typer.Option(1, "--workers", help="Cases read and scored at once (PRED GT mode).",
                                rich_help_panel="Scoring"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --out.",
                                   rich_help_panel="Output"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout.",
                                 rich_help_panel="Output"),
) -> None:
    """Per-volume Dice, IoU, HD95, ASSD, sensitivity, precision and volumes, with a Dice bar plot."""
    from mriseg.evaluate import evaluate, evaluate_model, results_table

    with_model = {"--device": device != "auto", "--batch-size": batch_size != 8, "--tta/--no-tta": tta is not None,
                  "--amp/--no-amp": amp is not None, "--channels-last": channels_last is not None,
                  "--largest-component": largest_component is not None, "--interpolation": interpolation != "linear"}
    without_model = {"--strict": strict, "--workers": workers != 1}
    unused = [name for name, given in (without_model if model else with_model).items() if given]
    if unused:  # each would be accepted and do nothing
        raise MrisegError(f"{', '.join(unused)}: " + ("not used with --model (they score PRED GT folders)" if model
                          else "used only with --model (they predict); PRED GT masks are scored as they are"))
    if model:
        if len(paths) != 1:
            raise MrisegError(f"with --model give one labelled DATA folder, got {len(paths)} paths")
        result = evaluate_model(model if len(model) > 1 else model[0], paths[0], out, regions=regions, empty=empty,
                                overwrite=overwrite,
                                modalities=modalities, device=device, batch_size=batch_size, tta=tta,
                                largest_component=largest_component, interpolation=interpolation,
                                amp=amp, channels_last=channels_last)
    else:
        if len(paths) != 2:
            raise MrisegError(f"give PRED and GT (two paths), or --model RUN_DIR DATA; got {len(paths)} path(s)")
        result = evaluate(paths[0], paths[1], out, regions=regions, empty=empty, strict=strict,
                          overwrite=overwrite, modalities=modalities, workers=workers)
    console.print(results_table(result))
    console.print(f"wrote {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'dsc.png'}", markup=False)
    if as_json:
        print_json(result.summary)
