"""Training to a deadline (``--time 15m``): measure the run's own step time, fit the epochs to the
budget, end every epoch in time to validate and checkpoint before the deadline.

The budget counts from the start of ``train()`` (set-up and preprocessing included) and, on
``--resume``, continues from the seconds the run has already spent (stored in last.pt). All
ranks of a torchrun job stop at the same step: the out-of-time flag travels with the loss in
the step's all-reduce.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from mriseg.errors import MrisegError

if TYPE_CHECKING:  # the session imports this module
    from mriseg.train.session import Session, TrainingState

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str | float | int, option: str = "--time") -> float:
    """``90s``, ``15m``, ``4h``, ``1h30m``, ``3:50:00`` or ``50:00`` (MM:SS, as Slurm) -> seconds
    (positive); a number (not a string) is seconds. A bare number as text is refused: Slurm reads it
    as minutes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        try:
            if ":" in value:
                parts = [float(p) for p in value.split(":")]
                if len(parts) > 3 or any(p < 0 for p in parts):
                    raise ValueError
                seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
            elif re.fullmatch(r"\d+(\.\d+)?", value):  # Slurm reads this as minutes, Python as seconds
                raise MrisegError(f"{option} {text}: give a unit ({value}s, {value}m or {value}h); a bare number "
                                  "is minutes to Slurm and seconds to many tools, so mriseg asks")
            elif re.fullmatch(rf"(?:{_PART.pattern})+", value):
                seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
            else:
                raise ValueError
        except ValueError:
            raise MrisegError(f"{option} takes a duration such as 90s, 15m, 4h, 1h30m or 3:50:00, "
                              f"got {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise MrisegError(f"{option} must be a positive duration, got {text!r}")
    return seconds


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{rest:02d}s" if hours else f"{minutes}m{rest:02d}s"


CALIBRATION_STEPS = 5
"""Steps (after the first, which pays for warm-up) whose time plans the first epochs."""


@dataclass
class Budget:
    """Where the time goes and whether the next piece of work still fits."""

    seconds: float
    started: float                      # time.monotonic() at the start of this process's train()
    spent_before: float = 0.0           # seconds earlier sessions of a resumed run used
    validation_estimate: float = 0.0    # seconds, until a validation has been timed
    spent: dict[str, float] = field(default_factory=lambda: {"steps": 0.0, "validation": 0.0, "checkpoints": 0.0})
    step_times: list[float] = field(default_factory=list)
    validations: list[float] = field(default_factory=list)
    checkpoint_writes: list[float] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.started + self.seconds - self.spent_before

    def used(self, now: float | None = None) -> float:
        return self.spent_before + ((now or time.monotonic()) - self.started)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step_time(self) -> float | None:
        """The median of the steps after the first (warm-up), once there are any."""
        timed = self.step_times[1:] or self.step_times
        return float(np.median(timed)) if timed else None

    def reserve(self) -> float:
        """Seconds to keep for the end of an epoch: validation, last.pt + best.pt, the final plot."""
        recent = max(self.step_times[-10:][1:] or self.step_times[-1:] or [0.0])
        return self.epoch_end_cost() + 2 * max(self.step_time() or 0.0, recent) + 1.0

    def out_of_time(self) -> bool:
        """True when one more step would eat into the time the end of the epoch needs."""
        return self.left() <= self.reserve()

    def epoch_end_cost(self) -> float:
        """Seconds the end of an epoch takes: a validation (with margin) and last.pt + best.pt."""
        validation = max(self.validations) if self.validations else self.validation_estimate
        checkpoint = max(self.checkpoint_writes) if self.checkpoint_writes else 1.0
        return 1.25 * validation + 2 * checkpoint

    def plan(self, steps_done_in_epoch: int, steps_per_epoch: int) -> tuple[int, int]:
        """``(epochs, steps)`` the remaining time holds from here, at the measured speeds: the running
        (or next) epoch, whole epochs, then a last partial epoch with what is left, each ending with a
        validation and checkpoints. Nothing is rounded away: the last epoch takes whatever time is
        left (at 5 minutes, rounding to whole epochs left a quarter of the budget unused)."""
        step = self.step_time()
        if step is None:
            return 1, steps_per_epoch - steps_done_in_epoch
        end, left = self.epoch_end_cost(), self.left() - 1.0
        epochs = steps = 0
        remaining = steps_per_epoch - steps_done_in_epoch
        while remaining and left - end >= step:
            fit = min(remaining, int((left - end) / step))
            epochs, steps, left = epochs + 1, steps + fit, left - fit * step - end
            remaining = steps_per_epoch
        return epochs, steps


    def account(self) -> str:
        """One line for the log: how the budget was spent."""
        used = self.used()
        other = used - self.spent_before - sum(self.spent.values())
        parts = [f"{len(self.step_times)} steps {format_seconds(self.spent['steps'])}",
                 f"{len(self.validations)} validations {format_seconds(self.spent['validation'])}",
                 f"checkpoints {format_seconds(self.spent['checkpoints'])}",
                 f"set-up and the rest {format_seconds(other)}"]
        if self.spent_before:
            parts.insert(0, f"earlier sessions {format_seconds(self.spent_before)}")
        margin = self.seconds - used
        end = f"{format_seconds(margin)} before the deadline" if margin >= 0 else \
            f"{format_seconds(-margin)} AFTER the deadline"
        return f"time budget {format_seconds(self.seconds)}: {', '.join(parts)}; ended {end}"


def validation_estimate(volume_shapes: list[tuple[int, ...]], slices: list[int], spatial_dims: int,
                        batch_size: int, patch_size: tuple[int, ...] | None, step_time: float) -> float:
    """Seconds one validation may take, before one has been timed: a forward pass per batch of
    slices (2D) or windows (3D), counted at half a training step (a forward is about a third)."""
    from mriseg.inference.windows import window_starts

    if spatial_dims == 2:
        batches = sum(math.ceil(n / batch_size) for n in slices)
    else:
        batches = 0
        for shape in volume_shapes:
            patch = patch_size or shape
            windows = math.prod(len(window_starts(size, min(p, size), 0.5)) for size, p in zip(shape, patch))
            batches += math.ceil(windows / batch_size)
    return 0.5 * step_time * batches


def budget_for_run(seconds: float | None, started: float, checkpoint: dict | None) -> Budget | None:
    """The run's budget (None without ``--time``); a resumed run continues from the time it spent."""
    if seconds is None:
        return None
    spent = float((checkpoint or {}).get("time_spent") or 0.0)
    if spent >= seconds:
        raise MrisegError(f"the run has already used {format_seconds(spent)} of its --time "
                          f"{format_seconds(seconds)}; pass a larger --time to train further")
    return Budget(seconds=seconds, started=started, spent_before=spent)


def note_step(session: Session, state: TrainingState, epoch: int, step_time: float) -> None:
    """Count a step against the budget; after the calibration steps, plan the epochs that fit."""
    budget = session.budget
    budget.step_times.append(step_time)
    budget.spent["steps"] += step_time
    if len(budget.step_times) == CALIBRATION_STEPS + 1:
        volumes = session.val_volumes
        budget.validation_estimate = validation_estimate(
            [tuple(v.image.shape[1:]) for v in volumes], [v.slices for v in volumes], session.options.spatial_dims,
            session.options.batch_size, session.options.patch_size, budget.step_time())
        plan_epochs(session, state, epoch, running=True)


def plan_epochs(session: Session, state: TrainingState, epochs_done: int, running: bool = False) -> int:
    """Fit the epochs to the time left (the same number on every rank; the last one may be partial,
    the out-of-time check cuts it short) and run the lr schedule to the last step that fits."""
    options, budget = session.options, session.budget
    done_in_epoch = min(max(state.global_step - epochs_done * options.steps_per_epoch, 0),
                        options.steps_per_epoch) if running else 0
    epochs, steps = budget.plan(done_in_epoch, options.steps_per_epoch)
    planned = torch.tensor([min(options.epochs, epochs_done + epochs), state.global_step + steps])
    if session.world_size > 1:  # ranks time themselves; all follow the most cautious plan
        planned = planned.to(session.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(planned, op=dist.ReduceOp.MIN)
    epochs, total_steps = int(planned[0].item()), int(planned[1].item())
    epochs = max(epochs, epochs_done + 1) if running else epochs
    if epochs > epochs_done and epochs != session.planned_epochs and session.is_writer:
        session.run.say(f"time budget: {format_seconds(budget.left())} left at {budget.step_time() * 1000:.0f} "
                        f"ms/step; planning {epochs} epochs ({total_steps} steps) in all")
    session.planned_epochs = max(epochs, epochs_done)
    session.schedule.total_steps = min(total_steps, session.planned_epochs * options.steps_per_epoch)
    return epochs
