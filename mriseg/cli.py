"""The ``mriseg`` command line: parse arguments, call the library, print.

Every command is a thin wrapper over a function in the library; nothing here
computes anything. Errors the user can fix (:class:`~mriseg.errors.MrisegError`)
become one line on stderr and exit code 2, unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import sys
import traceback
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


@app.command("models")
def models_command(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout."),
) -> None:
    """List the networks: name, dims, parameters at the default width, reference, notes."""
    from mriseg.models import describe_models

    entries = describe_models()
    if as_json:
        print_json(entries)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mriseg models (parameters at the default width)")
    for column in ("name", "dims", "parameters", "for (in, out)", "options", "reference", "notes"):
        table.add_column(column, justify="right" if column == "parameters" else "left", overflow="fold")
    for entry in entries:
        shape = entry["parameters_for"]
        table.add_row(entry["name"], ", ".join(f"{d}D" for d in entry["dims"]), f"{entry['parameters']:,}",
                      f"{shape['in_channels']}, {shape['out_channels']} ({shape['spatial_dims']}D)",
                      ", ".join(entry["options"]) or "-", entry["reference"], entry["notes"])
    Console().print(table)

# --- train -------------------------------------------------------------------

# --- predict -----------------------------------------------------------------

# --- evaluate ----------------------------------------------------------------

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
