"""The recipe of a ``--time`` run given no recipe options: a written rule from the cache's fingerprint,
the budget, and this device's measured step time and free memory (``mriseg plan`` prints it).

The rule (docs/training.md says why each line is what it is, with the measurements):

1. network: the 2D U-Net on slices; on a CPU 16 base features and lr 3e-3 (the full width is 4x
   slower a step and learned less in minutes); elsewhere the registry's width and lr 1e-3;
2. window: whole slices, padded to the smallest size the network accepts (native resolution); past
   128 per axis on a CPU (256 elsewhere) foreground-biased crops of that size; 3D: the median
   volume, at most 128 per axis;
3. batch: 8 slices on a CPU, 16 on a GPU, 2 patches for 3D; halved (then, for 3D, the patch) until
   the estimated step (:mod:`mriseg.models.memory`) fits in 80 % of the free memory, else refused;
4. epochs: as long as a pass over the training slices, or longer, so that a validation costs at most
   5 % of the training between two, and short enough that the budget holds two (the measured step
   time and the validation estimate decide); the lr decays (poly) to zero at the planned last step.

Options given on the command line always win; each reason says which line of the rule chose what.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mriseg.devices import choose_precision
from mriseg.errors import MrisegError
from mriseg.inference.windows import accepted_at_most
from mriseg.models import build_model
from mriseg.models.memory import training_step_bytes
from mriseg.options import available_memory
from mriseg.train.budget import format_seconds, validation_estimate
from mriseg.train.options import TrainOptions, default_patch_size

LARGEST_SLICE = 256
CPU_WINDOW = 128
MEMORY_SHARE = 0.8
VALIDATION_SHARE = 0.05
TIMED_STEPS = 3
FEW_STEPS = 100
TIMING_SHARE = 0.03


@dataclass
class Plan:
    """What the plan chose (only options not given), why, and what it measured."""

    chosen: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def choose(self, options: TrainOptions, name: str, value: Any, why: str, given: Sequence[str]) -> None:
        if name in given:
            self.reasons.append(f"{name} {show(getattr(options, name))}: given")
            return
        setattr(options, name, value)
        self.chosen[name] = value
        self.reasons.append(f"{name} {show(value)}: {why}")

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": {k: list(v) if isinstance(v, tuple) else v for k, v in self.chosen.items()},
                "reasons": self.reasons, "measured": self.measured, "warnings": self.warnings}


def show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(model default)"
    return str(value)


def plan_for_ranks(options: TrainOptions, device: torch.device, train_volumes: list, val_volumes: list,
                   in_channels: int, out_channels: int, rank: int, world_size: int) -> Plan:
    """Rank 0 plans (its own step time, memory and validation shard) and every rank takes its plan,
    so that all ranks run the same steps with the same batch and window."""
    plan = plan_recipe(options, options.given or [], device, train_volumes, val_volumes, in_channels,
                       out_channels, world_size) if rank == 0 else None
    if world_size > 1:
        import torch.distributed as dist

        shared = [plan]
        dist.broadcast_object_list(shared, src=0)
        plan = shared[0]
        for name, value in plan.chosen.items():
            setattr(options, name, value)
    return plan


def plan_recipe(options: TrainOptions, given: Sequence[str], device: torch.device, train_volumes: list,
                val_volumes: list, in_channels: int, out_channels: int, world_size: int = 1) -> Plan:
    """Fill in every recipe option not ``given`` (see the module docstring), in place; the plan."""
    plan, cpu = Plan(), device.type == "cpu"
    if "model" not in given and "spatial_dims" not in given:
        plan.choose(options, "model", "unet", "2D U-Net on slices (the dimensionality that won at CPU budgets)",
                    given)
    if options.model == "unet" and options.spatial_dims == 2 and cpu:
        if "features" not in options.model_options:
            options.model_options = {**options.model_options, "features": 16}
            plan.chosen["model_options"] = options.model_options
            plan.reasons.append("features 16: on a CPU the full-width U-Net is 4x slower a step")
        plan.choose(options, "lr", 3e-3, "Adam, decayed (poly) to zero at the planned last step", given)
    network = build_model(options.model, in_channels, out_channels, spatial_dims=options.spatial_dims,
                          **options.model_options)
    plan_window(plan, options, network, train_volumes, given, CPU_WINDOW if cpu else LARGEST_SLICE)
    batch = (8 if cpu else 16) if options.spatial_dims == 2 else 2
    plan.choose(options, "batch_size", batch, f"{'slices' if options.spatial_dims == 2 else 'patches'} per step "
                                              f"on a {device.type.upper()}", given)
    fit_memory(plan, options, network, in_channels, device, given, train_volumes[0].in_plane_shape)
    step = measure_step(network, options, in_channels, out_channels, device, train_volumes[0].in_plane_shape)
    plan_epochs(plan, options, train_volumes, val_volumes, step, given, world_size)
    return plan


def plan_window(plan: Plan, options: TrainOptions, network: nn.Module, volumes: list, given: Sequence[str],
                largest_window: int) -> None:
    """Whole slices at native resolution (padded to what the network accepts) or, past
    ``largest_window`` on an axis, crops of the largest accepted size below it; or the 3D patch."""
    window = default_patch_size(network, volumes, options.spatial_dims)
    if options.spatial_dims == 3:
        plan.choose(options, "patch_size", window, "the median volume, at most 128 per axis", given)
        return
    largest = tuple(max(v.in_plane_shape[a] for v in volumes) for a in range(2))
    whole = window or largest
    axis_ok = getattr(getattr(network, "size_rule", None), "axis_ok", None)
    capped = tuple(n if n <= largest_window else accepted_at_most(largest_window, axis_ok, axis)
                   for axis, n in enumerate(whole))
    if capped == whole and window is None:
        plan.reasons.append(f"whole slices of {show(largest)}: every slice has one size the network takes")
        return
    why = (f"the largest slice, {show(largest)}, padded to a size the network takes" if capped == whole
           else f"crops of native slices up to {show(largest)}, a third centred on tumour (a whole "
                f"{show(whole)} slice costs {np.prod(whole) / np.prod(capped):.1f}x the step)")
    plan.choose(options, "patch_size", capped, why, given)


def step_bytes(network: nn.Module, options: TrainOptions, in_channels: int, window: Sequence[int],
               device: torch.device) -> int | None:
    """:func:`~mriseg.models.memory.training_step_bytes`, or None where the network cannot run on the
    meta device (an operation without a meta kernel): then the real step's own error speaks."""
    try:
        return training_step_bytes(network, in_channels, window, options.batch_size, activation_bytes(options, device))
    except (RuntimeError, NotImplementedError):
        return None


def activation_bytes(options: TrainOptions, device: torch.device) -> int:
    """2 under 16-bit autocast (the device's default precision or --amp), else 4."""
    return 2 if choose_precision(device, options.amp, options.channels_last).dtype is not None else 4


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":  # memory PyTorch holds in its cache is free to this process
        return int(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                   - torch.cuda.memory_allocated(device))
    return available_memory()


def fit_memory(plan: Plan, options: TrainOptions, network: nn.Module, in_channels: int, device: torch.device,
               given: Sequence[str], whole_slice: tuple[int, ...]) -> None:
    """Halve the batch, then the 3D patch, until a step fits in 80 % of the free memory."""
    free = free_memory(device)
    window = tuple(options.patch_size or whole_slice)
    needed = step_bytes(network, options, in_channels, window, device)
    while free is not None and needed is not None and needed > MEMORY_SHARE * free:
        if options.batch_size > 1 and "batch_size" not in given:
            options.batch_size = plan.chosen["batch_size"] = options.batch_size // 2
        elif options.spatial_dims == 3 and "patch_size" not in given and max(window) > 32:
            largest = int(np.argmax(window))
            axis_ok = getattr(getattr(network, "size_rule", None), "axis_ok", None)
            window = tuple(accepted_at_most(n // 2, axis_ok, axis) if axis == largest else n
                           for axis, n in enumerate(window))
            options.patch_size = plan.chosen["patch_size"] = window
        else:
            raise memory_error(options, window, needed, free, device, "")
        needed = step_bytes(network, options, in_channels, window, device)
    plan.measured.update(step_memory_bytes=needed, free_memory_bytes=free)
    plan.reasons.append((f"memory: a step needs about {needed / 2**20:.0f} MiB" if needed is not None
                         else "memory: not estimated (the network does not run on the meta device)")
                        + (f" of {free / 2**30:.1f} GiB free" if free is not None else ""))


def refuse_what_cannot_fit(network: nn.Module, options: TrainOptions, in_channels: int, window: tuple[int, ...],
                           device: torch.device) -> None:
    """One line, before the first step, where a step would not fit into the free memory (without it,
    batch 16 of 128^3 patches was killed by the kernel at 24 GB with no word from mriseg)."""
    free = free_memory(device)
    needed = step_bytes(network, options, in_channels, window, device)
    if free is not None and needed is not None and needed > free:
        raise memory_error(options, window, needed, free, device, " (or --time T alone, which plans a run that fits)")


def memory_error(options: TrainOptions, window: Sequence[int], needed: int, free: int, device: torch.device,
                 hint: str) -> MrisegError:
    """The one line for a training step that does not fit into the free memory."""
    return MrisegError(f"a training step of {options.model} ({options.spatial_dims}D, batch {options.batch_size} of "
                       f"{show(window)}) would need about {needed / 2**30:.1f} GiB; {free / 2**30:.1f} GiB of "
                       f"{device.type} memory is free: give a smaller --batch-size or --patch-size{hint}")


def measure_step(network: nn.Module, options: TrainOptions, in_channels: int, out_channels: int,
                 device: torch.device, whole_slice: tuple[int, ...]) -> float:
    """Seconds of one training step (forward, backward, Adam) of ``network`` on random data of the
    planned batch, on ``device`` in its precision: the median of a few steps after a warm-up."""
    network = network.to(device)
    precision = choose_precision(device, options.amp, options.channels_last)
    precision.apply(network, options.spatial_dims)
    window = tuple(options.patch_size or whole_slice)
    images = torch.randn((options.batch_size, in_channels, *window), device=device)
    images = images.contiguous(memory_format=precision.memory_format(options.spatial_dims))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    times: list[float] = []
    limit = TIMING_SHARE * (options.time_limit or float("inf"))
    while len(times) < TIMED_STEPS + 1 and (len(times) < 2 or sum(times) < limit):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=precision.dtype or torch.float32, enabled=precision.dtype is not None):
            output = network(images)
        output = output[0] if isinstance(output, (list, tuple)) else output
        output.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        if len(times) == 1 and times[0] > 3 * limit:  # the warm-up alone spent far more than the timing's share
            break
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return float(np.median(times[1:] or times))


def plan_epochs(plan: Plan, options: TrainOptions, train_volumes: list, val_volumes: list, step: float,
                given: Sequence[str], world_size: int = 1) -> None:
    """Epochs as long as a pass over the data, or longer so that a validation costs at most 5 % of
    the training between two, and short enough for the budget to hold two."""
    budget = options.time_limit or 0.0
    if options.spatial_dims == 2:
        natural = math.ceil(sum(v.slices for v in train_volumes) / (options.batch_size * world_size))
    else:
        natural = math.ceil(8 * len(train_volumes) / (options.batch_size * world_size))
    validation = validation_estimate([tuple(v.image.shape[1:]) for v in val_volumes], [v.slices for v in val_volumes],
                                     options.spatial_dims, options.batch_size, options.patch_size, step)
    steps = max(natural, math.ceil(validation / VALIDATION_SHARE / step))
    steps = max(1, min(steps, int((budget - 2 * validation) / (2 * step))))
    plan.measured.update(step_seconds=round(step, 4), validation_seconds=round(validation, 1),
                         steps_in_budget=int(budget / step))
    if budget / step < FEW_STEPS:
        plan.warnings.append(f"the budget holds only about {int(budget / step)} steps of {options.model} "
                             f"({options.spatial_dims}D) at {step:.1f} s a step: too few to learn from; give more "
                             "--time, or a smaller --model / --patch-size / --batch-size")
    plan.choose(options, "steps_per_epoch", steps,
                f"{format_seconds(validation)} a validation of {len(val_volumes)} case(s) at the measured "
                f"{step * 1000:.0f} ms/step; the budget holds about {int(budget / step)} steps", given)


def plan_training(data: str, time_limit: str | float, model: str | None = None, **settings: Any) -> Plan:
    """The plan ``mriseg train DATA --time T`` would train with (the Python form of ``mriseg plan``):
    DATA must be a preprocess cache; ``settings`` are train options taken as given."""
    from pathlib import Path

    from mriseg.data.cache import open_cache
    from mriseg.devices import choose_device
    from mriseg.errors import BadInputError
    from mriseg.inference.context import context_channels
    from mriseg.train.budget import parse_duration
    from mriseg.train.options import fresh_options
    from mriseg.train.sampling import load_volumes, split_cases
    from mriseg.train.validation import resolve_task

    path = Path(data)
    if not path.exists():
        raise BadInputError(path, "no such cache")
    if not (path / "manifest.json").is_file():
        raise BadInputError(path, "is not a cache made by mriseg preprocess (no manifest.json); plan reads a cache")
    device = choose_device(settings.get("device", "auto"))
    options = fresh_options(model, {**settings, "time_limit": parse_duration(time_limit)}, device.type)
    cache = open_cache(path)
    labelled = [case for case in cache.case_ids if cache.record(case).get("has_label")]
    if len(labelled) < 2:
        raise BadInputError(path, f"needs at least 2 labelled cases to train and validate, has {len(labelled)}")
    train_ids, val_ids = split_cases(labelled, options)
    task = resolve_task(cache.label_info, options.task, options.ignore_index, path)
    volumes = [load_volumes(cache, ids, options.spatial_dims, options.uniform_share, False, options.ignore_index)
               for ids in (train_ids, val_ids)]
    plan = plan_recipe(options, options.given or [], device, volumes[0], volumes[1],
                       context_channels(len(cache.modalities), options.context), task.out_channels)
    plan.measured.update(device=str(device), train_cases=len(train_ids), val_cases=len(val_ids),
                         time_limit_s=options.time_limit)
    return plan
