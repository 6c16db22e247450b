"""The Typer app, its global options and the entry point (:func:`main`) shared by every command."""

from __future__ import annotations

import errno
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
    rich_markup_mode="rich",
    epilog="Start with `mriseg demo` (a few minutes on a laptop CPU); `mriseg COMMAND --help` shows each command.",
)

_state: dict[str, Any] = {"debug": False}


def examples(*commands: str) -> str:
    """A help epilog listing example command lines (blank lines keep rich from joining them)."""
    return "Examples:\n\n" + "\n\n".join(f"  {command}" for command in commands)



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


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
    except OSError as error:
        # A full disk, a read-only or forbidden folder, wherever it is met: the user's to fix.
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"error: {error.filename or 'output'}: {error.strerror}", markup=False, style="red",
                      soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        console.print("interrupted", style="red")
        sys.exit(130)
