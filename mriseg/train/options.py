"""``mriseg train``'s options: one dataclass, checked in one place before any data is read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from torch import nn

from mriseg import options as checks
from mriseg.augment import parse_augment
from mriseg.errors import MrisegError
from mriseg.losses import LOSS_NAMES

TASKS = ("auto", "binary", "multiclass", "regions")

OPTIMIZERS = ("adam", "adamw", "sgd")

SCHEDULES = ("plateau", "step", "cosine", "poly", "constant")

EPOCHS_CAP = 100_000
"""The most epochs a run may ask for; also the cap of a ``--time`` run given no ``--epochs``."""

# Ranges of the numeric options (integer options: low, high; real ones: low, high, open below, open above).
INTEGER_RANGES = (("epochs", 1, 100_000), ("batch_size", 1, 65_536), ("steps_per_epoch", 1, 10_000_000),
                  ("lr_patience", 0, 100_000), ("patience", 0, 100_000), ("workers", 0, 256),
                  ("seed", 0, 2**32 - 1), ("log_every", 1, 10_000_000), ("ignore_index", 0, 255),
                  ("folds", 2, 1000), ("fold", 0, 999), ("context", 0, 16))

REAL_RANGES = {"lr": (0.0, 10.0, True, False), "weight_decay": (0.0, 10.0, False, False),
               "momentum": (0.0, 1.0, False, True), "warmup_epochs": (0.0, 100_000.0, False, False),
               "lr_factor": (0.0, 1.0, True, False), "clip_grad": (0.0, None, True, False),
               "bce_weight": (0.0, 1.0, False, False), "uniform_share": (0.0, 1.0, False, False),
               "foreground_share": (0.0, 1.0, False, False), "val_fraction": (0.0, 1.0, False, True)}

# Options a resumed run may change; everything else comes from the run's config.json.
RESUME_OVERRIDABLE = ("epochs", "patience", "device", "workers", "amp", "channels_last", "compile", "log_every",
                      "time_limit")


@dataclass
class TrainOptions:
    """Every option of ``mriseg train`` (the CLI flags, with ``-`` as ``_``)."""

    model: str = "unet"
    model_options: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 2
    context: int = 0                             # 2.5D: neighbouring slices on each side as extra channels
    task: str = "auto"
    ignore_index: int = 255
    loss: str = "dice-ce"                        # CE (BCE per region for regions) + Dice, as nnU-Net
    bce_weight: float = 0.5
    augment: str = "default"
    epochs: int = 50
    batch_size: int = 16
    steps_per_epoch: int | None = None
    patch_size: tuple[int, ...] | None = None
    uniform_share: float = 0.1
    foreground_share: float = 0.33
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "plateau"
    warmup_epochs: float = 0.0
    lr_patience: int = 3
    lr_factor: float = 0.5
    clip_grad: float | None = None
    patience: int = 10
    val_fraction: float = 0.2
    split: str | None = None
    folds: int | None = None
    fold: int = 0
    device: str = "auto"
    amp: bool | None = None                      # None: the device's default (mriseg.devices.choose_precision)
    channels_last: bool | None = None
    compile: bool = False
    workers: int | None = None
    seed: int = 0
    log_every: int = 10
    time_limit: float | None = None              # seconds (CLI --time 15m); the epochs fit the budget
    size: tuple[int, ...] | None = None
    modalities: str | None = None
    given: list[str] | None = None               # --time runs: the options given; the plan fills the rest

    def check(self) -> None:
        """Reject impossible combinations with one clear line each, before any data is touched."""
        from mriseg.models.registry import MODELS

        if self.model not in MODELS:
            raise MrisegError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        choices = {"task": TASKS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "loss": LOSS_NAMES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MrisegError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.spatial_dims not in (2, 3):
            raise MrisegError(f"--dims must be 2 or 3, got {self.spatial_dims}")
        for name, low, high in INTEGER_RANGES:
            checks.number(name, getattr(self, name), integer=True, low=low, high=high,
                          optional=name in ("steps_per_epoch", "workers", "folds"))
        for name, (low, high, low_open, high_open) in REAL_RANGES.items():
            checks.number(name, getattr(self, name), low=low, high=high, low_open=low_open, high_open=high_open,
                          optional=name == "clip_grad")
        if self.context and self.spatial_dims != 2:
            raise MrisegError(f"--context {self.context} feeds neighbouring slices to a 2D model; --dims is "
                              f"{self.spatial_dims}")
        checks.sizes("patch_size", self.patch_size, count=self.spatial_dims, largest=4096)
        checks.sizes("size", self.size, count=(2, 3), largest=4096)
        if self.folds is not None and not 0 <= self.fold < self.folds:
            raise MrisegError(f"--fold must lie in 0..{self.folds - 1} for --folds {self.folds}, got {self.fold}")
        if self.folds is None and self.fold != 0 and not self.split:
            raise MrisegError(f"--fold {self.fold} needs --folds K (K-fold cross-validation by patient) or a "
                              "--split file with a list of folds (nnU-Net's splits_final.json)")
        if self.val_fraction == 0 and (self.folds or self.split):
            raise MrisegError("--val-fraction 0 (train on every case) cannot be combined with --folds or --split")
        checks.number("time_limit", self.time_limit, low=0.0, low_open=True, optional=True)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise MrisegError("--nesterov needs --optimizer sgd and --momentum above 0")
        if not isinstance(self.model_options, dict):
            raise MrisegError(f"--model-options must be key=value pairs or a JSON object, got {self.model_options!r}")
        if "features" in self.model_options:
            checks.number("features", self.model_options["features"], integer=True, low=1, high=1024)
        parse_augment(self.augment)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Where --model / width / batch / lr are not given, a CPU run of the 2D U-Net starts from this recipe,
# chosen by benchmarks/quality.py (cross-validation on real BraTS cases at CPU budgets, docs/results.md):
# the full-width defaults take 8.5 s a step on one core and learn next to nothing in minutes.
CPU_RECIPE = {"features": 16, "batch_size": 8, "lr": 3e-3}


def fresh_options(model: str | None, settings: dict[str, Any], device_type: str) -> TrainOptions:
    """The options of a new run: ``settings`` over the defaults, the defaults a ``--time`` budget
    and a CPU imply (each only where not given), checked."""
    options = TrainOptions(**settings)
    if model is not None:
        options.model = model
    if options.time_limit is not None and "epochs" not in settings:
        options.epochs = EPOCHS_CAP  # the budget decides; --epochs N still caps it
    if options.time_limit is not None and "schedule" not in settings:
        options.schedule = "poly"    # decays to zero at the planned end, which the budget sets
    if options.time_limit is not None and "patience" not in settings:
        options.patience = 0         # the budget, not a plateau, ends the run (as nnU-Net: no early stop)
    if "spatial_dims" not in settings:
        options.spatial_dims = default_spatial_dims(options.model)
    if options.time_limit is not None:  # the plan (mriseg.train.plan) fills what was not given
        options.given = sorted({*settings, *(["model"] if model is not None else [])})
    elif device_type == "cpu" and options.model == "unet" and options.spatial_dims == 2:
        if "features" not in options.model_options:
            options.model_options = {**options.model_options, "features": CPU_RECIPE["features"]}
        options.batch_size = settings.get("batch_size", CPU_RECIPE["batch_size"])
        options.lr = settings.get("lr", CPU_RECIPE["lr"])
    options.check()
    return options


def default_patch_size(model: nn.Module, volumes: Sequence[Any], spatial_dims: int,
                       largest: int = 128) -> tuple[int, ...] | None:
    """The training window when ``--patch-size`` is not given.

    2D: None (whole slices) when every slice has one size the model accepts; otherwise (a crop-only
    cache at native resolution) the smallest accepted size covering the largest slice (and a
    valid-convolution network's output margin), so every slice is padded to it, as inference pads a
    slice (nnU-Net and MONAI's ``DivisiblePad`` alike).
    3D: the largest patch, at most the median volume and ``largest`` along each axis, that
    ``model`` accepts; size rules hold axis by axis (a multiple of 16; tiny3d's depth 4k - 1). An
    axis shorter than the smallest accepted size takes that size: the volume is padded to it.
    """
    from mriseg.inference.windows import accepted_at_most, accepted_size

    axis_ok = getattr(getattr(model, "size_rule", None), "axis_ok", None)
    margin = int(getattr(model, "output_margin", 0))  # valid convolutions: the input is this much larger
    if spatial_dims == 2:
        shapes = {volume.in_plane_shape for volume in volumes}
        if len(shapes) == 1 and (axis_ok is None or all(axis_ok(a, n) for a, n in enumerate(next(iter(shapes))))):
            return None
        return tuple(accepted_size(max(shape[axis] for shape in shapes) + margin, axis_ok, axis) for axis in range(2))
    median = np.median([volume.label.shape for volume in volumes], axis=0)
    cap = tuple(min(int(size), largest) for size in median)
    if axis_ok is None:
        return cap
    return tuple(accepted_at_most(limit, axis_ok, axis) for axis, limit in enumerate(cap))


def default_spatial_dims(model: str) -> int:
    """2 (slices) for models that have a 2D form, 3 for the 3D-only ones (unet3d, tiny3d)."""
    from mriseg.models.registry import MODELS

    return min(MODELS[model].dims) if model in MODELS else 2
