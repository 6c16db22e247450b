"""The ``mriseg`` command line: parse arguments, call the library, print.

Every command is a thin wrapper over a function in the library; nothing here
computes anything. Errors the user can fix (:class:`~mriseg.errors.MrisegError`)
become one line on stderr and exit code 2, unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer

from mriseg import __version__
from mriseg.errors import MrisegError
from mriseg.log import console

app = typer.Typer(
    name="mriseg",
    help="Brain MRI tumour segmentation: preprocess, train, predict, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        print(f"mriseg {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Brain MRI tumour segmentation: preprocess, train, predict, evaluate, benchmark."""
    _state["debug"] = debug


def print_json(payload: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


# Commands are added below, one section per command, in data-flow order.

# --- synth -------------------------------------------------------------------

# --- preprocess --------------------------------------------------------------

# --- models ------------------------------------------------------------------

# --- train -------------------------------------------------------------------

# --- predict -----------------------------------------------------------------

# --- evaluate ----------------------------------------------------------------

@app.command("evaluate")
def evaluate_command(
    pred: Path = typer.Argument(..., help="Predicted masks: a file, or a folder of <case_id>.nii.gz, "
                                          "TIF/PNG masks or case folders."),
    truth: Path = typer.Argument(..., metavar="GT", help="True masks, or a labelled dataset folder."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o",
                             help="Folder for metrics.csv, summary.json and dsc.png."),
    regions: str = typer.Option("auto", "--regions",
                                help="auto | binary | labels | brats | msd | NAME=1,2;NAME=4 "
                                     "(auto: BraTS/MSD regions for those datasets, else binary)."),
    empty: str = typer.Option("score", "--empty",
                              help="Empty-mask policy. score: both empty -> Dice 1, distances 0; one empty -> "
                                   "Dice 0, distances undefined. ignore: also leave out cases whose truth is empty."),
    strict: bool = typer.Option(False, "--strict", help="Case ids present on one side only are an error."),
    modalities: Optional[str] = typer.Option(None, "--modalities",
                                             help="BraTS file-name map of the GT dataset, e.g. "
                                                  "flair=Flair_x,t1ce=T1c_x,seg=OTMultiClass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Per-volume Dice, IoU, HD95, ASSD, sensitivity, precision and volumes, with a Dice bar plot."""
    from mriseg.evaluate import evaluate, results_table

    result = evaluate(pred, truth, out, regions=regions, empty=empty, strict=strict, overwrite=overwrite,
                      modalities=modalities)
    console.print(results_table(result))
    console.print(f"wrote {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'dsc.png'}", markup=False)
    if as_json:
        print_json(result.summary)


# --- benchmark ---------------------------------------------------------------

# --- demo --------------------------------------------------------------------


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one line and exit 2.

    Usage errors (unknown option, missing argument) are reported by typer itself
    with exit code 2; errors raised by the library for bad inputs are caught here.
    """
    try:
        app(prog_name="mriseg")
    except MrisegError as error:
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"error: {error}", markup=False, style="red", soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        console.print("interrupted", style="red")
        sys.exit(130)
