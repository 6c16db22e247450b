"""The ``mriseg`` command line: parse arguments, call the library, print.

Every command is a thin wrapper over a library function; nothing here computes anything. One
module per command group (``data``, ``convert``, ``train``, ``predict``, ``evaluate``, ``benchmark``, ``demo``)
registers its commands on the one Typer app in ``common.py``, in data-flow order. Errors the user can
fix (:class:`~mriseg.errors.MrisegError`) become one line on stderr and exit code 2, unless
``--debug`` is given.
"""

# Importing a module registers its commands; help lists them in this (data-flow) order.
from mriseg.cli import data, convert, train, predict, evaluate, benchmark, demo  # noqa: F401, I001
from mriseg.cli.common import app, main

__all__ = ["app", "main"]
