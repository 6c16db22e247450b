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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader

from mriseg import log
from mriseg.augment import augment_batch
from mriseg.checkpoint import fold_folder, save_checkpoint
from mriseg.devices import choose_device
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import refuse_output_over_inputs, write_json_atomic
from mriseg.inference.context import context_channels
from mriseg.losses import deep_supervision_loss
from mriseg.train.budget import budget_for_run, format_seconds, note_step, parse_duration, plan_epochs
from mriseg.train.folds import fold_count, folds_folder, train_all_folds
from mriseg.train.postprocess import forget_postprocessing
from mriseg.train.options import TrainOptions, fresh_options
from mriseg.train.run_folder import (RunFolder, library_versions, point_latest_at, prepare_run_dir, resolve_run_dir,
                                     resumed_options)
from mriseg.train.sampling import StepBatches
from mriseg.train.session import Session, TrainingState, checkpoint_payload, set_up
from mriseg.train.signals import StopRequested
from mriseg.train.validation import validate


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
    started = time.monotonic()  # --time counts set-up and preprocessing too
    if "time_limit" in settings:
        settings["time_limit"] = parse_duration(settings["time_limit"])
    count = fold_count(settings, out, resume)
    if count is not None:  # cross-validation: --out holds one run per fold
        base = folds_folder(out, model or "unet", resume)
        if "fold" not in settings:
            return train_all_folds(train, count, data, model, base, resume, overwrite, settings)
        out = fold_folder(base, settings["fold"])
        forget_postprocessing(base)  # a fold that trains changes the folds: their earlier decision no longer holds
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets WORLD_SIZE / RANK / LOCAL_RANK
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None
    run_dir = resolve_run_dir(out, model or "unet", resume, overwrite)
    if resume:
        options, saved_data, checkpoint = resumed_options(run_dir, settings, rank == 0)
        refuse_other_run(run_dir, data, saved_data, model, options.model)
        data = saved_data
    else:
        options, checkpoint = fresh_options(model, settings, choose_device(settings.get("device", "auto")).type), None
        if data is not None:
            refuse_output_over_inputs(run_dir, [data])
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
        return run_training(data, run, options, checkpoint, device, rank, world_size, resume, started)
    except MrisegError:
        run.close()
        if rank == 0 and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise
    finally:
        run.close()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def refuse_other_run(run_dir: Path, data: Any, saved_data: str | None, model: str | None, saved_model: str) -> None:
    """``--resume`` continues the run on its own data and model: a DATA or --model that differ
    would be ignored, so they are refused rather than silently dropped."""
    if data is not None and (saved_data is None or Path(data).resolve() != Path(saved_data).resolve()):
        own = saved_data or "the embedded default dataset"
        raise BadInputError(Path(data), f"--resume continues {run_dir} on its own data ({own}); leave DATA out, "
                                        "or start a new run with --out")
    if model is not None and model != saved_model:
        raise MrisegError(f"--model {model}: --resume continues {run_dir}, a {saved_model} run; leave --model "
                          "out, or start a new run with --out")


def run_training(data: Any, run: RunFolder, options: TrainOptions, checkpoint: dict | None, device: torch.device,
                 rank: int, world_size: int, resume: bool, started: float | None = None) -> dict[str, Any]:
    """Set up, then per epoch: the steps, validation on whole volumes, checkpoints and early stop."""
    budget = budget_for_run(options.time_limit, started or time.monotonic(), checkpoint)
    session = set_up(data, run, options, checkpoint, device, rank, world_size, resume)
    session.budget = budget
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


def start_run(session: Session, state: TrainingState, data: Any, resume: bool) -> None:
    """config.json (a new run), runs/latest, and the first lines of the log."""
    run, options, task = session.run, session.options, session.task
    run.open(state.global_step if resume else None)
    if not session.is_writer:
        return
    if not resume:
        write_json_atomic(run.path / "config.json", {
            "data": str(data) if data is not None else None, "cache": str(session.cache.path),
            "options": options.to_dict(), "task": task.to_dict(),
            "in_channels": context_channels(len(session.cache.modalities), options.context),
            "modalities": session.cache.modalities, "preprocess": session.cache.manifest["params"],
            "train_cases": session.train_ids, "val_cases": session.val_ids, "device": str(session.device),
            "world_size": session.world_size, "precision": session.precision.describe(),
            "workers": session.workers, "versions": library_versions(),
            "plan": session.plan.to_dict() if session.plan is not None else None,
            "started": datetime.datetime.now().isoformat(timespec="seconds")})
        point_latest_at(run.path)
    run.say(f"precision: {session.precision.describe()}")
    if session.plan is not None and not resume:
        run.say("plan for the time budget (mriseg plan prints it; options given always win): "
                + "; ".join(session.plan.reasons))
        for warning in session.plan.warnings:
            log.warn(warning)
    run.say(session.description)
    run.say(f"run folder: {run.path}" + (f" (resuming at epoch {state.epoch + 1}, step {state.global_step})"
                                         if resume else ""))
    ranks = f" x {session.world_size} ranks" if session.world_size > 1 else ""
    run.say(f"{options.model} {options.spatial_dims}D, task {task.kind} ({', '.join(task.channel_names)}), "
            f"loss {options.loss}, {len(session.train_ids)} train / {len(session.val_ids)} val cases, "
            f"{options.steps_per_epoch} steps of {options.batch_size}{ranks} per epoch, device {session.device}"
            f"{f', amp {session.precision.dtype}' if session.precision.dtype else ''}")


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
        out_of_time = session.budget is not None and session.budget.out_of_time()
        loss, stop_now, time_up = train_step(session, state, batch, lr, stop.requested, epoch, out_of_time)
        state.global_step += 1
        losses.append(loss)
        step_time, step_end = time.monotonic() - step_end, time.monotonic()
        if session.budget is not None:
            note_step(session, state, epoch, step_time)
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
        if time_up:
            if session.is_writer:
                run.say(f"time budget: ending epoch {epoch + 1} after step {step_in_epoch + 1} of "
                        f"{options.steps_per_epoch} to validate and checkpoint before the deadline")
            break
    return losses


def train_step(session: Session, state: TrainingState, batch: tuple[Tensor, Tensor, Tensor], lr: float,
               stop_requested: bool, epoch: int, out_of_time: bool = False) -> tuple[float, bool, bool]:
    """Forward, loss, backward, optimiser step; returns the loss averaged over ranks, the stop flag and
    the out-of-time flag (each true on every rank when true on one)."""
    options, device = session.options, session.device
    images, labels, weights = (tensor.to(device, non_blocking=True) for tensor in batch)
    weights = weights if weights.numel() else None
    if session.augment.enabled:  # seeded by (seed, step, rank): a resumed run augments the same way
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [options.seed, state.global_step, session.rank]).generate_state(1)[0]))
        images, labels, weights = augment_batch(images, labels, session.augment, generator, weights,
                                                slices=2 * session.options.context + 1)
    if session.precision.channels_last:
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
    # one number per step, averaged over ranks; the stop and out-of-time flags travel with it
    reduced = torch.tensor([loss.item(), float(stop_requested), float(out_of_time)], device=device)  # NCCL: on GPU
    if session.world_size > 1:
        dist.all_reduce(reduced)
        reduced[0] /= session.world_size
    loss_value = reduced[0].item()
    if not math.isfinite(loss_value):
        last = session.run.path / "last.pt"
        kept = f"last good checkpoint kept: {last}" if last.exists() else "no checkpoint written yet"
        raise MrisegError(f"loss became {loss_value} at step {state.global_step + 1} (epoch {epoch + 1}); stopped, "
                          f"{kept}; try a lower --lr or --clip-grad")
    return loss_value, reduced[1].item() > 0, reduced[2].item() > 0


def centre_crop(tensor: Tensor, size: tuple[int, ...]) -> Tensor:
    """Crop the trailing dims to ``size`` (valid-convolution models predict a smaller centre)."""
    if tuple(tensor.shape[-len(size):]) == tuple(size):
        return tensor
    region = [slice((have - want) // 2, (have - want) // 2 + want)
              for have, want in zip(tensor.shape[-len(size):], size)]
    return tensor[(..., *region)]


# --- the end of an epoch and of the run ----------------------------------------------------------------

def end_epoch(session: Session, state: TrainingState, epoch: int, losses: list[float], seconds: float) -> bool:
    """Validate, update the best score, write checkpoints and the log line; True to stop."""
    options, run, budget = session.options, session.run, session.budget
    entry: dict[str, Any] = {"kind": "epoch", "step": state.global_step, "epoch": epoch + 1,
                             "train_loss": float(np.mean(losses)) if losses else None}
    improved = record_validation(session, state, entry) if session.val_ids else False
    entry.update(lr=session.schedule.at(state.global_step), epoch_time=round(seconds, 3))
    run.record(entry)
    if session.is_writer:
        written = time.monotonic()
        if improved:
            save_checkpoint(run.path / "best.pt", checkpoint_payload(session, state, epoch + 1, 0, training=False))
        save_checkpoint(run.path / "last.pt", checkpoint_payload(session, state, epoch + 1, 0))
        if budget is not None:
            budget.checkpoint_writes.append(time.monotonic() - written)
            budget.spent["checkpoints"] += budget.checkpoint_writes[-1]
        say_epoch(session, entry, improved)
    state.stopped_early = bool(session.val_ids and options.patience and state.epochs_without_gain >= options.patience)
    if state.stopped_early and session.is_writer:
        run.say(f"early stop: no gain in validation Dice for {options.patience} epochs")
    if budget is not None and not state.stopped_early and epoch + 1 < options.epochs \
            and plan_epochs(session, state, epoch + 1) <= epoch + 1:
        if session.is_writer:
            run.say(f"time budget: no further epoch fits in the {format_seconds(budget.left())} left")
        return True
    return state.stopped_early


def record_validation(session: Session, state: TrainingState, entry: dict[str, Any]) -> bool:
    """Validate every validation case, add the scores to ``entry`` and the state; True if improved."""
    started = time.monotonic()
    records = validate(session.raw_model, session.val_volumes, session.task, session.loss_fn, session.options,
                       session.precision)
    if session.world_size > 1:  # validation cases are spread over the ranks
        gathered: list[list[dict]] = [[] for _ in range(session.world_size)]
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
    if session.budget is not None:
        session.budget.validations.append(time.monotonic() - started)
        session.budget.spent["validation"] += session.budget.validations[-1]
    dice = [record["dice"] for record in records]
    mean_dice, median_dice = float(np.mean(dice)), float(np.median(dice))
    per_region = dict(zip([region.name for region in session.task.scored_regions()],
                          np.mean([record["channels"] for record in records], axis=0).tolist()))
    session.schedule.end_epoch(mean_dice)
    improved = mean_dice > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_without_gain = mean_dice, entry["epoch"], 0
    else:
        state.epochs_without_gain += 1
    entry.update(val_loss=float(np.mean([record["loss"] for record in records])), val_dice_mean=mean_dice,
                 val_dice_median=median_dice, val_dice_channels=per_region)
    state.last = {"val_dice_mean": mean_dice, "val_dice_median": median_dice, "val_dice_channels": per_region,
                  "val_cases": {r["case_id"]: r["dice"] for r in records}}
    return improved


def say_epoch(session: Session, entry: dict[str, Any], improved: bool) -> None:
    train_loss = f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "n/a"
    total = session.options.epochs if session.budget is None else f"~{max(session.planned_epochs, entry['epoch'])}"
    if "val_dice_mean" in entry:
        channels = entry["val_dice_channels"]
        regions = " ".join(f"{n} {d:.4f}" for n, d in channels.items()) if len(channels) > 1 else ""
        validation = (f"val loss {entry['val_loss']:.4f} val Dice mean {entry['val_dice_mean']:.4f} median "
                      f"{entry['val_dice_median']:.4f} {regions}{' (best)' if improved else ''} ")
    else:
        validation = "(no validation) "
    session.run.say(f"epoch {entry['epoch']}/{total} train loss {train_loss} {validation}"
                    f"[{entry['epoch_time']:.1f} s]")
    session.run.plot()


def finish(session: Session, state: TrainingState, epoch: int) -> dict[str, Any]:
    """summary.json, the final curves and the closing line (with how the time budget was spent)."""
    run, budget = session.run, session.budget
    validated = bool(session.val_ids)
    model_file = run.path / ("best.pt" if validated else "last.pt")
    summary = {"run_dir": str(run.path), "model": session.options.model, "task": session.task.kind,
               "best_val_dice_mean": state.best_score if validated else None,
               "best_epoch": state.best_epoch if validated else None, "epochs_run": epoch + 1,
               "stopped_early": state.stopped_early, "steps": state.global_step, "validated": validated,
               "seconds": round(time.monotonic() - session.started, 1), "device": str(session.device),
               "world_size": session.world_size, "best_checkpoint": str(model_file), "last": state.last}
    if budget is not None:
        summary.update(time_limit_s=budget.seconds, time_used_s=round(budget.used(), 1), time_account=budget.account())
    if session.is_writer:
        run.plot(force=True)
        write_json_atomic(run.path / "summary.json", summary)
        if budget is not None:
            run.say(budget.account())
        if validated:
            run.say(f"done: best mean per-volume val Dice {state.best_score:.4f} at epoch {state.best_epoch}; "
                    f"{model_file}")
        else:
            run.say(f"done: no validation was run (--val-fraction 0: every case trained); the model is {model_file}")
    return summary
