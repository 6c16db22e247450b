"""Timing and memory helpers, and the per-stage profile the split is planned from."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mriseg.benchmark.config import BenchmarkConfig


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
