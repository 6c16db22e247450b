"""What to measure (:class:`BenchmarkConfig`), which devices, and the checks before any process starts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mriseg import options as checks
from mriseg.errors import MrisegError


SPLITS = ("encoder-decoder", "balanced")
SCHEDULES = ("gpipe", "1f1b")
DATA_PARALLEL_ADVICE = (
    "Data parallelism is the better choice whenever the model and a batch fit on one device; "
    "pipelining is for models or volumes that do not."
)

ModelFactory = Callable[[], nn.Module]




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
    uneven = [m for m in config.micro_batches if config.batch_size % m]
    if uneven:  # torch.distributed.pipelining splits the batch into equal micro-batches
        raise MrisegError(f"--micro-batches {','.join(map(str, uneven))} does not divide the batch of "
                          f"{config.batch_size} samples; pipeline micro-batches must be equal (choose divisors, "
                          "or change --batch-size)")
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
