"""The processes that measure: one per device (gloo on CPUs, NCCL on GPUs), and what each runs."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mriseg.files import atomic_path
from mriseg.errors import MrisegError
from mriseg.log import info
from mriseg.benchmark.config import BenchmarkConfig, ModelFactory, model_stages
from mriseg.benchmark.stages import StageGroup, balanced_cut, encoder_decoder_cut
from mriseg.benchmark.measure import _MemoryMeter, _loss_fn, _make_batch, _sync, copy_bandwidth, profile_stages


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


def _run_single(job: _Job, device: torch.device, micro_batches: int = 1, threads: int = 1) -> dict[str, Any]:
    """One device: the batch at once, or in ``micro_batches`` chunks with gradients accumulated (what
    each pipeline stage computes), with ``threads`` CPU threads (1 is what each benchmark process gets)."""
    config = job.config
    model = _fresh_model(job).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images, targets = _make_batch(config, device)
    chunks = list(zip(images.tensor_split(micro_batches), targets.tensor_split(micro_batches)))
    dtype = _autocast_dtype(config)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for chunk_images, chunk_targets in chunks:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(chunk_images)
            (_loss_fn(logits.float(), chunk_targets) / micro_batches).backward()
        optimizer.step()

    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        meter = _MemoryMeter(device)
        times = _timed_steps(config, device, step, meter)
    finally:
        torch.set_num_threads(previous)
    return {"times": times, "peak": meter.peak(), "memory_kind": meter.kind}


def _single_baselines(config: BenchmarkConfig) -> list[tuple[str, int, int]]:
    """(name, micro-batches, threads) of every one-device run: the whole batch, the same micro-batches
    as each pipeline accumulated, and, for two CPU processes, one process with both threads."""
    runs = [("single", 1, 1)]
    if len(config.devices) == 2:
        runs += [("accumulated", m, 1) for m in sorted(set(config.micro_batches)) if m > 1]
        if config.devices == ["cpu", "cpu"] and not config.one_process:
            runs.append(("two threads", 1, 2))
    return runs


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
        baselines = {}
        for name, micro_batches, threads in _single_baselines(config):
            info(f"one device: {name}" + (f", {micro_batches} micro-batches" if micro_batches > 1 else ""))
            baselines[(name, micro_batches)] = _run_single(job, device, micro_batches, threads)
        single = baselines[("single", 1)]
        payload = [{"profiles": profiles, "single": single, "baselines": baselines,
                    "cuts": _split_plan(config, profiles[config.batch_size])}]
        boundary = max(sum(r["output_bytes"] for r in profiles[config.batch_size][:1]), 1)
        result["copy_bandwidth"] = copy_bandwidth(device, boundary)
    else:
        # The other ranks wait out rank 0's single-device runs at the same barriers.
        for _ in range((config.warmup + config.steps) * len(_single_baselines(config))):
            dist.barrier()
    dist.broadcast_object_list(payload, src=0)
    shared = payload[0]
    result.update(profiles=shared["profiles"], single=shared["single"], baselines=shared["baselines"],
                  cuts=shared["cuts"])
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
