"""The model registry: every network by name, with its dims, reference and notes.

``build_model(name, in_channels, out_channels, spatial_dims=2, **options)`` is the one way the
rest of mriseg creates a network; the options (``features``, ``variant``, ``deep_supervision``,
...) are passed to the model's constructor and stored in checkpoints as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from mriseg.errors import MrisegError
from mriseg.models.blocks import count_parameters


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry. ``default_shape`` is the (in, out, dims) the listed parameter count uses."""

    name: str
    builder: Callable[..., nn.Module]
    dims: tuple[int, ...]
    reference: str
    notes: str
    default_shape: tuple[int, int, int]

    def default_parameter_count(self) -> int:
        """Trainable parameters at the default width for ``default_shape`` (computed, never typed in)."""
        in_channels, out_channels, spatial_dims = self.default_shape
        return count_parameters(build_model(self.name, in_channels, out_channels, spatial_dims=spatial_dims))

    def describe(self) -> dict[str, Any]:
        in_channels, out_channels, spatial_dims = self.default_shape
        return {"name": self.name, "dims": list(self.dims), "parameters": self.default_parameter_count(),
                "parameters_for": {"in_channels": in_channels, "out_channels": out_channels,
                                   "spatial_dims": spatial_dims},
                "options": self.option_names(), "reference": self.reference, "notes": self.notes}

    def option_names(self) -> list[str]:
        fixed = {"self", "spatial_dims", "in_channels", "out_channels"}
        return [name for name in inspect.signature(self.builder).parameters if name not in fixed]


MODELS: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> None:
    MODELS[info.name] = info


def model_names() -> list[str]:
    return list(MODELS)


def describe_models() -> list[dict[str, Any]]:
    """Every registry entry as plain data (what ``mriseg models`` prints)."""
    return [info.describe() for info in MODELS.values()]


def build_model(name: str, in_channels: int, out_channels: int, spatial_dims: int = 2,
                **options: Any) -> nn.Module:
    """Create the network ``name``; it returns raw logits ``(N, out_channels, *S)``.

    Raises :class:`MrisegError` for an unknown name, unsupported ``spatial_dims`` or an
    option the model does not have.
    """
    if name not in MODELS:
        raise MrisegError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    info = MODELS[name]
    if spatial_dims not in info.dims:
        dims = " or ".join(f"{d}D" for d in info.dims)
        raise MrisegError(f"model {name!r} is {dims} only; got spatial_dims={spatial_dims}")
    if in_channels < 1 or out_channels < 1:
        raise MrisegError(f"model {name!r}: in_channels and out_channels must be >= 1, "
                          f"got {in_channels} and {out_channels}")
    unknown = sorted(set(options) - set(info.option_names()))
    if unknown:
        allowed = ", ".join(info.option_names()) or "none"
        raise MrisegError(f"model {name!r} has no option {', '.join(unknown)}; its options: {allowed}")
    return info.builder(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **options)
