"""One training run's shared objects: the :class:`Session` (data, task, model, optimiser, ...) that
:func:`set_up` builds, the :class:`TrainingState` that ``--resume`` restores, and the checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mriseg.augment import AugmentConfig, parse_augment
from mriseg.errors import BadInputError
from mriseg.inference.context import context_channels, set_slice_context
from mriseg.labels import IGNORED, Task
from mriseg.losses import build_loss
from mriseg.train.options import TrainOptions, default_patch_size
from mriseg.train.run_folder import RunFolder, open_training_data
from mriseg.train.sampling import TrainingSamples, Volume, load_volumes, saved_split, split_cases
from mriseg.devices import Precision
from mriseg.train.budget import Budget
from mriseg.train.plan import Plan, plan_for_ranks, refuse_what_cannot_fit
from mriseg.train.schedule import LearningRate, build_optimizer, precision
from mriseg.train.validation import resolve_task


@dataclass
class Session:
    """Everything the steps of one run share, built once by :func:`set_up`."""

    options: TrainOptions
    run: RunFolder
    device: torch.device
    rank: int
    world_size: int
    cache: Any
    task: Task
    train_ids: list[str]
    val_ids: list[str]
    raw_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LearningRate
    precision: Precision
    autocast: Any
    scaler: torch.amp.GradScaler
    loss_fn: Any
    augment: AugmentConfig
    dataset: TrainingSamples
    val_volumes: list
    workers: int
    description: str
    started: float = field(default_factory=time.monotonic)
    budget: Budget | None = None         # --time
    planned_epochs: int = 0              # with --time: the epochs the budget holds (re-planned each epoch)
    plan: Plan | None = None             # the recipe a --time run chose for the options not given

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def memory_format(self) -> torch.memory_format:
        return self.precision.memory_format(self.options.spatial_dims)

@dataclass
class TrainingState:
    """What ``--resume`` restores: where the loop is and the best score so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_gain: int = 0
    stopped_early: bool = False
    last: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def restore(cls, checkpoint: dict | None, session: Session) -> "TrainingState":
        if checkpoint is None:
            return cls()
        session.optimizer.load_state_dict(checkpoint["optimizer"])
        session.schedule.load_state_dict(checkpoint["scheduler"])
        session.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if session.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        return cls(checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"],
                   checkpoint["best_score"], checkpoint["best_epoch"], checkpoint["epochs_without_gain"])

def set_up(data: Any, run: RunFolder, options: TrainOptions, checkpoint: dict | None, device: torch.device,
           rank: int, world_size: int, resume: bool) -> Session:
    """Open the data, build the task, model, optimiser, schedule, precision and sampler."""
    torch.manual_seed(options.seed)
    cache, description = open_training_data(data, run.path, options, rank == 0)
    labelled = [case_id for case_id in cache.case_ids if cache.record(case_id).get("has_label")]
    needed = 1 if options.val_fraction == 0 else 2
    if len(labelled) < needed:
        raise BadInputError(cache.path, f"needs at least 2 labelled cases to train and validate, has "
                                        f"{len(labelled)} (--val-fraction 0 trains on every case without validation)")
    label_map = {int(k): int(v) for k, v in (cache.manifest["params"].get("label_map") or {}).items()}
    task = resolve_task(cache.label_info, options.task, options.ignore_index, cache.path, label_map)
    spatial_shape = cache.record(labelled[0])["shape"]
    if options.spatial_dims == 3 and len(spatial_shape) != 3:
        raise BadInputError(cache.path, "--dims 3 needs 3D volumes; this cache holds 2D images")
    if parse_augment(options.augment).modality_dropout and len(cache.modalities) < 2:
        raise BadInputError(cache.path, f"--augment dropout drops one of two or more modalities; this cache has "
                                        f"one ({', '.join(cache.modalities)})")
    train_ids, val_ids = saved_split(run.path, labelled) if resume else split_cases(labelled, options)
    refuse_nothing_to_learn(cache, train_ids, task)
    border = options.loss == "border-ce"
    train_volumes = load_volumes(cache, train_ids, options.spatial_dims, options.uniform_share, border,
                                 task.ignore_label if task.ignore_label is not None else options.ignore_index)
    val_volumes = load_volumes(cache, val_ids[rank::world_size], options.spatial_dims, options.uniform_share,
                               border, task.ignore_label if task.ignore_label is not None else options.ignore_index)
    plan = None
    if options.given is not None and not resume:
        plan = plan_for_ranks(options, device, train_volumes, val_volumes,
                              context_channels(len(cache.modalities), options.context), task.out_channels, rank,
                              world_size)
    if options.steps_per_epoch is None:
        samples = sum(v.slices for v in train_volumes) if options.spatial_dims == 2 else 8 * len(train_volumes)
        options.steps_per_epoch = max(1, math.ceil(samples / (options.batch_size * world_size)))
    chosen, autocast, scaler = precision(options, device)
    in_channels = context_channels(len(cache.modalities), options.context)  # 2.5D: neighbours as channels
    raw_model = build_network(options, in_channels, task, train_volumes, checkpoint, run.path, device)
    chosen.apply(raw_model, options.spatial_dims)
    model: nn.Module = raw_model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    if options.compile:
        model = torch.compile(model)
    schedule = LearningRate(options.lr, options.schedule, options.epochs * options.steps_per_epoch,
                            round(options.warmup_epochs * options.steps_per_epoch), options.lr_patience,
                            options.lr_factor)
    return Session(options=options, run=run, device=device, rank=rank, world_size=world_size, cache=cache, task=task,
                   train_ids=train_ids, val_ids=val_ids, raw_model=raw_model, model=model,
                   optimizer=build_optimizer(raw_model.parameters(), options), schedule=schedule,
                   precision=chosen, autocast=autocast, scaler=scaler,
                   loss_fn=build_loss(options.loss, task.activation, IGNORED, options.bce_weight),
                   augment=parse_augment(options.augment),
                   dataset=TrainingSamples(train_volumes, options.spatial_dims, options.patch_size,
                                           options.foreground_share, options.seed, options.context,
                                           int(getattr(raw_model, "output_margin", 0)) // 2),
                   val_volumes=val_volumes, description=description, plan=plan,
                   workers=options.workers if options.workers is not None else (4 if device.type == "cuda" else 0))

def refuse_nothing_to_learn(cache: Any, train_ids: list[str], task: Task) -> None:
    """Training cases whose labels are all background (or ignored) teach "no tumour anywhere":
    a run on them would end with a model that finds nothing, after all its epochs."""
    background = {0} | ({task.ignore_label} if task.ignore_label is not None else set())
    if not any(set(cache.record(case_id).get("label_values", [1])) - background for case_id in train_ids):
        raise BadInputError(cache.path, f"none of the {len(train_ids)} training cases has a tumour label (every "
                                        "label is background): nothing to learn; check the masks or --label-map")


def build_network(options: TrainOptions, in_channels: int, task: Task, volumes: list[Volume],
                  checkpoint: dict | None, run_dir: Path, device: torch.device) -> nn.Module:
    """The registry model (with the resumed weights), the default patch, moved to the device."""
    from mriseg.models import build_model

    network = build_model(options.model, in_channels, task.out_channels, spatial_dims=options.spatial_dims,
                          **options.model_options)
    set_slice_context(network, options.context)
    if options.patch_size is None:
        options.patch_size = default_patch_size(network, volumes, options.spatial_dims)
    refuse_what_cannot_fit(network, options, in_channels, tuple(options.patch_size or volumes[0].in_plane_shape),
                           device)
    if checkpoint is not None:
        for key, have, words in (("out_channels", task.out_channels, "output channels"),
                                 ("in_channels", in_channels, "input channels")):
            if checkpoint["model"][key] != have:
                raise BadInputError(run_dir / "last.pt", f"model has {checkpoint['model'][key]} {words}, "
                                                         f"the data {have}")
        network.load_state_dict(checkpoint["state_dict"])
    return network.to(device)

def checkpoint_payload(session: Session, state: TrainingState, epoch: int, step_in_epoch: int,
                       training: bool = True) -> dict[str, Any]:
    """best.pt (``training=False``) or last.pt, which adds what ``--resume`` needs."""
    options, cache = session.options, session.cache
    payload = {
        "model": {"name": options.model, "in_channels": context_channels(len(cache.modalities), options.context),
                  "context": options.context, "out_channels": session.task.out_channels,
                  "spatial_dims": options.spatial_dims,
                  "options": options.model_options},
        "state_dict": {k: v.detach().cpu() for k, v in session.raw_model.state_dict().items()},
        "preprocess": cache.manifest["params"], "modalities": cache.modalities, "task": session.task.to_dict(),
        "label_info": cache.label_info,
        # the 3D window inference slides; 2D models always predict whole slices
        "patch_size": list(options.patch_size or []) if options.spatial_dims == 3 else [],
        "epoch": epoch, "best_score": state.best_score, "best_epoch": state.best_epoch,
        "time_spent": session.budget.used() if session.budget is not None else None,
    }
    if training:
        device = session.device
        payload.update({
            "step_in_epoch": step_in_epoch, "global_step": state.global_step,
            "epochs_without_gain": state.epochs_without_gain, "optimizer": session.optimizer.state_dict(),
            "scheduler": session.schedule.state_dict(), "scaler": session.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        })
    return payload
