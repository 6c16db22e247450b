"""The learning-rate schedule, the optimiser and the precision of a training run."""

from __future__ import annotations

import math

import torch

from mriseg.devices import Precision, choose_precision
from mriseg.train.options import TrainOptions


class LearningRate:
    """``lr(step) = base * warm-up(step) * decay(step) * plateau factor``; state is plain numbers.

    ``plateau`` multiplies by ``factor`` when the validation score has not improved for
    ``patience`` epochs; ``step`` by 0.1 at 1/3 and 2/3 of training; ``cosine`` and ``poly``
    (``(1 - t)^0.9``, nnU-Net) decay to zero over all steps.
    """

    def __init__(self, base: float, kind: str, total_steps: int, warmup_steps: int, patience: int, factor: float):
        self.base, self.kind, self.total_steps, self.warmup_steps = base, kind, total_steps, warmup_steps
        self.patience, self.factor = patience, factor
        self.scale, self.best, self.bad_epochs = 1.0, -math.inf, 0

    def at(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        progress = min(1.0, step / max(1, self.total_steps))
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "poly": (1 - progress) ** 0.9,
                 "step": 0.1 ** int(progress * 3)}.get(self.kind, 1.0)
        return self.base * warmup * decay * self.scale

    def end_epoch(self, score: float) -> None:
        if self.kind != "plateau":
            return
        if score > self.best:
            self.best, self.bad_epochs = score, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.best, self.bad_epochs = state["scale"], state["best"], int(state["bad_epochs"])


def build_optimizer(parameters, options: TrainOptions) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=options.lr, momentum=options.momentum, nesterov=options.nesterov,
                               weight_decay=options.weight_decay)
    optimizer_class = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(parameters, lr=options.lr, weight_decay=options.weight_decay)


def precision(options: TrainOptions, device: torch.device) -> tuple[Precision, torch.autocast,
                                                                   torch.amp.GradScaler]:
    """The run's precision (:func:`mriseg.devices.choose_precision`: bfloat16 and channels-last by
    default on CPUs with native bfloat16), its autocast context, and a grad scaler for float16."""
    chosen = choose_precision(device, options.amp, options.channels_last)
    autocast = torch.autocast(device.type, dtype=chosen.dtype or torch.float32, enabled=chosen.dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=chosen.dtype == torch.float16)
    return chosen, autocast, scaler
