"""Logging and progress that suit both a terminal and a cluster log file.

Everything human-readable goes to stderr so that stdout stays free for
``--json`` output. On a terminal, progress is a rich bar; otherwise it is one
plain line every ``every`` items (or every few seconds), which reads well in
Slurm logs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import ProgressColumn
from rich.text import Text

T = TypeVar("T")

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """Print one human-readable line on stderr."""
    console.print(message, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print a warning line on stderr."""
    console.print(f"warning: {message}", markup=False, style="yellow", soft_wrap=True)


def is_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None = None, description: str = "",
             every: int = 10, min_seconds: float = 5.0,
             status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress on stderr.

    A rich progress bar on a terminal, with items per second and, after each item, the text
    ``status()`` returns (e.g. the last loss); otherwise a plain ``description i/total``
    line every ``every`` items or ``min_seconds``, whichever comes first, and at the end.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if is_terminal():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total, status="")
            for item in items:
                yield item
                bar.update(task, advance=1, status=status() if status is not None else "")
        return
    done = 0
    last_print = time.monotonic()
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done % every == 0 or now - last_print >= min_seconds or done == total:
            info(f"{description} {done}/{total if total is not None else '?'}")
            last_print = now


class _RateColumn(ProgressColumn):
    """Items per second, as rich estimates it (rich's own speed column counts bytes)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} it/s" if task.speed else "- it/s")
