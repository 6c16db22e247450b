"""Stage groups (a contiguous run of a model's pipeline stages) and the arithmetic of a pipeline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mriseg.errors import MrisegError


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
