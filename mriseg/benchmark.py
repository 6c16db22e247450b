"""One device against a split across two: naive split, pipeline, data parallel.

Seed 000 put the encoder of a U-Net on one GPU and the decoder on another and
got a slower step than on one GPU. This module measures why, and what helps:

* **single**: the whole model on the first device;
* **naive split**: the model's stages cut into two groups, one per device,
  the whole batch going through them one after the other (the seed's setup);
* **pipelined split**: the batch cut into micro-batches so that both devices
  work at once (``torch.distributed.pipelining``, GPipe or 1F1B schedule);
* **data parallel**: ``DistributedDataParallel`` over the same devices.

Every "device" is one process (``torch.multiprocessing`` spawn, one rank
each). ``cpu`` devices use the gloo backend and one thread per process, so a
two-core machine stands in for two GPUs; CUDA devices use NCCL. Two stages on
the same CUDA device (``--gpus 0,0``) run in one process with a multi-stage
schedule, which measures what the pipeline machinery costs without any
parallelism. Stage groups come from ``model.pipeline_stages()`` (see
docs/architecture.md); skip tensors that cross the cut are sent with the
activations, never recomputed.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mriseg import options as checks
from mriseg.files import atomic_path
from mriseg.errors import MrisegError
from mriseg.log import info

SPLITS = ("encoder-decoder", "balanced")
SCHEDULES = ("gpipe", "1f1b")
DATA_PARALLEL_ADVICE = (
    "Data parallelism is the better choice whenever the model and a batch fit on one device; "
    "pipelining is for models or volumes that do not."
)

ModelFactory = Callable[[], nn.Module]


# --- configuration ----------------------------------------------------------------------------


@dataclass
class BenchmarkConfig:
    """What to measure. ``devices`` holds torch device names, one per process (``cpu`` or ``cuda:N``)."""

    model: str = "unet"
    devices: list[str] = field(default_factory=lambda: ["cpu", "cpu"])
    batch_size: int = 8
    input_size: tuple[int, ...] = (128, 128)
    in_channels: int | None = None  # None: 3 for 2D input (LGG), 4 for 3D input (BraTS)
    out_channels: int = 1
    features: int | None = None  # the model's width option; None: the model's default
    micro_batches: tuple[int, ...] = (2, 4, 8)
    splits: tuple[str, ...] = SPLITS
    schedules: tuple[str, ...] = SCHEDULES
    steps: int = 5
    warmup: int = 2
    amp: bool = False
    seed: int = 0
    # Both stage groups in one process (multi-stage schedule). None: only when the two devices are one GPU.
    colocated: bool | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.input_size)

    @property
    def channels(self) -> int:
        if self.in_channels is not None:
            return self.in_channels
        return 4 if self.spatial_dims == 3 else 3

    @property
    def one_process(self) -> bool:
        """Two stages in one process: no parallelism, so it measures what the machinery costs."""
        if self.colocated is not None:
            return self.colocated and len(self.devices) == 2
        return len(self.devices) == 2 and self.devices[0] == self.devices[1] and self.devices[0] != "cpu"

    @property
    def world_size(self) -> int:
        return 1 if self.one_process else len(self.devices)


def parse_devices(gpus: str | None, devices: str | None) -> list[str]:
    """Turn ``--gpus 0,1`` or ``--devices cpu,cpu`` into torch device names, checking they exist.

    With neither, the first two GPUs when there are two, else two CPU processes.
    """
    if gpus is not None and devices is not None:
        raise MrisegError("give --gpus (e.g. --gpus 0,1) or --devices (e.g. --devices cpu,cpu), not both")
    if gpus is None and devices is None:
        return ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cpu", "cpu"]
    if gpus is not None:
        names = [f"cuda:{item.strip()}" for item in gpus.split(",")]
    else:
        names = [item.strip().lower() for item in devices.split(",")]  # type: ignore[union-attr]
    if not 1 <= len(names) <= 2:
        raise MrisegError(f"benchmark compares one device with two; got {len(names)} devices: {','.join(names)}")
    available = torch.cuda.device_count()
    for name in names:
        if name == "cpu":
            continue
        index = name.removeprefix("cuda:")
        if not name.startswith("cuda:") or not index.isdigit():
            raise MrisegError(f"unknown device {name!r}: use cpu or cuda:N (or --gpus N,M)")
        if int(index) >= available:
            found = "no CUDA GPU" if available == 0 else f"only {available} CUDA GPU(s)"
            raise MrisegError(f"device {name} is not there: this machine has {found}; "
                              "use --devices cpu,cpu to run the same comparison on two CPU processes")
    if "cpu" in names and any(name != "cpu" for name in names):
        raise MrisegError("mix of cpu and cuda devices: compare like with like (--devices cpu,cpu or --gpus 0,1)")
    return names


def validate(config: BenchmarkConfig, model: nn.Module | None = None) -> None:
    """Raise MrisegError for a configuration that cannot run, before any process starts."""
    checks.number("batch_size", config.batch_size, integer=True, low=1, high=65_536)
    checks.sizes("input_size", config.input_size, count=(2, 3), largest=4096)
    checks.number("steps", config.steps, integer=True, low=1, high=100_000)
    checks.number("warmup", config.warmup, integer=True, low=0, high=100_000)
    checks.number("in_channels", config.in_channels, integer=True, low=1, high=4096, optional=True)
    checks.number("out_channels", config.out_channels, integer=True, low=1, high=4096)
    checks.number("features", config.features, integer=True, low=1, high=1024, optional=True)
    checks.number("seed", config.seed, integer=True, low=0, high=2**32 - 1)
    if not config.micro_batches or not config.splits or not config.schedules:
        raise MrisegError("--micro-batches, --split and --schedule each need at least one value")
    checks.require_memory(f"a batch of {config.batch_size} x {config.channels} x "
                          f"{'x'.join(map(str, config.input_size))}",
                          4.0 * config.batch_size * config.channels * float(math.prod(config.input_size)))
    too_many = [m for m in config.micro_batches if m > config.batch_size]
    if too_many:
        raise MrisegError(f"--micro-batches {','.join(map(str, too_many))} is more than the batch of "
                          f"{config.batch_size} samples: each micro-batch needs at least one sample")
    if any(m < 1 for m in config.micro_batches):
        raise MrisegError(f"--micro-batches must be positive, got {config.micro_batches}")
    for split in config.splits:
        if split not in SPLITS:
            raise MrisegError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    for schedule in config.schedules:
        if schedule not in SCHEDULES:
            raise MrisegError(f"unknown schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    if model is not None:
        check_input = getattr(model, "check_input", None)
        if check_input is not None:  # the registry's models name the sizes that would fit
            check_input(torch.empty(config.batch_size, config.channels, *config.input_size, device="meta"))
        stages = model_stages(model, config.model)
        if len(config.devices) == 2 and len(stages) < 2:
            raise MrisegError(f"model {config.model!r} has only {len(stages)} stage: nothing to split")


def model_stages(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The model's ``pipeline_stages()``, or a clear error when it has none."""
    get_stages = getattr(model, "pipeline_stages", None)
    if get_stages is None:
        raise MrisegError(f"model {name!r} cannot be split: it has no pipeline_stages() "
                          "(see docs/architecture.md, 'Model stages')")
    stages = list(get_stages())
    if not stages:
        raise MrisegError(f"model {name!r} cannot be split: pipeline_stages() is empty")
    return stages


def registry_factory(config: BenchmarkConfig) -> ModelFactory:
    """A picklable factory that builds ``config.model`` from the registry."""
    options = {} if config.features is None else {"features": config.features}
    return _RegistryModel(config.model, config.channels, config.out_channels, config.spatial_dims, options)


@dataclass
class _RegistryModel:
    name: str
    in_channels: int
    out_channels: int
    spatial_dims: int
    options: dict[str, Any]

    def __call__(self) -> nn.Module:
        from mriseg.models import build_model

        return build_model(self.name, self.in_channels, self.out_channels, spatial_dims=self.spatial_dims,
                           **self.options)


# --- stage groups -----------------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    A skip tensor's gradient comes back from ``torch.cat`` as a strided view;
    gloo refuses to send non-contiguous tensors, so the gradient that leaves a
    stage through its inputs must be made contiguous first.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grads(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Route every tensor that needs a gradient through :class:`_ContiguousGrad`."""
    return tuple(_ContiguousGrad.apply(t) if t.requires_grad else t for t in tensors)


class StageGroup(nn.Module):
    """Consecutive model stages run as one pipeline stage.

    Input: the tensors the first stage takes (``(x,)`` for the model's first stage).
    Output: the tensors the next group needs, or the logits when ``last``.
    """

    def __init__(self, stages: Sequence[tuple[str, nn.Module]], last: bool,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.names = [name for name, _ in stages]
        self.stages = nn.ModuleList(module for _, module in stages)
        self.last = last
        self.autocast_dtype = autocast_dtype

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tensors = contiguous_grads(tensors)
        device_type = tensors[0].device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            for stage in self.stages:
                tensors = tuple(stage(tensors))
        if self.last:
            return tensors[0].float()
        return tensors


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a fill-drain pipeline: (p-1)/(m+p-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def predicted_step_time(group_times: Sequence[tuple[float, float]], micro_batches: int, schedule: str) -> float:
    """Compute-only step time of a pipeline from per-micro-batch (forward, backward) times of each group.

    GPipe fills and drains forwards, then backwards; 1F1B alternates, so its
    steady state is paced by the slowest forward+backward. Transfers are not
    included: the prediction is what the stage times alone allow.
    """
    forwards = [f for f, _ in group_times]
    backwards = [b for _, b in group_times]
    extra = micro_batches - 1
    if schedule == "gpipe":
        return sum(forwards) + extra * max(forwards) + sum(backwards) + extra * max(backwards)
    return sum(forwards) + sum(backwards) + extra * max(f + b for f, b in group_times)


def balanced_cut(stage_times: Sequence[float]) -> int:
    """The cut k (groups ``[:k]`` and ``[k:]``) that makes the slower group as fast as possible."""
    total = sum(stage_times)
    best_cut, best_slowest = 1, math.inf
    for cut in range(1, len(stage_times)):
        first = sum(stage_times[:cut])
        slowest = max(first, total - first)
        if slowest < best_slowest:
            best_cut, best_slowest = cut, slowest
    return best_cut


def encoder_decoder_cut(names: Sequence[str]) -> int:
    """Cut before the first decoder stage: encoder and bottleneck on device a, decoder on b (seed 000)."""
    for index, name in enumerate(names):
        if name.startswith("dec"):
            if index == 0:
                break
            return index
    raise MrisegError(f"cannot find the encoder/decoder cut: no stage after the first is named dec* in {list(names)}")


# --- measurement helpers ----------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9)}


def _release_free_memory() -> None:
    """Give memory that glibc holds free back to the system, so a new configuration starts clean."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    if library:
        trim = getattr(ctypes.CDLL(library), "malloc_trim", None)
        if trim is not None:
            trim(0)


class _MemoryMeter:
    """Peak memory of this process's device while a configuration runs.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensor bytes held by the caching allocator's users).
    CPU: growth of the process's peak resident set (Linux VmHWM, reset through
    /proc/self/clear_refs) over its size when the meter started: activations,
    gradients and communication buffers. The workers run with glibc's mmap
    threshold fixed at 1 MiB (see ``_launch``) so that freed tensors leave the
    resident set and each configuration starts from what it really holds.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ("cuda max_memory_allocated" if device.type == "cuda"
                     else "peak RSS growth (VmHWM)")
        self.baseline = 0
        self.supported = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = 0
        elif self.supported:
            try:
                _release_free_memory()
                Path("/proc/self/clear_refs").write_text("5")
                self.baseline = self._status_kib("VmRSS")
            except OSError:
                self.supported = False

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if not self.supported:
            return None
        return max(0, self._status_kib("VmHWM") - self.baseline)


def _make_batch(config: BenchmarkConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random batch on every rank: images and binary targets shaped like the logits."""
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randn(config.batch_size, config.channels, *config.input_size, generator=generator)
    targets = (torch.rand(config.batch_size, config.out_channels, *config.input_size, generator=generator) > 0.5)
    return images.to(device), targets.float().to(device)


def _loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, targets)


def profile_stages(stages: Sequence[tuple[str, nn.Module]], images: torch.Tensor, targets: torch.Tensor,
                   device: torch.device, repeats: int, autocast_dtype: torch.dtype | None = None
                   ) -> list[dict[str, float]]:
    """Forward and backward seconds per stage (median of ``repeats`` after one warm-up) on one device.

    Each stage runs on detached inputs, as it would in a pipeline, so its
    backward can be timed on its own. Also records the bytes each stage hands
    to the next (what a cut after it sends forward) and the bytes autograd
    saves for its backward (activation memory).
    """
    runs: list[list[tuple[float, float, int, int]]] = []
    for _ in range(repeats + 1):
        tensors: tuple[torch.Tensor, ...] = (images,)
        records: list[list[Any]] = []
        kept: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = []
        for _, module in stages:
            inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) if t is not images else t
                           for t in tensors)
            saved: dict[int, int] = {}

            def pack(tensor: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor

            _sync(device)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                    torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                   enabled=autocast_dtype is not None):
                outputs = tuple(module(inputs))
            _sync(device)
            forward = time.perf_counter() - start
            records.append([forward, 0.0, sum(t.nbytes for t in outputs), sum(saved.values())])
            kept.append((inputs, outputs))
            tensors = outputs
        loss = _loss_fn(tensors[0].float(), targets)
        grads: tuple[torch.Tensor | None, ...] = (None,)
        for index in reversed(range(len(stages))):
            inputs, outputs = kept[index]
            _sync(device)
            start = time.perf_counter()
            if index == len(stages) - 1:
                loss.backward()
            else:
                pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            _sync(device)
            records[index][1] = time.perf_counter() - start
            grads = tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs)
        for _, module in stages:
            module.zero_grad(set_to_none=True)
        runs.append([tuple(r) for r in records])  # type: ignore[misc]
    measured = runs[1:]
    return [{"name": name,
             "forward_s": statistics.median(run[i][0] for run in measured),
             "backward_s": statistics.median(run[i][1] for run in measured),
             "output_bytes": measured[0][i][2],
             "saved_activation_bytes": measured[0][i][3],
             "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad)}
            for i, (name, module) in enumerate(stages)]


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a device-to-host-to-device round trip (CUDA) or a memory copy (CPU)."""
    tensor = torch.empty(max(nbytes, 1) // 4 + 1, dtype=torch.float32, device=device)
    timings = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        if device.type == "cuda":
            tensor.to("cpu").to(device)
        else:
            tensor.clone()
        _sync(device)
        timings.append(time.perf_counter() - start)
    hops = 2 if device.type == "cuda" else 1
    return hops * tensor.nbytes / statistics.median(timings[1:])


# --- worker processes -------------------------------------------------------------------------


def _make_stage_class() -> type:
    """A PipelineStage that records when it computes and what it sends (imported lazily)."""
    from torch.distributed.pipelining import PipelineStage

    class _TimedStage(PipelineStage):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.events: list[tuple[int, str, int, float, float]] | None = None
            self.sent_forward = 0
            self.sent_backward = 0

        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            start = self._now()
            output = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
            if not self.is_last:
                self.sent_forward += sum(t.nbytes for t in self.fwd_cache[fwd_chunk_id][0])
            self._record("F", fwd_chunk_id, start)
            return output

        def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> None:
            start = self._now()
            super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
            if not self.is_first:
                self.sent_backward += sum(g.nbytes for g in self.bwd_cache[bwd_chunk_id] if g is not None)
            self._record("B", bwd_chunk_id, start)

        def _now(self) -> float:
            if self.events is not None:
                _sync(self.device)
            return time.perf_counter()

        def _record(self, kind: str, chunk: int, start: float) -> None:
            if self.events is not None:
                self.events.append((self.stage_index, kind, chunk, start, self._now()))

    return _TimedStage


@dataclass
class _Job:
    """Everything a worker needs; pickled to each spawned process."""

    config: BenchmarkConfig
    factory: ModelFactory
    folder: str
    # Set for a one-step gradient check instead of a benchmark: (split cut, micro-batches, schedule).
    gradient_check: tuple[int, int, str] | None = None


def _worker(rank: int, job: _Job) -> None:
    config = job.config
    device = torch.device(config.devices[rank])
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{job.folder}/rendezvous",
                            rank=rank, world_size=config.world_size, device_id=device if backend == "nccl" else None)
    try:
        if job.gradient_check is not None:
            result = _gradient_check(rank, job, device)
        else:
            result = _run_all(rank, job, device)
    except MrisegError as error:
        (Path(job.folder) / f"rank{rank}.error").write_text(str(error))
        raise
    else:
        with atomic_path(Path(job.folder) / f"rank{rank}.pt") as temporary:
            torch.save(result, temporary)
    finally:
        dist.destroy_process_group()


def _fresh_model(job: _Job) -> nn.Module:
    torch.manual_seed(job.config.seed)
    return job.factory()


def _autocast_dtype(config: BenchmarkConfig) -> torch.dtype | None:
    return torch.bfloat16 if config.amp else None


def _my_groups(config: BenchmarkConfig, rank: int, model: nn.Module, cut: int, device: torch.device
               ) -> list[tuple[int, StageGroup]]:
    """(stage index, group) pairs this process runs: one per rank, or both when colocated."""
    stages = model_stages(model, config.model)
    dtype = _autocast_dtype(config)
    groups = [StageGroup(stages[:cut], last=False, autocast_dtype=dtype),
              StageGroup(stages[cut:], last=True, autocast_dtype=dtype)]
    indices = [0, 1] if config.one_process else [rank]
    return [(index, groups[index].to(device)) for index in indices]


def _build_schedule(config: BenchmarkConfig, rank: int, groups: list[tuple[int, StageGroup]], micro_batches: int,
                    schedule: str, device: torch.device) -> tuple[Any, list[Any]]:
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                              ScheduleLoopedBFS)

    stage_class = _make_stage_class()
    stages = [stage_class(group, index, 2, device) for index, group in groups]
    if len(stages) == 1:
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        return kind(stages[0], micro_batches, loss_fn=_loss_fn), stages
    # Both stages in one process: the multi-stage forms of the same two schedules.
    kind = ScheduleLoopedBFS if schedule == "gpipe" else ScheduleInterleaved1F1B
    return kind(stages, micro_batches, loss_fn=_loss_fn), stages


def _timed_steps(config: BenchmarkConfig, device: torch.device, step: Callable[[], None],
                 meter: _MemoryMeter) -> list[float]:
    """Run warm-up then timed steps, each started together on all ranks; seconds per step on this rank.

    The memory meter starts after the warm-up, so one-time set-up is not counted as a step's memory.
    """
    import torch.distributed as dist

    times = []
    for index in range(config.warmup + config.steps):
        if index == config.warmup:
            meter.start()
        dist.barrier()
        start = time.perf_counter()
        step()
        _sync(device)
        if index >= config.warmup:
            times.append(time.perf_counter() - start)
    return times


def _run_single(job: _Job, device: torch.device) -> dict[str, Any]:
    config = job.config
    model = _fresh_model(job).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images, targets = _make_batch(config, device)
    dtype = _autocast_dtype(config)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        _loss_fn(logits.float(), targets).backward()
        optimizer.step()

    meter = _MemoryMeter(device)
    times = _timed_steps(config, device, step, meter)
    return {"times": times, "peak": meter.peak(), "memory_kind": meter.kind}


def _run_split(rank: int, job: _Job, device: torch.device, cut: int, micro_batches: int, schedule: str
               ) -> dict[str, Any]:
    config = job.config
    groups = _my_groups(config, rank, _fresh_model(job), cut, device)
    pipeline, stages = _build_schedule(config, rank, groups, micro_batches, schedule, device)
    parameters = [p for _, group in groups for p in group.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=1e-3)
    images, targets = _make_batch(config, device)
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        pipeline.step(*((images,) if first else ()), target=targets if last else None,
                      return_outputs=False)
        optimizer.step()

    meter = _MemoryMeter(device)
    times = _timed_steps(config, device, step, meter)
    peak = meter.peak()
    # One more step, recorded: the timeline and the bytes sent.
    for stage in stages:
        stage.events, stage.sent_forward, stage.sent_backward = [], 0, 0
    import torch.distributed as dist

    dist.barrier()
    step()
    return {"times": times, "peak": peak, "memory_kind": meter.kind,
            "events": [e for stage in stages for e in stage.events],
            "sent_forward": sum(s.sent_forward for s in stages),
            "sent_backward": sum(s.sent_backward for s in stages)}


def _run_data_parallel(rank: int, job: _Job, device: torch.device) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    config = job.config
    model = _fresh_model(job).to(device)
    parallel = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(parallel.parameters(), lr=1e-3)
    images, targets = _make_batch(config, device)
    my_images = images.tensor_split(config.world_size)[rank]
    my_targets = targets.tensor_split(config.world_size)[rank]
    dtype = _autocast_dtype(config)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = parallel(my_images)
        _loss_fn(logits.float(), my_targets).backward()
        optimizer.step()

    meter = _MemoryMeter(device)
    times = _timed_steps(config, device, step, meter)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"times": times, "peak": meter.peak(), "memory_kind": meter.kind, "allreduce_bytes": gradient_bytes}


def _split_plan(config: BenchmarkConfig, profile: list[dict[str, float]]) -> dict[str, int]:
    names = [record["name"] for record in profile]
    totals = [record["forward_s"] + record["backward_s"] for record in profile]
    cuts = {}
    for split in config.splits:
        cuts[split] = encoder_decoder_cut(names) if split == "encoder-decoder" else balanced_cut(totals)
    return cuts


def _run_all(rank: int, job: _Job, device: torch.device) -> dict[str, Any]:
    """Every configuration, in the same order on every rank; rank 0 alone does single-device work."""
    import torch.distributed as dist

    config = job.config
    result: dict[str, Any] = {"rank": rank, "runs": {}}
    # Per-stage profile at the full batch and at every micro-batch size, on the first device.
    payload: list[Any] = [None]
    if rank == 0:
        info(f"profiling the stages of {config.model} on {device}")
        model = _fresh_model(job).to(device)
        stages = model_stages(model, config.model)
        images, targets = _make_batch(config, device)
        sizes = sorted({config.batch_size} | {math.ceil(config.batch_size / m) for m in config.micro_batches}
                       | ({math.ceil(config.batch_size / config.world_size)} if config.world_size > 1 else set()))
        profiles = {size: profile_stages(stages, images[:size], targets[:size], device, repeats=3,
                                         autocast_dtype=_autocast_dtype(config))
                    for size in sizes}
        info("single device")
        single = _run_single(job, device)
        payload = [{"profiles": profiles, "single": single, "cuts": _split_plan(config, profiles[config.batch_size])}]
        boundary = max(sum(r["output_bytes"] for r in profiles[config.batch_size][:1]), 1)
        result["copy_bandwidth"] = copy_bandwidth(device, boundary)
    else:
        # The other ranks wait out rank 0's single-device runs at the same barriers.
        for _ in range(config.warmup + config.steps):
            dist.barrier()
    dist.broadcast_object_list(payload, src=0)
    shared = payload[0]
    result.update(profiles=shared["profiles"], single=shared["single"], cuts=shared["cuts"])
    if len(config.devices) < 2:
        return result
    for cut in sorted(set(shared["cuts"].values())):
        if rank == 0:
            info(f"naive split after stage {cut}")
        result["runs"][(cut, "naive", 1)] = _run_split(rank, job, device, cut, 1, "gpipe")
        for schedule in config.schedules:
            for micro_batches in sorted(set(m for m in config.micro_batches if m > 1)):
                if rank == 0:
                    info(f"{schedule} pipeline, {micro_batches} micro-batches, split after stage {cut}")
                result["runs"][(cut, schedule, micro_batches)] = _run_split(
                    rank, job, device, cut, micro_batches, schedule)
    # Data parallelism needs at least one sample per device.
    if not config.one_process and config.batch_size >= config.world_size:
        if rank == 0:
            info("data parallel")
        result["data_parallel"] = _run_data_parallel(rank, job, device)
    return result


def _gradient_check(rank: int, job: _Job, device: torch.device) -> dict[str, Any]:
    """One pipelined step; returns this rank's parameter gradients by name and the micro-batch losses."""
    config = job.config
    cut, micro_batches, schedule = job.gradient_check  # type: ignore[misc]
    groups = _my_groups(config, rank, _fresh_model(job), cut, device)
    pipeline, stages = _build_schedule(config, rank, groups, micro_batches, schedule, device)
    images, targets = _make_batch(config, device)
    losses: list[torch.Tensor] = []
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    pipeline.step(*((images,) if first else ()), target=targets if last else None, losses=losses,
                  return_outputs=False)
    gradients = {}
    for index, group in groups:
        stage_names = group.names
        for name, parameter in group.named_parameters():
            position, rest = name.split(".", 2)[1:]
            gradients[f"{stage_names[int(position)]}.{rest}"] = parameter.grad.detach().cpu()
    return {"losses": [loss.detach().cpu() for loss in losses], "gradients": gradients}


_MALLOC_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _launch(job: _Job) -> list[dict[str, Any]]:
    """Start one process per rank and collect what each one saved."""
    import torch.multiprocessing as mp

    world_size = job.config.world_size
    # glibc keeps freed memory below a threshold it raises up to 32 MiB, so a CPU process's resident set
    # would not fall when tensors are freed; a fixed 1 MiB threshold returns every large tensor to the
    # system, which makes peak RSS growth track peak tensor memory. Read once at the workers' start.
    previous = os.environ.get(_MALLOC_THRESHOLD)
    os.environ[_MALLOC_THRESHOLD] = str(2**20)
    try:
        mp.start_processes(_worker, args=(job,), nprocs=world_size, start_method="spawn", join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        # A user-fixable problem found inside a worker is reported like any other; the rest are bugs.
        for error_file in sorted(Path(job.folder).glob("rank*.error")):
            raise MrisegError(error_file.read_text()) from None
        raise
    finally:
        if previous is None:
            del os.environ[_MALLOC_THRESHOLD]
        else:
            os.environ[_MALLOC_THRESHOLD] = previous
    return [torch.load(Path(job.folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def pipelined_gradients(config: BenchmarkConfig, factory: ModelFactory, cut: int, micro_batches: int,
                        schedule: str = "gpipe") -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Micro-batch losses and parameter gradients (named ``stage.param``) of one pipelined step.

    Used to check that the pipeline computes exactly what one device computes
    with gradient accumulation over the same micro-batches.
    """
    with tempfile.TemporaryDirectory(prefix="mriseg-bench-") as folder:
        ranks = _launch(_Job(config, factory, folder, gradient_check=(cut, micro_batches, schedule)))
    losses = [loss for rank in ranks for loss in rank["losses"]]
    gradients = {name: grad for rank in ranks for name, grad in rank["gradients"].items()}
    return losses, gradients


# --- the report -------------------------------------------------------------------------------


def _group_times(profile: list[dict[str, float]], cut: int) -> list[tuple[float, float]]:
    groups = (profile[:cut], profile[cut:])
    return [(sum(r["forward_s"] for r in g), sum(r["backward_s"] for r in g)) for g in groups]


def _entry(mode: str, config: BenchmarkConfig, times: Sequence[float], single_median: float | None,
           **extra: Any) -> dict[str, Any]:
    step = _percentiles(times)
    entry = {"mode": mode, "step_s": step, "samples_per_s": config.batch_size / step["median"],
             "speedup": (single_median / step["median"]) if single_median else 1.0}
    entry.update(extra)
    return entry


def _report(config: BenchmarkConfig, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    first = ranks[0]
    profiles: dict[int, list[dict[str, float]]] = first["profiles"]
    full = profiles[config.batch_size]
    single_times = first["single"]["times"]
    single_median = statistics.median(single_times)
    cuts: dict[str, int] = first["cuts"]
    names = [r["name"] for r in full]
    peaks_kind = first["single"]["memory_kind"]
    entries = [_entry("single", config, single_times, single_median, devices=[config.devices[0]],
                      peak_memory_bytes=[first["single"]["peak"]], bytes_sent_per_step=0)]
    for (cut, schedule, micro_batches), run in first["runs"].items():
        label = " = ".join(split for split, split_cut in cuts.items() if split_cut == cut)
        per_rank = [r["runs"][(cut, schedule, micro_batches)] for r in ranks]
        times = [max(values) for values in zip(*(r["times"] for r in per_rank))]
        micro_profile = profiles[math.ceil(config.batch_size / micro_batches)]
        predicted = predicted_step_time(_group_times(micro_profile, cut), micro_batches, schedule)
        events = [e for r in per_rank for e in r["events"]]
        origin = min((e[3] for e in events), default=0.0)
        mode = "naive split" if schedule == "naive" else "pipelined"
        entry = _entry(mode, config, times, single_median, split=label, cut=cut,
                       groups=[names[:cut], names[cut:]],
                       schedule=None if schedule == "naive" else schedule, micro_batches=micro_batches,
                       bubble_fraction=bubble_fraction(2, micro_batches),
                       predicted_step_s=predicted, predicted_speedup=single_median / predicted,
                       peak_memory_bytes=[r["peak"] for r in per_rank] if not config.one_process else [per_rank[0]["peak"]],
                       bytes_sent_per_step=sum(r["sent_forward"] + r["sent_backward"] for r in per_rank),
                       bytes_sent_forward=sum(r["sent_forward"] for r in per_rank),
                       bytes_sent_backward=sum(r["sent_backward"] for r in per_rank),
                       timeline=[{"stage": s, "kind": k, "micro_batch": c, "start_s": a - origin, "end_s": b - origin}
                                 for s, k, c, a, b in sorted(events, key=lambda e: e[3])])
        entry["efficiency"] = entry["speedup"] / entry["predicted_speedup"]
        entries.append(entry)
    if "data_parallel" in first:
        per_rank = [r["data_parallel"] for r in ranks]
        times = [max(values) for values in zip(*(r["times"] for r in per_rank))]
        dp_profile = profiles[math.ceil(config.batch_size / config.world_size)]
        predicted = sum(r["forward_s"] + r["backward_s"] for r in dp_profile)
        entry = _entry("data parallel", config, times, single_median, micro_batches=None,
                       predicted_step_s=predicted, predicted_speedup=single_median / predicted,
                       peak_memory_bytes=[r["peak"] for r in per_rank],
                       bytes_sent_per_step=first["data_parallel"]["allreduce_bytes"])
        entry["efficiency"] = entry["speedup"] / entry["predicted_speedup"]
        entries.append(entry)
    stage_rows = []
    for record in full:
        row = dict(record)
        row["micro_batch_s"] = {size: p[[r["name"] for r in p].index(record["name"])]["forward_s"]
                                + p[[r["name"] for r in p].index(record["name"])]["backward_s"]
                                for size, p in profiles.items()}
        stage_rows.append(row)
    report: dict[str, Any] = {
        "model": config.model, "input_shape": [config.batch_size, config.channels, *config.input_size],
        "devices": config.devices,
        "device_note": ("both stages in one process on one device: machinery overhead, no parallelism"
                        if config.one_process else "one process per device, 1 thread each, gloo"
                        if config.devices[0] == "cpu" else "one process per GPU, NCCL"),
        "amp": config.amp, "steps": config.steps, "warmup": config.warmup,
        "memory_kind": peaks_kind,
        "stages": stage_rows,
        "cuts": {split: {"cut": cut, "groups": [names[:cut], names[cut:]],
                         "work_s": [sum(r["forward_s"] + r["backward_s"] for r in g) for g in (full[:cut], full[cut:])],
                         "saved_activation_bytes": [sum(r["saved_activation_bytes"] for r in g)
                                                    for g in (full[:cut], full[cut:])],
                         "parameters": [sum(r["parameters"] for r in g) for g in (full[:cut], full[cut:])]}
                 for split, cut in cuts.items()},
        "results": entries,
    }
    if len(config.devices) == 1 or config.one_process:
        report["projection"] = _projection(config, profiles, cuts, first["copy_bandwidth"], single_median)
    report["conclusion"] = _conclusion(entries)
    return report


def _projection(config: BenchmarkConfig, profiles: dict[int, list[dict[str, float]]], cuts: dict[str, int],
                bandwidth: float, single_median: float) -> dict[str, Any]:
    """Two-device step times projected from one device's stage times and its measured copy bandwidth."""
    full = profiles[config.batch_size]
    names = [r["name"] for r in full]
    rows = []
    for split, cut in (cuts or {"encoder-decoder": encoder_decoder_cut(names)}).items():
        boundary = full[cut - 1]["output_bytes"]
        for schedule in config.schedules:
            for micro_batches in sorted({1, *config.micro_batches}):
                micro = profiles.get(math.ceil(config.batch_size / micro_batches))
                if micro is None:
                    continue
                compute = predicted_step_time(_group_times(micro, cut), micro_batches, schedule)
                # Activations forward and their gradients back, not overlapped: the pessimistic case.
                transfer = 2 * boundary / bandwidth
                rows.append({"split": split, "schedule": schedule, "micro_batches": micro_batches,
                             "projected_step_s": compute + transfer, "transfer_s": transfer,
                             "projected_speedup": single_median / (compute + transfer)})
    return {"note": "PROJECTION from measured stage times and copy bandwidth, not a two-device measurement",
            "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}


def _conclusion(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_mode.setdefault(entry["mode"], []).append(entry)
    for naive in by_mode.get("naive split", []):
        lines.append(f"naive split ({naive['split']}): {naive['speedup']:.2f}x single; the two halves run "
                     f"one after the other and {naive['bytes_sent_per_step'] / 2**20:.1f} MiB of activations, "
                     "skips and their gradients cross between devices every step")
    if by_mode.get("pipelined"):
        best = max(by_mode["pipelined"], key=lambda e: e["speedup"])
        lines.append(f"best pipeline: {best['schedule']} with {best['micro_batches']} micro-batches, split "
                     f"{best['split']}: {best['speedup']:.2f}x single, {best['efficiency']:.0%} of the "
                     f"{best['predicted_speedup']:.2f}x its stage times predict")
    if by_mode.get("data parallel"):
        lines.append(f"data parallel: {by_mode['data parallel'][0]['speedup']:.2f}x single")
    lines.append(DATA_PARALLEL_ADVICE)
    return lines


def run_benchmark(config: BenchmarkConfig, factory: ModelFactory | None = None) -> dict[str, Any]:
    """Measure every mode for ``config`` and return the report (see docs/benchmark.md for its fields).

    ``factory`` builds the model (it must be picklable and follow the stage
    contract); by default the registry builds ``config.model``.
    """
    validate(config)
    factory = factory or registry_factory(config)
    try:
        model = factory()
    except (KeyError, ValueError, TypeError) as error:
        raise MrisegError(f"cannot build model {config.model!r}: {error}") from error
    validate(config, model)
    del model
    with tempfile.TemporaryDirectory(prefix="mriseg-bench-") as folder:
        ranks = _launch(_Job(config, factory, folder))
    return _report(config, ranks)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def report_tables(report: dict[str, Any]) -> list[Any]:
    """Rich renderables for a terminal: per-stage times, one row per configuration, the conclusion."""
    from rich.table import Table

    stages = Table(title=f"Stages of {report['model']}, batch {report['input_shape'][0]} on {report['devices'][0]}")
    for column in ("stage", "forward ms", "backward ms", "saved for backward MiB", "output MiB"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for row in report["stages"]:
        stages.add_row(row["name"], f"{row['forward_s'] * 1000:.1f}", f"{row['backward_s'] * 1000:.1f}",
                       _mib(row["saved_activation_bytes"]), _mib(row["output_bytes"]))
    cuts = Table(title="Where each split cuts (device 0 | device 1)")
    for column in ("split", "device 0 stages", "device 1 stages", "compute s", "saved for backward MiB",
                   "parameters"):
        cuts.add_column(column)
    for split, cut in report["cuts"].items():
        groups = cut["groups"]
        cuts.add_row(split, f"{groups[0][0]}..{groups[0][-1]}", f"{groups[1][0]}..{groups[1][-1]}",
                     " | ".join(f"{t:.2f}" for t in cut["work_s"]),
                     " | ".join(_mib(b) for b in cut["saved_activation_bytes"]),
                     " | ".join(f"{n:,}" for n in cut["parameters"]))
    results = Table(title=f"{report['model']} {'x'.join(map(str, report['input_shape']))}, "
                          f"{','.join(report['devices'])} ({report['device_note']})",
                    caption=f"step: median (p10-p90) of {report['steps']} steps; predicted: from the stage times; "
                            f"sent: bytes between devices per step; peak: {report['memory_kind']} per device")
    columns = ("mode", "split", "schedule", "m", "step ms", "samples/s", "speed-up",
               "predicted", "bubble", "sent MiB", "peak MiB")
    for column in columns:
        results.add_column(column, justify="left" if column in ("mode", "split", "schedule") else "right")
    for entry in report["results"]:
        step = entry["step_s"]
        predicted = entry.get("predicted_speedup")
        results.add_row(
            entry["mode"], entry.get("split", "-"), entry.get("schedule") or "-",
            str(entry.get("micro_batches") or "-"),
            f"{step['median'] * 1000:.0f} ({step['p10'] * 1000:.0f}-{step['p90'] * 1000:.0f})",
            f"{entry['samples_per_s']:.2f}", f"{entry['speedup']:.2f}x",
            "-" if predicted is None else f"{predicted:.2f}x",
            "-" if "bubble_fraction" not in entry else f"{entry['bubble_fraction']:.0%}",
            _mib(entry["bytes_sent_per_step"]), " / ".join(_mib(p) for p in entry["peak_memory_bytes"]))
    renderables: list[Any] = [stages, cuts, results]
    projection = report.get("projection")
    if projection:
        table = Table(title=projection["note"])
        for column in ("split", "schedule", "m", "projected step ms", "of which transfers ms", "projected speed-up"):
            table.add_column(column)
        for row in projection["rows"]:
            table.add_row(row["split"], row["schedule"], str(row["micro_batches"]),
                          f"{row['projected_step_s'] * 1000:.0f}", f"{row['transfer_s'] * 1000:.1f}",
                          f"{row['projected_speedup']:.2f}x")
        renderables.append(table)
    renderables.extend(report["conclusion"])
    return renderables
