"""The training loop, read top to bottom: :func:`train` -> :func:`run_training` -> :func:`run_epoch`
-> :func:`train_step`, then :func:`end_epoch` (validation, checkpoints, early stop).

Under ``torchrun`` the same code trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mriseg import log
from mriseg import options as checks
from mriseg.augment import AugmentConfig, augment_batch, parse_augment
from mriseg.checkpoint import save_checkpoint
from mriseg.devices import choose_device
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import refuse_output_over_inputs, write_json_atomic
from mriseg.labels import IGNORED, Task
from mriseg.losses import build_loss, deep_supervision_loss
from mriseg.train.options import TrainOptions, default_patch_size, default_spatial_dims
from mriseg.train.run_folder import (RunFolder, library_versions, open_training_data, point_latest_at,
                                     prepare_run_dir, resolve_run_dir, resumed_options)
from mriseg.train.sampling import StepBatches, TrainingSamples, load_volumes, saved_split, split_cases
from mriseg.train.schedule import LearningRate, build_optimizer, precision
from mriseg.train.signals import StopRequested
from mriseg.train.validation import resolve_task, validate


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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None
    run_dir = resolve_run_dir(out, model or "unet", resume, overwrite)
    options, data, checkpoint = (resumed_options(run_dir, settings, rank == 0) if resume
                                 else fresh_options(model, settings, data, run_dir))
    device = choose_device(options.device, local_rank)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if data is not None and not Path(data).exists():
        raise BadInputError(data, "no such cache or dataset")
    run = RunFolder(run_dir, rank == 0)
    created = not run_dir.exists()
    try:
        if rank == 0:
            prepare_run_dir(run_dir, overwrite, resume)
        if world_size > 1:
            dist.barrier()
        return run_training(data, run, options, checkpoint, device, rank, world_size, resume)
    except MrisegError:
        run.close()
        if rank == 0 and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise
    finally:
        run.close()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def fresh_options(model: str | None, settings: dict[str, Any], data: Any, run_dir: Path) -> tuple[TrainOptions,
                                                                                                   Any, None]:
    """The options of a new run, checked, and its data (never under the run folder)."""
    options = TrainOptions(**settings)
    if model is not None:
        options.model = model
    if "spatial_dims" not in settings:
        options.spatial_dims = default_spatial_dims(options.model)
    options.check()
    if data is not None:
        refuse_output_over_inputs(run_dir, [data])
    return options, data, None


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
    amp_dtype: torch.dtype | None
    autocast: Any
    scaler: torch.amp.GradScaler
    loss_fn: Any
    augment: AugmentConfig
    dataset: TrainingSamples
    val_volumes: list
    workers: int
    description: str
    started: float = field(default_factory=time.monotonic)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.options.spatial_dims == 2 else torch.channels_last_3d


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


def run_training(data: Any, run: RunFolder, options: TrainOptions, checkpoint: dict | None, device: torch.device,
                 rank: int, world_size: int, resume: bool) -> dict[str, Any]:
    """Set up, then per epoch: the steps, validation on whole volumes, checkpoints and early stop."""
    session = set_up(data, run, options, checkpoint, device, rank, world_size, resume)
    state = TrainingState.restore(checkpoint, session)
    start_run(session, state, data, resume)
    if state.epoch >= options.epochs:
        raise MrisegError(f"{run.path}: the run already finished {state.epoch} epochs; "
                          f"pass --epochs N with N > {state.epoch} to train further")
    epoch = state.epoch
    with StopRequested() as stop:
        for epoch in range(state.epoch, options.epochs):
            epoch_started = time.monotonic()
            losses = run_epoch(session, state, epoch, stop)
            if end_epoch(session, state, epoch, losses, time.monotonic() - epoch_started):
                break
    return finish(session, state, epoch)


# --- set-up ----------------------------------------------------------------------------------------

def set_up(data: Any, run: RunFolder, options: TrainOptions, checkpoint: dict | None, device: torch.device,
           rank: int, world_size: int, resume: bool) -> Session:
    """Open the data, build the task, model, optimiser, schedule, precision and sampler."""
    torch.manual_seed(options.seed)
    cache, description = open_training_data(data, run.path, options, rank == 0)
    labelled = [case_id for case_id in cache.case_ids if cache.record(case_id).get("has_label")]
    if len(labelled) < 2:
        raise BadInputError(cache.path, f"needs at least 2 labelled cases to train and validate, has {len(labelled)}")
    label_map = {int(k): int(v) for k, v in (cache.manifest["params"].get("label_map") or {}).items()}
    task = resolve_task(cache.label_info, options.task, options.ignore_index, cache.path, label_map)
    spatial_shape = cache.record(labelled[0])["shape"]
    if options.spatial_dims == 3 and len(spatial_shape) != 3:
        raise BadInputError(cache.path, "--dims 3 needs 3D volumes; this cache holds 2D images")
    train_ids, val_ids = saved_split(run.path, labelled) if resume else split_cases(labelled, options)
    border = options.loss == "border-ce"
    train_volumes = load_volumes(cache, train_ids, options.spatial_dims, options.uniform_share, border,
                                 options.ignore_index)
    val_volumes = load_volumes(cache, val_ids[rank::world_size], options.spatial_dims, options.uniform_share,
                               border, options.ignore_index)
    if options.steps_per_epoch is None:
        samples = sum(v.slices for v in train_volumes) if options.spatial_dims == 2 else 8 * len(train_volumes)
        options.steps_per_epoch = max(1, math.ceil(samples / (options.batch_size * world_size)))
    raw_model = build_network(options, len(cache.modalities), task, spatial_shape, checkpoint, run.path, device)
    model: nn.Module = raw_model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    if options.compile:
        model = torch.compile(model)
    amp_dtype, autocast, scaler = precision(options, device)
    schedule = LearningRate(options.lr, options.schedule, options.epochs * options.steps_per_epoch,
                            round(options.warmup_epochs * options.steps_per_epoch), options.lr_patience,
                            options.lr_factor)
    return Session(options=options, run=run, device=device, rank=rank, world_size=world_size, cache=cache, task=task,
                   train_ids=train_ids, val_ids=val_ids, raw_model=raw_model, model=model,
                   optimizer=build_optimizer(raw_model.parameters(), options), schedule=schedule,
                   amp_dtype=amp_dtype, autocast=autocast, scaler=scaler,
                   loss_fn=build_loss(options.loss, task.activation, IGNORED, options.bce_weight),
                   augment=parse_augment(options.augment),
                   dataset=TrainingSamples(train_volumes, options.spatial_dims, options.patch_size,
                                           options.foreground_share, options.seed),
                   val_volumes=val_volumes, description=description,
                   workers=options.workers if options.workers is not None else (4 if device.type == "cuda" else 0))


def build_network(options: TrainOptions, in_channels: int, task: Task, spatial_shape: list[int],
                  checkpoint: dict | None, run_dir: Path, device: torch.device) -> nn.Module:
    """The registry model (with the resumed weights), the default 3D patch, moved to the device."""
    from mriseg.models import build_model

    network = build_model(options.model, in_channels, task.out_channels, spatial_dims=options.spatial_dims,
                          **options.model_options)
    if options.spatial_dims == 3 and options.patch_size is None:
        options.patch_size = default_patch_size(network, spatial_shape)
    window = options.patch_size or spatial_shape[-2:]
    checks.require_memory(f"a batch of {options.batch_size} x {in_channels} x {'x'.join(map(str, window))}",
                          4.0 * options.batch_size * in_channels * float(np.prod(window)))
    if checkpoint is not None:
        for key, have, words in (("out_channels", task.out_channels, "output channels"),
                                 ("in_channels", in_channels, "input channels")):
            if checkpoint["model"][key] != have:
                raise BadInputError(run_dir / "last.pt", f"model has {checkpoint['model'][key]} {words}, "
                                                         f"the data {have}")
        network.load_state_dict(checkpoint["state_dict"])
    memory_format = torch.channels_last if options.spatial_dims == 2 else torch.channels_last_3d
    return network.to(device, memory_format=memory_format if options.channels_last else torch.preserve_format)


def start_run(session: Session, state: TrainingState, data: Any, resume: bool) -> None:
    """config.json (a new run), runs/latest, and the first lines of the log."""
    run, options, task = session.run, session.options, session.task
    run.open(state.global_step if resume else None)
    if not session.is_writer:
        return
    if not resume:
        write_json_atomic(run.path / "config.json", {
            "data": str(data) if data is not None else None, "cache": str(session.cache.path),
            "options": options.to_dict(), "task": task.to_dict(), "in_channels": len(session.cache.modalities),
            "modalities": session.cache.modalities, "preprocess": session.cache.manifest["params"],
            "train_cases": session.train_ids, "val_cases": session.val_ids, "device": str(session.device),
            "world_size": session.world_size, "amp_dtype": str(session.amp_dtype) if session.amp_dtype else None,
            "workers": session.workers, "versions": library_versions(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")})
        point_latest_at(run.path)
    run.say(session.description)
    run.say(f"run folder: {run.path}" + (f" (resuming at epoch {state.epoch + 1}, step {state.global_step})"
                                         if resume else ""))
    ranks = f" x {session.world_size} ranks" if session.world_size > 1 else ""
    run.say(f"{options.model} {options.spatial_dims}D, task {task.kind} ({', '.join(task.channel_names)}), "
            f"loss {options.loss}, {len(session.train_ids)} train / {len(session.val_ids)} val cases, "
            f"{options.steps_per_epoch} steps of {options.batch_size}{ranks} per epoch, device {session.device}"
            f"{f', amp {session.amp_dtype}' if session.amp_dtype else ''}")


# --- the steps -------------------------------------------------------------------------------------

def run_epoch(session: Session, state: TrainingState, epoch: int, stop: StopRequested) -> list[float]:
    """One epoch of steps; on a stop request, last.pt at the step boundary, then KeyboardInterrupt."""
    options, run = session.options, session.run
    session.dataset.epoch = epoch
    first_step = state.step_in_epoch if epoch == state.epoch else 0
    loader = DataLoader(session.dataset, batch_sampler=StepBatches(options.steps_per_epoch, options.batch_size,
                                                                   session.rank, session.world_size, first_step),
                        num_workers=session.workers, pin_memory=session.device.type == "cuda")
    losses: list[float] = []
    batches = log.progress(loader, total=len(loader.batch_sampler), description=f"epoch {epoch + 1}",
                           every=options.log_every, status=lambda: f"loss {losses[-1]:.4f}" if losses else ""
                           ) if session.is_writer else loader
    step_end = time.monotonic()
    for step_in_epoch, batch in enumerate(batches, start=first_step):
        data_wait = time.monotonic() - step_end
        lr = session.schedule.at(state.global_step)
        loss, stop_now = train_step(session, state, batch, lr, stop.requested, epoch)
        state.global_step += 1
        losses.append(loss)
        step_time, step_end = time.monotonic() - step_end, time.monotonic()
        run.record({"kind": "step", "step": state.global_step, "epoch": epoch + 1, "loss": loss, "lr": lr,
                    "step_time": round(step_time, 5), "data_wait": round(data_wait, 5)})
        if session.is_writer and not log.is_terminal() and state.global_step % options.log_every == 0:
            run.say(f"step {state.global_step} loss {loss:.4f} lr {lr:.2e} "
                    f"{step_time * 1000:.0f} ms/step (data {data_wait * 1000:.0f} ms)")
        if stop_now:
            if session.is_writer:
                save_checkpoint(run.path / "last.pt", checkpoint_payload(session, state, epoch, step_in_epoch + 1))
                run.plot(force=True)
                run.say(f"interrupted at step {state.global_step}; checkpoint written to {run.path / 'last.pt'}; "
                        f"continue with: mriseg train --resume --out {run.path}")
            raise KeyboardInterrupt
    return losses


def train_step(session: Session, state: TrainingState, batch: tuple[Tensor, Tensor, Tensor], lr: float,
               stop_requested: bool, epoch: int) -> tuple[float, bool]:
    """Forward, loss, backward, optimiser step; returns the loss averaged over ranks and the stop flag."""
    options, device = session.options, session.device
    images, labels, weights = (tensor.to(device, non_blocking=True) for tensor in batch)
    weights = weights if weights.numel() else None
    if session.augment.enabled:  # seeded by (seed, step, rank): a resumed run augments the same way
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [options.seed, state.global_step, session.rank]).generate_state(1)[0]))
        images, labels, weights = augment_batch(images, labels, session.augment, generator, weights)
    if options.channels_last:
        images = images.contiguous(memory_format=session.memory_format)
    targets = session.task.targets(labels)
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    try:
        with session.autocast:
            outputs = session.model(images)
        if isinstance(outputs, Tensor) and outputs.shape[2:] != targets.shape[-outputs.ndim + 2:]:
            targets = centre_crop(targets, outputs.shape[2:])  # valid convolutions predict a smaller centre
            weights = centre_crop(weights, outputs.shape[2:]) if weights is not None else None
        loss = deep_supervision_loss(session.loss_fn, outputs, targets, weights)
        session.scaler.scale(loss).backward()
        if options.clip_grad:
            session.scaler.unscale_(session.optimizer)
            torch.nn.utils.clip_grad_norm_(session.raw_model.parameters(), options.clip_grad)
        session.scaler.step(session.optimizer)
        session.scaler.update()
        session.optimizer.zero_grad(set_to_none=True)
    except (torch.OutOfMemoryError, MemoryError) as error:
        patch = f", patch {options.patch_size}" if options.spatial_dims == 3 else ""
        raise MrisegError(f"{device} ran out of memory at batch size {options.batch_size}{patch}; "
                          "try a smaller --batch-size or --patch-size (or --amp)") from error
    # one number per step, averaged over ranks; the stop flag travels with it
    reduced = torch.tensor([loss.item(), float(stop_requested)])
    if session.world_size > 1:
        dist.all_reduce(reduced)
        reduced[0] /= session.world_size
    loss_value = reduced[0].item()
    if not math.isfinite(loss_value):
        last = session.run.path / "last.pt"
        kept = f"last good checkpoint kept: {last}" if last.exists() else "no checkpoint written yet"
        raise MrisegError(f"loss became {loss_value} at step {state.global_step + 1} (epoch {epoch + 1}); stopped, "
                          f"{kept}; try a lower --lr or --clip-grad")
    return loss_value, reduced[1].item() > 0


def centre_crop(tensor: Tensor, size: tuple[int, ...]) -> Tensor:
    """Crop the trailing dims to ``size`` (valid-convolution models predict a smaller centre)."""
    if tuple(tensor.shape[-len(size):]) == tuple(size):
        return tensor
    region = [slice((have - want) // 2, (have - want) // 2 + want)
              for have, want in zip(tensor.shape[-len(size):], size)]
    return tensor[(..., *region)]


# --- the end of an epoch and of the run ----------------------------------------------------------------

def end_epoch(session: Session, state: TrainingState, epoch: int, losses: list[float], seconds: float) -> bool:
    """Validate, update the best score, write checkpoints and the log line; True to stop early."""
    options, run = session.options, session.run
    records = validate(session.raw_model, session.val_volumes, session.task, session.loss_fn, options,
                       session.amp_dtype is not None)
    if session.world_size > 1:  # validation cases are spread over the ranks
        gathered: list[list[dict]] = [[] for _ in range(session.world_size)]
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
    dice = [record["dice"] for record in records]
    mean_dice, median_dice = float(np.mean(dice)), float(np.median(dice))
    per_region = dict(zip([region.name for region in session.task.scored_regions()],
                          np.mean([record["channels"] for record in records], axis=0).tolist()))
    session.schedule.end_epoch(mean_dice)
    improved = mean_dice > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_without_gain = mean_dice, epoch + 1, 0
    else:
        state.epochs_without_gain += 1
    entry = {"kind": "epoch", "step": state.global_step, "epoch": epoch + 1,
             "train_loss": float(np.mean(losses)) if losses else None,
             "val_loss": float(np.mean([record["loss"] for record in records])),
             "val_dice_mean": mean_dice, "val_dice_median": median_dice, "val_dice_channels": per_region,
             "lr": session.schedule.at(state.global_step), "epoch_time": round(seconds, 3)}
    run.record(entry)
    if session.is_writer:
        if improved:
            save_checkpoint(run.path / "best.pt", checkpoint_payload(session, state, epoch + 1, 0, training=False))
        save_checkpoint(run.path / "last.pt", checkpoint_payload(session, state, epoch + 1, 0))
        say_epoch(session, entry, improved)
    state.last = {"val_dice_mean": mean_dice, "val_dice_median": median_dice, "val_dice_channels": per_region,
                  "val_cases": {r["case_id"]: r["dice"] for r in records}}
    state.stopped_early = bool(options.patience and state.epochs_without_gain >= options.patience)
    if state.stopped_early and session.is_writer:
        run.say(f"early stop: no gain in validation Dice for {options.patience} epochs")
    return state.stopped_early


def say_epoch(session: Session, entry: dict[str, Any], improved: bool) -> None:
    channels = entry["val_dice_channels"]
    regions = " ".join(f"{n} {d:.4f}" for n, d in channels.items()) if len(channels) > 1 else ""
    train_loss = f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "n/a"
    session.run.say(f"epoch {entry['epoch']}/{session.options.epochs} train loss {train_loss} val loss "
                    f"{entry['val_loss']:.4f} val Dice mean {entry['val_dice_mean']:.4f} median "
                    f"{entry['val_dice_median']:.4f} {regions}{' (best)' if improved else ''} "
                    f"[{entry['epoch_time']:.1f} s]")
    session.run.plot()


def checkpoint_payload(session: Session, state: TrainingState, epoch: int, step_in_epoch: int,
                       training: bool = True) -> dict[str, Any]:
    """best.pt (``training=False``) or last.pt, which adds what ``--resume`` needs."""
    options, cache = session.options, session.cache
    payload = {
        "model": {"name": options.model, "in_channels": len(cache.modalities),
                  "out_channels": session.task.out_channels, "spatial_dims": options.spatial_dims,
                  "options": options.model_options},
        "state_dict": {k: v.detach().cpu() for k, v in session.raw_model.state_dict().items()},
        "preprocess": cache.manifest["params"], "modalities": cache.modalities, "task": session.task.to_dict(),
        "label_info": cache.label_info, "patch_size": list(options.patch_size or []),
        "epoch": epoch, "best_score": state.best_score, "best_epoch": state.best_epoch,
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


def finish(session: Session, state: TrainingState, epoch: int) -> dict[str, Any]:
    """summary.json, the final curves and the closing line."""
    run = session.run
    summary = {"run_dir": str(run.path), "model": session.options.model, "task": session.task.kind,
               "best_val_dice_mean": state.best_score, "best_epoch": state.best_epoch, "epochs_run": epoch + 1,
               "stopped_early": state.stopped_early, "steps": state.global_step,
               "seconds": round(time.monotonic() - session.started, 1), "device": str(session.device),
               "world_size": session.world_size, "best_checkpoint": str(run.path / "best.pt"), "last": state.last}
    if session.is_writer:
        run.plot(force=True)
        write_json_atomic(run.path / "summary.json", summary)
        run.say(f"done: best mean per-volume val Dice {state.best_score:.4f} at epoch {state.best_epoch}; "
                f"{run.path / 'best.pt'}")
    return summary
