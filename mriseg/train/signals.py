"""Stopping cleanly: Ctrl-C and SIGTERM become a request the loop answers at the next step."""

from __future__ import annotations

import signal
import time
from typing import Any


class StopRequested:
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints at the next step and exits.

    A second Ctrl-C more than :attr:`REPEAT_GRACE` seconds after the first interrupts at once.
    Repeated SIGTERMs, and a SIGINT that follows the first within the grace time, are the same
    request delivered twice (a job scheduler signals every process and torchrun forwards the
    signal again), so they must not abandon the checkpoint.
    """

    REPEAT_GRACE = 1.0

    def __init__(self):
        self.requested = False
        self.first_at = 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        def handler(signum, frame):
            now = time.monotonic()
            if not self.requested:
                self.requested, self.first_at = True, now
            elif signum == signal.SIGINT and now - self.first_at > self.REPEAT_GRACE:
                raise KeyboardInterrupt
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
