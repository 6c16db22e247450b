"""The one inference engine: a network and a preprocessed image in, logits out; a case in, labels out.

Training's validation, ``mriseg predict`` and ``mriseg evaluate --model`` all call these functions,
so a checkpoint scores the same wherever it is scored:

* :func:`predict_logits`: a preprocessed image ``(C, *S)`` -> logits ``(K, *S)``; 2D networks slice
  by slice, 3D networks by Gaussian-weighted sliding windows of the training patch (the whole
  volume when training saw whole volumes); optional flip TTA; autocast when asked.
* :func:`predict_case`: a source :class:`~mriseg.data.case.Case` -> the checkpoint's preprocessing,
  :func:`predict_logits`, probabilities resampled back to the source grid (linear by default, as
  nnU-Net does) and decoded to labels there (:meth:`mriseg.labels.Task.decode`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from mriseg.data.case import Case
from mriseg.data.preprocess import INTERPOLATIONS, PreprocessParams, preprocess_case, restore_to_source
from mriseg.devices import choose_precision
from mriseg.errors import MrisegError
from mriseg.inference.context import slice_context, volume_with_context
from mriseg.inference.windows import IMPORTANCE, Predictor, sliding_window, slicewise, with_flips
from mriseg.labels import Task


@dataclass(frozen=True)
class InferenceSettings:
    """How to run a network over an image (CLI: ``predict``'s and ``evaluate --model``'s options)."""

    patch_size: tuple[int, ...] | None = None   # 3D window; None: the whole image
    overlap: float = 0.5
    batch_size: int = 8
    importance: str = "gaussian"
    tta: bool | None = None                      # flip TTA; None: on for 2D models, off for 3D
    amp: bool | None = None                      # None: the device's default (mriseg.devices.choose_precision)
    channels_last: bool | None = None
    interpolation: str = "linear"                # back to the source grid: linear (soft) or nearest (labels)

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise MrisegError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise MrisegError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.importance not in IMPORTANCE:
            raise MrisegError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise MrisegError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                              f"got {self.interpolation!r}")
        if self.patch_size is not None and (not self.patch_size or min(self.patch_size) < 1):
            raise MrisegError(f"--patch-size must be positive numbers, got {self.patch_size}")


def network_predictor(network: nn.Module, settings: InferenceSettings, spatial_dims: int) -> Predictor:
    """A batch in, full-resolution float32 logits out: no gradients, eval-mode outputs, and the
    precision and memory format of :func:`mriseg.devices.choose_precision` (the network is moved
    to that memory format in place)."""
    device = next(network.parameters()).device
    precision = choose_precision(device, settings.amp, settings.channels_last)
    memory_format = precision.memory_format(spatial_dims)
    precision.apply(network, spatial_dims)

    def predict_batch(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast(device.type, enabled=precision.dtype is not None,
                                                    dtype=precision.dtype or torch.float32):
            output = network(batch)
        # Deep-supervision outputs in training mode are lists; the first head is full resolution.
        return (output[0] if isinstance(output, (list, tuple)) else output).float()

    return predict_batch


def output_margin(network: nn.Module) -> int:
    """How many voxels smaller than its input a network's output is per axis (valid convolutions)."""
    return int(getattr(network, "output_margin", 0))


def wants_flips(settings: InferenceSettings, spatial_dims: int) -> bool:
    """Flip TTA unless told: on for 2D (4 views, +0.03 mean WT Dice on the real BraTS folds of
    docs/results.md), off for 3D (8 views: minutes per case on a CPU)."""
    return settings.tta if settings.tta is not None else spatial_dims == 2


def predict_logits(network: nn.Module, image: np.ndarray | torch.Tensor, spatial_dims: int,
                   slice_axis: int | None, settings: InferenceSettings) -> torch.Tensor:
    """Logits ``(K, *S)`` (float32, on the CPU) of a preprocessed image ``(C, *S)``."""
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    predictor = network_predictor(network, settings, spatial_dims)
    if wants_flips(settings, spatial_dims):
        predictor = with_flips(predictor, spatial_dims)
    tensor = torch.as_tensor(np.asarray(image, dtype=np.float32)).to(device)
    context = slice_context(network)
    if spatial_dims == 2 and context and (tensor.ndim == 3 or slice_axis is not None):
        tensor = volume_with_context(tensor, slice_axis, context)  # 2.5D: neighbours as channels
    axis_ok = getattr(getattr(network, "size_rule", None), "axis_ok", None)
    margin = output_margin(network)
    try:
        if spatial_dims == 2:
            logits = slicewise(predictor, tensor, slice_axis, settings.batch_size, axis_ok, margin)
        else:
            if tensor.ndim != 4:
                raise MrisegError(f"the model is 3D but the input is {tensor.ndim - 1}D")
            whole = tuple(s + margin for s in tensor.shape[1:])
            patch = capped_window(settings.patch_size, whole, axis_ok) if settings.patch_size else whole
            logits = sliding_window(predictor, tensor, patch, settings.overlap, settings.batch_size,
                                    settings.importance, margin)
    finally:
        network.train(was_training)
    return logits.cpu()


def capped_window(patch: Sequence[int], whole: Sequence[int], axis_ok: Callable[[int, int], bool] | None
                  ) -> tuple[int, ...]:
    """The window, no larger on any axis than the smallest size that covers the image and that the
    network accepts: beyond it a window only adds padding (and memory: 512^3 took 24 GB)."""
    capped = []
    for axis, (wanted, size) in enumerate(zip(patch, whole)):
        fits = next((n for n in range(size, wanted) if axis_ok is None or axis_ok(axis, n)), wanted)
        capped.append(min(wanted, fits))
    return tuple(capped)


@dataclass
class CasePrediction:
    """One case predicted: labels and probabilities on the source grid, and the preprocessing record."""

    labels: np.ndarray           # (*source spatial) uint8
    probabilities: np.ndarray    # (K, *source spatial) float32
    record: dict


def background_fill(task: Task, channels: int) -> list[float]:
    """Probabilities outside the crop, where the model saw nothing: background is certain there."""
    return [1.0 if task.activation == "softmax" and channel == 0 else 0.0 for channel in range(channels)]


@dataclass(frozen=True)
class Member:
    """One network of an ensemble, with its own dimensionality and settings (e.g. its training patch)."""

    network: nn.Module
    spatial_dims: int
    settings: InferenceSettings


def predict_case(case: Case, network: nn.Module, task: Task, params: PreprocessParams, spatial_dims: int,
                 settings: InferenceSettings) -> CasePrediction:
    """Preprocess as in training, predict, and decode on the source grid.

    ``case`` must already hold the checkpoint's channels in its order. The crop box comes from
    the image alone: labels beside the input never change what is predicted.
    """
    return predict_ensemble_case(case, [Member(network, spatial_dims, settings)], task, params, settings.interpolation)


def predict_ensemble_case(case: Case, members: Sequence[Member], task: Task, params: PreprocessParams,
                          interpolation: str = "linear") -> CasePrediction:
    """:func:`predict_case` for several networks trained on the same preprocessing and task (e.g.
    the folds of a cross-validation): their probabilities are averaged on the preprocessed grid,
    then resampled and decoded once, as ``nnUNetv2_ensemble`` averages probabilities."""
    if not members:
        raise MrisegError("an ensemble needs at least one model")
    image, _, record = preprocess_case(replace(case, label=None), params)
    total: torch.Tensor | None = None
    for member in members:
        logits = predict_logits(member.network, image, member.spatial_dims, case.slice_axis, member.settings)
        probabilities = task.probabilities(logits[None])[0]
        total = probabilities if total is None else total.add_(probabilities)
    assert total is not None
    mean = (total / len(members)).numpy()
    soft = restore_to_source(mean, record, fill=background_fill(task, mean.shape[0]), interpolation=interpolation)
    return CasePrediction(labels=task.decode(soft), probabilities=soft, record=record)


__all__: Sequence[str] = ("InferenceSettings", "CasePrediction", "network_predictor", "predict_logits",
                          "predict_case", "predict_ensemble_case", "Member", "background_fill", "output_margin")
