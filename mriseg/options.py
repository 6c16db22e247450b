"""Checks shared by every command's options dataclass: one clear line per bad value.

Each command validates its options in one place (``TrainOptions.check``, ``PredictOptions.check``,
``PreprocessParams``, ``BenchmarkConfig.check``, ...) with these helpers, before any data is read or
any model is built; the Python API runs the same checks. Messages name the option as the CLI
spells it (``--lr``), so they read the same from a shell and from Python.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mriseg.errors import MrisegError


def flag(name: str) -> str:
    """``warmup_epochs`` -> ``--warmup-epochs``."""
    return "--" + name.replace("_", "-")


def number(name: str, value: Any, *, integer: bool = False, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Check that ``value`` is a finite number (an integer when ``integer``) within the bounds.

    Raises:
        MrisegError: naming the option, the bound and the value given.
    """
    if value is None and optional:
        return
    option = flag(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MrisegError(f"{option} must be a number, got {value!r}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise MrisegError(f"{option} must be a whole number, got {value!r}")
    if not math.isfinite(value):
        raise MrisegError(f"{option} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else _show(low)}, {'inf' if high is None else _show(high)}{right}"
        raise MrisegError(f"{option} must lie in {span}, got {value!r}")


def sizes(name: str, values: Sequence[Any] | None, count: int | Sequence[int] | None = None,
          optional: bool = True, largest: int = 100_000) -> None:
    """Check a list of positive integer sizes (``--size``, ``--patch-size``)."""
    if values is None:
        if optional:
            return
        raise MrisegError(f"{flag(name)} is required")
    option = flag(name)
    values = list(values)
    allowed = (count,) if isinstance(count, int) else tuple(count or ())
    if not values or (allowed and len(values) not in allowed):
        need = " or ".join(str(n) for n in allowed) if allowed else "at least one"
        raise MrisegError(f"{option} needs {need} numbers, got {values}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
            raise MrisegError(f"{option} takes whole numbers from 1 to {largest}, got {values}")


def choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MrisegError(f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}")


def parse_numbers(text: str | None, option: str, count: int | Sequence[int] | None = None) -> tuple[int, ...] | None:
    """``"128,128,64"`` or ``128x128x64`` -> a tuple of ints; every item must be a whole number."""
    if text is None:
        return None
    if str(text).strip() == "":
        raise MrisegError(f"{option} is empty; give whole numbers separated by commas (e.g. 128,128), or leave "
                          "the option out")
    parts = str(text).replace("x", ",").split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise MrisegError(f"{option} takes whole numbers separated by commas (e.g. 128,128), got {text!r}") from None
    sizes(option.lstrip("-").replace("-", "_"), values, count)
    return values


def available_memory() -> int | None:
    """Bytes of memory this process may still take (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(what: str, needed_bytes: float) -> None:
    """Refuse, before allocating, an array that would not fit into the memory available."""
    available = available_memory()
    if available is not None and needed_bytes > available:
        raise MrisegError(f"{what} would need {_gib(needed_bytes)} of memory; {_gib(available)} is available")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
