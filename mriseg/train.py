"""``mriseg train``: train a segmentation network on a preprocess cache.

The file reads top to bottom like the loop it implements:

1. options (:class:`TrainOptions`) and the task (binary, multi-class softmax, BraTS regions);
2. data: the cache, a split by patient, and a dataset whose sample ``i`` of epoch ``e`` is drawn
   from a generator seeded by ``(seed, e, i)``, so runs, workers, ranks and resumes agree;
3. the learning-rate schedule (warm-up, then plateau / step / cosine / poly);
4. validation: every case's volume is predicted whole and scored by per-volume Dice;
5. the run folder: config.json, metrics.jsonl, train.log, last.pt / best.pt, curves.png;
6. :func:`train`: set up, then ``for epoch: for step: forward, loss, backward, step``.

Under ``torchrun`` the same code trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mriseg import __version__, log
from mriseg import options as checks
from mriseg.augment import augment_batch, parse_augment
from mriseg.checkpoint import load_checkpoint, save_checkpoint
from mriseg.devices import choose_device
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import refuse_output_over_inputs, write_json_atomic
from mriseg.inference import InferenceSettings, predict_logits
from mriseg.inference.windows import PAD_VALUE
from mriseg.labels import IGNORED, Task, task_for_labels
from mriseg.losses import LOSS_NAMES, border_weight_map, build_loss, deep_supervision_loss
from mriseg.metrics import dice

TASKS = ("auto", "binary", "multiclass", "regions")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "step", "cosine", "poly", "constant")
# Ranges of the numeric options (integer options: low, high; real ones: low, high, open below, open above).
INTEGER_RANGES = (("epochs", 1, 100_000), ("batch_size", 1, 65_536), ("steps_per_epoch", 1, 10_000_000),
                  ("lr_patience", 0, 100_000), ("patience", 0, 100_000), ("workers", 0, 256),
                  ("seed", 0, 2**32 - 1), ("log_every", 1, 10_000_000), ("ignore_index", 0, 255),
                  ("folds", 2, 1000), ("fold", 0, 999))
REAL_RANGES = {"lr": (0.0, 10.0, True, False), "weight_decay": (0.0, 10.0, False, False),
               "momentum": (0.0, 1.0, False, True), "warmup_epochs": (0.0, 100_000.0, False, False),
               "lr_factor": (0.0, 1.0, True, False), "clip_grad": (0.0, None, True, False),
               "bce_weight": (0.0, 1.0, False, False), "uniform_share": (0.0, 1.0, False, False),
               "foreground_share": (0.0, 1.0, False, False), "val_fraction": (0.0, 1.0, True, True)}
# Options a resumed run may change; everything else comes from the run's config.json.
RESUME_OVERRIDABLE = ("epochs", "patience", "device", "workers", "amp", "compile", "log_every")


# --- 1. options and task -------------------------------------------------------

@dataclass
class TrainOptions:
    """Every option of ``mriseg train`` (the CLI flags, with ``-`` as ``_``)."""

    model: str = "unet"
    model_options: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 2
    task: str = "auto"
    ignore_index: int = 255
    loss: str = "dice"
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
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None
    seed: int = 0
    log_every: int = 10
    size: tuple[int, ...] | None = None
    modalities: str | None = None

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
        checks.sizes("patch_size", self.patch_size, count=self.spatial_dims, largest=4096)
        checks.sizes("size", self.size, count=(2, 3), largest=4096)
        if self.folds is not None and not 0 <= self.fold < self.folds:
            raise MrisegError(f"--fold must lie in 0..{self.folds - 1} for --folds {self.folds}, got {self.fold}")
        if self.folds is None and self.fold != 0:
            raise MrisegError(f"--fold {self.fold} needs --folds K (K-fold cross-validation by patient)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise MrisegError("--nesterov needs --optimizer sgd and --momentum above 0")
        if not isinstance(self.model_options, dict):
            raise MrisegError(f"--model-options must be key=value pairs or a JSON object, got {self.model_options!r}")
        if "features" in self.model_options:
            checks.number("features", self.model_options["features"], integer=True, low=1, high=1024)
        parse_augment(self.augment)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_task(label_info: dict[str, Any], requested: str, ignore_index: int, source: Path,
                 label_map: dict[int, int] | None = None) -> Task:
    """The task the checkpoint stores (see :func:`mriseg.labels.task_for_labels`); the ignore label
    counts only when the cache holds it."""
    values = [int(v) for v in label_info.get("values", [])]
    ignore = ignore_index if ignore_index in values else None
    try:
        return task_for_labels(label_info, requested, ignore, label_map)
    except MrisegError as error:
        raise BadInputError(source, str(error)) from None


# --- 2. data -------------------------------------------------------------------

@dataclass
class Volume:
    """One cached case as the sampler sees it; arrays stay memory-mapped until used."""

    case_id: str
    image: np.ndarray            # (C, *S)
    label: np.ndarray            # (*S) uint8
    slice_axis: int              # spatial axis 2D models slice along
    slice_weights: np.ndarray | None = None      # 2D: probability of each slice
    foreground: np.ndarray | None = None         # 3D: (K, 3) sample of foreground voxel indices
    border_weights: np.ndarray | None = None     # border-ce: U-Net weight map, same shape as label

    @property
    def slices(self) -> int:
        return self.label.shape[self.slice_axis]


def load_volumes(cache: Any, case_ids: list[str], spatial_dims: int, uniform_share: float,
                 border_weights: bool, ignore_index: int) -> list[Volume]:
    """Open the cases, precompute 2D slice weights / 3D foreground samples and, for
    ``border-ce``, the U-Net weight maps (computed once here, per slice for 2D)."""
    volumes = []
    for case_id in case_ids:
        image, label = cache.image(case_id), cache.label(case_id)
        record = cache.record(case_id)
        slice_axis = record.get("slice_axis")
        if image.ndim == 3:  # one 2D image: a volume of one slice
            image, label, slice_axis = image[:, None], label[None], 0
        volume = Volume(case_id, image, label, slice_axis if slice_axis is not None else 0)
        if spatial_dims == 2:
            other_axes = tuple(a for a in range(label.ndim) if a != volume.slice_axis)
            area = (np.asarray(label) > 0).sum(axis=other_axes).astype(np.float64)
            uniform = np.full(len(area), 1 / len(area))
            # the reference LGG program: tumour-area weighting plus a uniform share
            volume.slice_weights = uniform if area.sum() == 0 else (1 - uniform_share) * area / area.sum() + \
                uniform_share * uniform
        else:
            coordinates = np.argwhere(np.asarray(label) > 0)
            keep = np.random.default_rng(0).permutation(len(coordinates))[:20000]
            volume.foreground = coordinates[np.sort(keep)]
        if border_weights:
            label_array = np.asarray(label)
            if spatial_dims == 2:
                maps = [border_weight_map(np.take(label_array, index, axis=volume.slice_axis),
                                          ignore_index=ignore_index) for index in range(volume.slices)]
                volume.border_weights = np.stack(maps, axis=volume.slice_axis).astype(np.float16)
            else:
                volume.border_weights = border_weight_map(label_array, ignore_index=ignore_index).astype(np.float16)
        volumes.append(volume)
    return volumes


class TrainingSamples(Dataset):
    """Sample ``i`` of epoch ``e``: a random slice (2D) or patch (3D) drawn with ``rng(seed, e, i)``.

    2D: a patient uniformly, then a slice with the volume's tumour-area weights.
    3D: a patient uniformly, then a ``patch_size`` patch centred on a tumour voxel with probability
    ``foreground_share``, anywhere otherwise (volumes smaller than the patch are padded).
    Returns ``(image (C, *P) float32, label (*P) int64, weights (*P) float32 or empty)``.
    """

    def __init__(self, volumes: list[Volume], spatial_dims: int, patch_size: tuple[int, ...] | None,
                 foreground_share: float, seed: int):
        self.volumes = volumes
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.foreground_share = foreground_share
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sys.maxsize  # indices come from StepBatches

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        volume = self.volumes[rng.integers(len(self.volumes))]
        if self.spatial_dims == 2:
            position = int(rng.choice(volume.slices, p=volume.slice_weights))
            image = np.take(volume.image, position, axis=volume.slice_axis + 1)
            label = np.take(volume.label, position, axis=volume.slice_axis)
            weights = (np.take(volume.border_weights, position, axis=volume.slice_axis)
                       if volume.border_weights is not None else None)
        else:
            image, label, weights = self._patch(volume, rng)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)) if weights is not None
                else torch.zeros(0))

    def _patch(self, volume: Volume, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        shape = np.array(volume.label.shape)
        patch = np.array(self.patch_size)
        if len(volume.foreground) and rng.random() < self.foreground_share:
            centre = volume.foreground[rng.integers(len(volume.foreground))]
            start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
        else:
            start = np.array([rng.integers(max(size - p, 0) + 1) for size, p in zip(shape, patch)])
        region = tuple(slice(int(s), int(s + p)) for s, p in zip(start, patch))
        image = np.asarray(volume.image[(slice(None), *region)], dtype=np.float32)
        label = np.asarray(volume.label[region])
        weights = np.asarray(volume.border_weights[region]) if volume.border_weights is not None else None
        missing = patch - np.array(label.shape)
        if missing.any():  # volume smaller than the patch: pad with the normalised background, as inference does
            pad = [(0, int(m)) for m in missing]
            image = np.pad(image, [(0, 0), *pad], constant_values=PAD_VALUE)
            label = np.pad(label, pad)
            weights = np.pad(weights, pad, constant_values=1) if weights is not None else None
        return image, label, weights


class StepBatches(Sampler[list[int]]):
    """The distributed batch sampler: step ``t`` of rank ``r`` gets sample indices
    ``[(t * world + r) * batch, ... + batch)``, from ``first_step`` on (for mid-epoch resume)."""

    def __init__(self, steps: int, batch_size: int, rank: int, world_size: int, first_step: int = 0):
        self.steps, self.batch_size, self.rank, self.world_size = steps, batch_size, rank, world_size
        self.first_step = first_step

    def __len__(self) -> int:
        return self.steps - self.first_step

    def __iter__(self):
        for step in range(self.first_step, self.steps):
            start = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(start, start + self.batch_size))


def split_cases(case_ids: list[str], options: TrainOptions) -> tuple[list[str], list[str]]:
    """Train / validation case ids, split by patient: ``--split``, ``--folds/--fold`` or ``--val-fraction``."""
    if options.split:
        path = Path(options.split)
        try:
            split = json.loads(path.read_text())
            train_ids, val_ids = list(split["train"]), list(split["val"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadInputError(path, f"not a split file with 'train' and 'val' lists of case ids ({error})") from error
        unknown = sorted(set(train_ids + val_ids) - set(case_ids))
        if unknown:
            raise BadInputError(path, f"case ids not in the cache: {', '.join(unknown[:5])}")
        if set(train_ids) & set(val_ids):
            raise BadInputError(path, "a case is in both train and val")
        return train_ids, val_ids
    order = [case_ids[i] for i in np.random.default_rng(options.seed).permutation(len(case_ids))]
    if options.folds:
        if len(order) < options.folds:
            raise MrisegError(f"--folds {options.folds} needs at least that many labelled cases, have {len(order)}")
        folds = np.array_split(np.arange(len(order)), options.folds)
        val_ids = [order[i] for i in folds[options.fold]]
    else:
        val_ids = order[:max(1, round(options.val_fraction * len(order)))]
    train_ids = [case_id for case_id in case_ids if case_id not in val_ids]
    if not train_ids:
        raise MrisegError(f"only {len(case_ids)} labelled case(s): nothing left to train on after the validation split")
    return train_ids, sorted(val_ids, key=case_ids.index)


# --- 3. learning rate ----------------------------------------------------------

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


# --- 4. validation -------------------------------------------------------------

@torch.no_grad()
def validate(model: nn.Module, volumes: list[Volume], task: Task, loss_fn, options: TrainOptions,
             amp: bool) -> list[dict[str, Any]]:
    """One record per volume: loss and per-volume Dice of each scored region, and their mean.

    The volume is predicted by the one inference engine (:func:`mriseg.inference.predict_logits`,
    the same call ``predict`` and ``evaluate --model`` make) and decoded by the task, so a
    checkpoint's validation Dice is what scoring it on the cached grid gives.
    """
    settings = InferenceSettings(patch_size=options.patch_size if options.spatial_dims == 3 else None,
                                 batch_size=options.batch_size, amp=amp)
    records = []
    for volume in volumes:
        image, label = np.asarray(volume.image, dtype=np.float32), np.asarray(volume.label)
        logits = predict_logits(model, image, options.spatial_dims, volume.slice_axis, settings)
        targets = task.targets(torch.from_numpy(label.astype(np.int64))[None])
        weights = None
        if volume.border_weights is not None:
            weights = torch.from_numpy(np.asarray(volume.border_weights, dtype=np.float32))[None]
        loss = loss_fn(logits[None], targets, weights).item()
        predicted = task.decode(task.probabilities(logits[None])[0].numpy())
        valid = label != task.ignore_label if task.ignore_label is not None else None
        scores = [dice(p, t, valid) for p, t in zip(task.scored_masks(predicted), task.scored_masks(label))]
        records.append({"case_id": volume.case_id, "loss": loss, "dice": float(np.mean(scores)), "channels": scores})
    return records


def _centre_crop(tensor: Tensor, size: tuple[int, ...]) -> Tensor:
    """Crop the trailing dims to ``size`` (valid-convolution models predict a smaller centre)."""
    if tuple(tensor.shape[-len(size):]) == tuple(size):
        return tensor
    region = [slice((have - want) // 2, (have - want) // 2 + want) for have, want in zip(tensor.shape[-len(size):], size)]
    return tensor[(..., *region)]


# --- 5. run folder -------------------------------------------------------------

class RunFolder:
    """What rank 0 writes: config.json, metrics.jsonl, train.log, checkpoints, curves.png, TensorBoard."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.metrics = self.log_file = self.tensorboard = None
        self.records: list[dict[str, Any]] = []
        self.last_plot = 0.0

    def open(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        metrics_path = self.path / "metrics.jsonl"
        if resume_step is not None and metrics_path.exists():  # drop lines written after the checkpoint
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
            self.records = [json.loads(line) for line in kept]
        self.metrics = metrics_path.open("a")
        self.log_file = (self.path / "train.log").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.path / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        log.info(message)
        if self.log_file:
            self.log_file.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")
            self.log_file.flush()

    def record(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(entry)
        self.metrics.write(json.dumps(entry) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])

    def plot(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.last_plot < 60):
            return
        from mriseg.viz import plot_training_curves
        plot_training_curves(self.records, self.path / "curves.png")
        self.last_plot = time.monotonic()

    def close(self) -> None:
        for handle in (self.metrics, self.log_file, self.tensorboard):
            if handle is not None:
                handle.close()
        self.metrics = self.log_file = self.tensorboard = None


def resolve_run_dir(out: str | Path | None, model: str, resume: bool, overwrite: bool) -> Path:
    """The run folder: ``--out``, or ``runs/<model>-<timestamp>`` (or ``runs/latest`` when resuming)."""
    if out is None:
        if resume:
            latest = Path("runs") / "latest"
            if not latest.exists():
                raise MrisegError("--resume without --out needs runs/latest; name the run folder with --out")
            return latest.resolve()
        return Path("runs") / f"{model}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(out)
    if resume:
        if not (path / "last.pt").is_file():
            raise BadInputError(path, "nothing to resume: no last.pt in this run folder")
        return path
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise BadInputError(path, "run folder exists and is not empty; pass --resume to continue it "
                                  "or --overwrite to replace it")
    return path


def read_run_config(path: Path) -> dict[str, Any]:
    """The run's config.json, which ``--resume`` takes its settings from."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
            raise ValueError("no 'options' object")
    except (OSError, ValueError) as error:
        raise BadInputError(path, f"cannot read the run's config.json to resume ({error})") from error
    return saved


# What last.pt holds beyond best.pt: the state --resume continues from.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "step_in_epoch", "global_step", "epochs_without_gain")


def resumed_options(run_dir: Path, settings: dict[str, Any], is_writer: bool) -> tuple[TrainOptions, Any, dict]:
    """The options, data and checkpoint of a run to resume, each checked against the others."""
    config_path = run_dir / "config.json"
    saved = read_run_config(config_path)
    ignored = sorted(k for k in settings if k not in RESUME_OVERRIDABLE and settings[k] != saved["options"].get(k))
    if ignored and is_writer:
        log.warn(f"--resume keeps the run's own settings; ignoring {', '.join(ignored)}")
    merged = {**saved["options"], **{k: v for k, v in settings.items() if k in RESUME_OVERRIDABLE}}
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    try:
        options = TrainOptions(**{k: v for k, v in merged.items() if k in known})
        options.patch_size = tuple(options.patch_size) if options.patch_size else None
        options.size = tuple(options.size) if options.size else None
        options.check()
    except (MrisegError, TypeError, ValueError) as error:
        raise BadInputError(config_path, f"options cannot be resumed: {error}") from None
    data = saved.get("data")
    if data is not None and not isinstance(data, str):
        raise BadInputError(config_path, f"'data' is {data!r}, not a path")
    last = run_dir / "last.pt"
    checkpoint = load_checkpoint(last)
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    if missing:
        raise BadInputError(last, f"holds no training state ({', '.join(missing)} missing): is it a copy of "
                                  "best.pt? Resume needs the last.pt training wrote")
    model = checkpoint["model"]
    if model["name"] != options.model or (model.get("options") or {}) != options.model_options \
            or model["spatial_dims"] != options.spatial_dims:
        raise BadInputError(last, f"model {model['name']} {model.get('options') or {}} {model['spatial_dims']}D "
                                  f"differs from config.json's {options.model} {options.model_options} "
                                  f"{options.spatial_dims}D")
    return options, data, checkpoint


def saved_split(run_dir: Path, labelled: list[str]) -> tuple[list[str], list[str]]:
    """The train / validation split a resumed run was started with (config.json), never recomputed:
    cases added to the cache since then must not move from training into validation."""
    path = run_dir / "config.json"
    saved = read_run_config(path)
    train_ids, val_ids = saved.get("train_cases"), saved.get("val_cases")
    if not (isinstance(train_ids, list) and isinstance(val_ids, list) and train_ids and val_ids):
        raise BadInputError(path, "has no train_cases / val_cases lists to resume with")
    missing = sorted(set(train_ids + val_ids) - set(labelled))
    if missing:
        raise BadInputError(path, f"cases of the run are no longer labelled in the cache: {', '.join(missing[:5])}")
    return [str(c) for c in train_ids], [str(c) for c in val_ids]


def prepare_run_dir(path: Path, overwrite: bool, resume: bool) -> None:
    try:
        if overwrite and not resume:
            for name in ("last.pt", "best.pt", "metrics.jsonl", "train.log", "curves.png", "config.json"):
                (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise BadInputError(path, f"run folder is not writable ({error.strerror or error})") from error


def point_latest_at(run_dir: Path) -> None:
    """Make ``runs/latest`` a symlink to the new run (atomically; a warning where symlinks fail)."""
    if run_dir.parent.name != "runs":
        return
    link = run_dir.parent / "latest"
    temporary = run_dir.parent / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name)
        os.replace(temporary, link)
    except OSError as error:
        log.warn(f"could not point {link} at {run_dir.name}: {error}")


def library_versions() -> dict[str, str]:
    return {"mriseg": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda or "none"}


# --- 6. device, distributed, data source ---------------------------------------

def default_patch_size(model: nn.Module, volume_shape: Sequence[int], largest: int = 128) -> tuple[int, ...]:
    """The largest 3D patch, at most the volume and ``largest`` along each axis, that ``model`` accepts.

    Size rules hold axis by axis (a multiple of 16; tiny3d's depth 4k - 1), so each axis takes the
    largest accepted size on its own. An axis where nothing fits (a volume smaller than the model's
    minimum) keeps its capped size, and the model's own error names sizes that work.
    """
    cap = tuple(min(int(s), largest) for s in volume_shape)
    axis_ok = getattr(getattr(model, "size_rule", None), "axis_ok", None)
    if axis_ok is None:
        return cap
    return tuple(next((size for size in range(limit, 0, -1) if axis_ok(axis, size)), limit)
                 for axis, limit in enumerate(cap))


def default_spatial_dims(model: str) -> int:
    """2 (slices) for models that have a 2D form, 3 for the 3D-only ones (unet3d, tiny3d)."""
    from mriseg.models.registry import MODELS

    return min(MODELS[model].dims) if model in MODELS else 2


def open_training_data(data: str | Path | None, run_dir: Path, options: TrainOptions, is_writer: bool):
    """The cache to train on: DATA itself, a cache built from raw DATA in RUN_DIR/cache, or the
    embedded synthetic default. Returns ``(cache, description)``."""
    from mriseg.data.cache import build_cache, open_cache
    from mriseg.data.preprocess import PreprocessParams

    if data is None:
        from mriseg.data.synthetic import default_dataset

        # 3D training wants whole volumes with depth: the BraTS-layout default (LGG stacks are 20 slices).
        layout = "brats" if options.spatial_dims == 3 else "lgg"
        data = default_dataset(layout=layout)
        description = f"no DATA given: training on the embedded synthetic {layout.upper()}-layout default ({data})"
    else:
        description = f"data: {data}"
    path = Path(data)
    if not path.exists():
        raise BadInputError(path, "no such file or folder")
    if (path / "manifest.json").is_file():
        return open_cache(path), description
    cache_dir = run_dir / "cache"
    if is_writer and not (cache_dir / "manifest.json").is_file():
        log.info(f"{path} is not a cache: preprocessing it into {cache_dir}")
        build_cache(path, cache_dir, PreprocessParams(size=options.size), modalities=options.modalities)
    if dist.is_initialized():
        dist.barrier()
    return open_cache(cache_dir), description + f" (preprocessed into {cache_dir})"


# --- 7. the loop ---------------------------------------------------------------

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


def train(data: str | Path | None = None, model: str | None = None, out: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, **settings: Any) -> dict[str, Any]:
    """Train a model; returns a summary (also written to RUN_DIR/summary.json).

    Args:
        data: a preprocess cache, a raw dataset (preprocessed into RUN_DIR/cache first),
            or None for the embedded synthetic LGG-layout default.
        model: registry name (default ``unet``).
        out: run folder; default ``runs/<model>-<timestamp>`` with ``runs/latest`` pointing at it.
        resume: continue the run in ``out`` (or ``runs/latest``) from its last.pt.
        overwrite: replace an existing run folder.
        settings: any :class:`TrainOptions` field.
    """
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise MrisegError(f"unknown training option(s): {', '.join(unknown)}")
    if "fold" in settings and settings.get("folds") is None:
        raise MrisegError(f"--fold {settings['fold']} needs --folds K (K-fold cross-validation by patient)")

    # distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else None
    is_writer = rank == 0

    # options: fresh, or the resumed run's config.json with a few overrides
    run_dir = resolve_run_dir(out, model or "unet", resume, overwrite)
    checkpoint = None
    if resume:
        options, data, checkpoint = resumed_options(run_dir, settings, is_writer)
    else:
        options = TrainOptions(**settings)
        if model is not None:
            options.model = model
        if "spatial_dims" not in settings:
            options.spatial_dims = default_spatial_dims(options.model)
    options.check()
    if data is not None and not resume:
        refuse_output_over_inputs(run_dir, [data])

    device = choose_device(options.device, local_rank)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if data is not None and not Path(data).exists():
        raise BadInputError(data, "no such cache or dataset")
    run = RunFolder(run_dir, is_writer)
    created = not run_dir.exists()
    try:
        if is_writer:
            prepare_run_dir(run_dir, overwrite, resume)
        if distributed:
            dist.barrier()
        return _train(data, run, options, checkpoint, device, rank, world_size, resume)
    except MrisegError:
        run.close()
        if is_writer and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise
    finally:
        run.close()
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(data, run: RunFolder, options: TrainOptions, checkpoint: dict | None, device: torch.device,
           rank: int, world_size: int, resume: bool) -> dict[str, Any]:
    from mriseg.models import build_model

    started = time.monotonic()
    torch.manual_seed(options.seed)
    run_dir, is_writer = run.path, run.enabled

    # data and task
    cache, description = open_training_data(data, run_dir, options, is_writer)
    labelled = [case_id for case_id in cache.case_ids if cache.record(case_id).get("has_label")]
    if len(labelled) < 2:
        raise BadInputError(cache.path, f"needs at least 2 labelled cases to train and validate, has {len(labelled)}")
    label_map = {int(k): int(v) for k, v in (cache.manifest["params"].get("label_map") or {}).items()}
    task = resolve_task(cache.label_info, options.task, options.ignore_index, cache.path, label_map)
    in_channels = len(cache.modalities)
    spatial_shape = cache.record(labelled[0])["shape"]
    if options.spatial_dims == 3 and len(spatial_shape) != 3:
        raise BadInputError(cache.path, "--dims 3 needs 3D volumes; this cache holds 2D images")
    train_ids, val_ids = split_cases(labelled, options) if not resume else saved_split(run_dir, labelled)
    border = options.loss == "border-ce"
    train_volumes = load_volumes(cache, train_ids, options.spatial_dims, options.uniform_share, border,
                                 options.ignore_index)
    val_volumes = load_volumes(cache, val_ids[rank::world_size], options.spatial_dims, options.uniform_share,
                               border, options.ignore_index)
    if options.steps_per_epoch is None:
        samples = sum(v.slices for v in train_volumes) if options.spatial_dims == 2 else 8 * len(train_volumes)
        options.steps_per_epoch = max(1, math.ceil(samples / (options.batch_size * world_size)))

    # model, optimiser, schedule, precision
    raw_model = build_model(options.model, in_channels, task.out_channels, spatial_dims=options.spatial_dims,
                            **options.model_options)
    if options.spatial_dims == 3 and options.patch_size is None:
        options.patch_size = default_patch_size(raw_model, spatial_shape)
    window = options.patch_size or spatial_shape[-2:]
    checks.require_memory(f"a batch of {options.batch_size} x {in_channels} x {'x'.join(map(str, window))}",
                          4.0 * options.batch_size * in_channels * float(np.prod(window)))
    if checkpoint is not None:
        if checkpoint["model"]["out_channels"] != task.out_channels:
            raise BadInputError(run_dir / "last.pt", f"model has {checkpoint['model']['out_channels']} output "
                                                     f"channels, the task from the cache {task.out_channels}")
        if checkpoint["model"]["in_channels"] != in_channels:
            raise BadInputError(run_dir / "last.pt", f"model has {checkpoint['model']['in_channels']} input channels, "
                                                     f"the data {in_channels}")
        raw_model.load_state_dict(checkpoint["state_dict"])
    memory_format = torch.channels_last if options.spatial_dims == 2 else torch.channels_last_3d
    raw_model.to(device, memory_format=memory_format if options.channels_last else torch.preserve_format)
    model: nn.Module = raw_model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if options.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(raw_model.parameters(), options)
    total_steps = options.epochs * options.steps_per_epoch
    schedule = LearningRate(options.lr, options.schedule, total_steps,
                            round(options.warmup_epochs * options.steps_per_epoch), options.lr_patience,
                            options.lr_factor)
    amp_dtype = None
    if options.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif options.amp and device.type == "cpu":
        amp_dtype = torch.bfloat16
    elif options.amp:
        log.warn(f"--amp is not supported on {device.type}; training in float32")
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = build_loss(options.loss, task.activation, IGNORED, options.bce_weight)
    augment = parse_augment(options.augment)

    # state that --resume restores
    start_epoch, start_step, global_step, best_score, best_epoch, epochs_without_gain = 0, 0, 0, -math.inf, -1, 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        global_step, best_score = checkpoint["global_step"], checkpoint["best_score"]
        best_epoch, epochs_without_gain = checkpoint["best_epoch"], checkpoint["epochs_without_gain"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    dataset = TrainingSamples(train_volumes, options.spatial_dims, options.patch_size, options.foreground_share,
                              options.seed)
    workers = options.workers if options.workers is not None else (4 if device.type == "cuda" else 0)

    def checkpoint_payload(epoch: int, step_in_epoch: int, with_training_state: bool) -> dict[str, Any]:
        payload = {
            "model": {"name": options.model, "in_channels": in_channels, "out_channels": task.out_channels,
                      "spatial_dims": options.spatial_dims, "options": options.model_options},
            "state_dict": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
            "preprocess": cache.manifest["params"], "modalities": cache.modalities, "task": task.to_dict(),
            "label_info": cache.label_info, "patch_size": list(options.patch_size or []),
            "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
        }
        if with_training_state:
            payload.update({
                "step_in_epoch": step_in_epoch, "global_step": global_step, "epochs_without_gain": epochs_without_gain,
                "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            })
        return payload

    # the run folder
    run.open(checkpoint["global_step"] if checkpoint is not None else None)
    if is_writer:
        if not resume:
            config = {"data": str(data) if data is not None else None, "cache": str(cache.path),
                      "options": options.to_dict(), "task": task.to_dict(), "in_channels": in_channels,
                      "modalities": cache.modalities, "preprocess": cache.manifest["params"],
                      "train_cases": train_ids, "val_cases": val_ids, "device": str(device), "world_size": world_size,
                      "amp_dtype": str(amp_dtype) if amp_dtype else None, "workers": workers,
                      "versions": library_versions(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
            write_json_atomic(run_dir / "config.json", config)
            point_latest_at(run_dir)
        run.say(description)
        run.say(f"run folder: {run_dir}" + (f" (resuming at epoch {start_epoch + 1}, step {global_step})" if resume else ""))
        run.say(f"{options.model} {options.spatial_dims}D, task {task.kind} ({', '.join(task.channel_names)}), "
                f"loss {options.loss}, {len(train_ids)} train / {len(val_ids)} val cases, "
                f"{options.steps_per_epoch} steps of {options.batch_size}"
                f"{f' x {world_size} ranks' if world_size > 1 else ''} per epoch, device {device}"
                f"{f', amp {amp_dtype}' if amp_dtype else ''}")

    last_good = run_dir / "last.pt"
    stopped_early, summary, epoch = False, {}, start_epoch
    if start_epoch >= options.epochs:
        raise MrisegError(f"{run_dir}: the run already finished {start_epoch} epochs; "
                          f"pass --epochs N with N > {start_epoch} to train further")
    with StopRequested() as stop:
        for epoch in range(start_epoch, options.epochs):
            epoch_started = time.monotonic()
            dataset.epoch = epoch
            first_step = start_step if epoch == start_epoch else 0
            loader = DataLoader(dataset, batch_sampler=StepBatches(options.steps_per_epoch, options.batch_size, rank,
                                                                   world_size, first_step),
                                num_workers=workers, pin_memory=device.type == "cuda")
            train_losses: list[float] = []
            batches = log.progress(loader, total=len(loader.batch_sampler), description=f"epoch {epoch + 1}",
                                   every=options.log_every,
                                   status=lambda: f"loss {train_losses[-1]:.4f}" if train_losses else ""
                                   ) if is_writer else loader
            step_end = time.monotonic()
            for step_in_epoch, (images, labels, weights) in enumerate(batches, start=first_step):
                data_wait = time.monotonic() - step_end
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                weights = weights.to(device, non_blocking=True) if weights.numel() else None
                if augment.enabled:
                    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                        [options.seed, global_step, rank]).generate_state(1)[0]))
                    images, labels, weights = augment_batch(images, labels, augment, generator, weights)
                if options.channels_last:
                    images = images.contiguous(memory_format=memory_format)
                targets = task.targets(labels)
                lr = schedule.at(global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                try:
                    with autocast:
                        outputs = model(images)
                    if isinstance(outputs, Tensor) and outputs.shape[2:] != targets.shape[-outputs.ndim + 2:]:
                        targets = _centre_crop(targets, outputs.shape[2:])
                        weights = _centre_crop(weights, outputs.shape[2:]) if weights is not None else None
                    loss = deep_supervision_loss(loss_fn, outputs, targets, weights)
                    scaler.scale(loss).backward()
                    if options.clip_grad:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), options.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                except (torch.OutOfMemoryError, MemoryError) as error:
                    raise MrisegError(f"{device} ran out of memory at batch size {options.batch_size}"
                                      f"{f', patch {options.patch_size}' if options.spatial_dims == 3 else ''}; "
                                      "try a smaller --batch-size or --patch-size (or --amp)") from error

                # one number per step, averaged over ranks; the stop flag travels with it
                reduced = torch.tensor([loss.item(), float(stop.requested)])
                if world_size > 1:
                    dist.all_reduce(reduced)
                    reduced[0] /= world_size
                loss_value, stop_now = reduced[0].item(), reduced[1].item() > 0
                if not math.isfinite(loss_value):
                    kept = f"last good checkpoint kept: {last_good}" if last_good.exists() else "no checkpoint written yet"
                    raise MrisegError(f"loss became {loss_value} at step {global_step + 1} (epoch {epoch + 1}); "
                                      f"stopped, {kept}; try a lower --lr or --clip-grad")
                global_step += 1
                train_losses.append(loss_value)
                step_time = time.monotonic() - step_end
                step_end = time.monotonic()
                run.record({"kind": "step", "step": global_step, "epoch": epoch + 1, "loss": loss_value, "lr": lr,
                            "step_time": round(step_time, 5), "data_wait": round(data_wait, 5)})
                if is_writer and not log.is_terminal() and global_step % options.log_every == 0:
                    run.say(f"step {global_step} loss {loss_value:.4f} lr {lr:.2e} "
                            f"{step_time * 1000:.0f} ms/step (data {data_wait * 1000:.0f} ms)")
                if stop_now:
                    if is_writer:
                        save_checkpoint(last_good, checkpoint_payload(epoch, step_in_epoch + 1, True))
                        run.plot(force=True)
                        run.say(f"interrupted at step {global_step}; checkpoint written to {last_good}; "
                                f"continue with: mriseg train --resume --out {run_dir}")
                    raise KeyboardInterrupt

            # validation on whole volumes, gathered from every rank
            records = validate(raw_model, val_volumes, task, loss_fn, options, amp_dtype is not None)
            if world_size > 1:
                gathered: list[list[dict]] = [[] for _ in range(world_size)]
                dist.all_gather_object(gathered, records)
                records = [record for part in gathered for record in part]
            dice = [record["dice"] for record in records]
            mean_dice, median_dice = float(np.mean(dice)), float(np.median(dice))
            per_channel = np.mean([record["channels"] for record in records], axis=0).tolist()
            schedule.end_epoch(mean_dice)
            improved = mean_dice > best_score
            if improved:
                best_score, best_epoch, epochs_without_gain = mean_dice, epoch + 1, 0
            else:
                epochs_without_gain += 1
            epoch_time = time.monotonic() - epoch_started
            entry = {"kind": "epoch", "step": global_step, "epoch": epoch + 1,
                     "train_loss": float(np.mean(train_losses)) if train_losses else None,
                     "val_loss": float(np.mean([record["loss"] for record in records])),
                     "val_dice_mean": mean_dice, "val_dice_median": median_dice,
                     "val_dice_channels": dict(zip([region.name for region in task.scored_regions()], per_channel)),
                     "lr": schedule.at(global_step), "epoch_time": round(epoch_time, 3)}
            run.record(entry)
            if is_writer:
                if improved:
                    save_checkpoint(run_dir / "best.pt", checkpoint_payload(epoch + 1, 0, False))
                save_checkpoint(last_good, checkpoint_payload(epoch + 1, 0, True))
                channels = " ".join(f"{n} {d:.4f}" for n, d in entry["val_dice_channels"].items()) \
                    if len(per_channel) > 1 else ""
                train_loss = f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "n/a"
                run.say(f"epoch {epoch + 1}/{options.epochs} train loss {train_loss} val loss "
                        f"{entry['val_loss']:.4f} val Dice mean {mean_dice:.4f} median {median_dice:.4f} {channels}"
                        f"{' (best)' if improved else ''} [{epoch_time:.1f} s]")
                run.plot()
            summary = {"val_dice_mean": mean_dice, "val_dice_median": median_dice,
                       "val_dice_channels": entry["val_dice_channels"],
                       "val_cases": {r["case_id"]: r["dice"] for r in records}}
            if options.patience and epochs_without_gain >= options.patience:
                stopped_early = True
                if is_writer:
                    run.say(f"early stop: no gain in validation Dice for {options.patience} epochs")
                break

    summary = {"run_dir": str(run_dir), "model": options.model, "task": task.kind,
               "best_val_dice_mean": best_score, "best_epoch": best_epoch, "epochs_run": epoch + 1,
               "stopped_early": stopped_early, "steps": global_step, "seconds": round(time.monotonic() - started, 1),
               "device": str(device), "world_size": world_size, "best_checkpoint": str(run_dir / "best.pt"),
               "last": summary}
    if is_writer:
        run.plot(force=True)
        write_json_atomic(run_dir / "summary.json", summary)
        run.say(f"done: best mean per-volume val Dice {best_score:.4f} at epoch {best_epoch}; {run_dir / 'best.pt'}")
    return summary
