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
