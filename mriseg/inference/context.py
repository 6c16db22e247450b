"""2.5D input: a 2D network that sees ``K`` neighbouring slices on each side as extra channels.

The one definition of that input, used by training's sampler (:func:`slice_with_context`, one
slice at a time) and by the inference engine (:func:`volume_with_context`, the whole volume at
once), so a slice is fed the same way wherever it is predicted. Channels are offset-major: the
``C`` channels of slice ``p - K``, then of ``p - K + 1``, ..., then of ``p + K``. Neighbours beyond
the volume are :data:`~mriseg.inference.windows.PAD_VALUE` (the normalised background), as
padding is everywhere else. The network carries its ``K`` (:func:`set_slice_context`), stored in
the checkpoint as ``model.context``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mriseg.inference.windows import PAD_VALUE

CONTEXT_ATTRIBUTE = "slice_context"


def context_channels(channels: int, context: int) -> int:
    """Network input channels for ``channels`` modalities and ``context`` slices on each side."""
    return channels * (2 * context + 1)


def set_slice_context(network: nn.Module, context: int) -> nn.Module:
    setattr(network, CONTEXT_ATTRIBUTE, int(context))
    return network


def slice_context(network: nn.Module) -> int:
    """The ``K`` a network was trained with (0: plain 2D); sees through DDP / compile wrappers."""
    inner = getattr(network, "module", getattr(network, "_orig_mod", network))
    return int(getattr(network, CONTEXT_ATTRIBUTE, getattr(inner, CONTEXT_ATTRIBUTE, 0)))


def slice_with_context(image: np.ndarray, slice_axis: int, position: int, context: int) -> np.ndarray:
    """Slice ``position`` of ``image (C, *S)`` along spatial ``slice_axis`` with its neighbours:
    ``(C * (2K + 1), *S without that axis)`` float32."""
    count = image.shape[slice_axis + 1]
    planes = []
    for offset in range(-context, context + 1):
        index = position + offset
        plane = np.take(image, index, axis=slice_axis + 1) if 0 <= index < count else None
        planes.append(np.asarray(plane, dtype=np.float32) if plane is not None else None)
    shape = next(p for p in planes if p is not None).shape
    return np.concatenate([p if p is not None else np.full(shape, PAD_VALUE, np.float32) for p in planes])


def volume_with_context(image: torch.Tensor, slice_axis: int | None, context: int) -> torch.Tensor:
    """Every slice of ``image (C, *S)`` with its neighbours: ``(C * (2K + 1), *S)``; channel block
    ``j`` holds the volume shifted by ``j - K`` slices. A 2D image ``(C, H, W)`` is one slice."""
    if context == 0:
        return image
    if image.ndim == 3:
        return volume_with_context(image.unsqueeze(1), 0, context).squeeze(1)
    axis = slice_axis + 1
    count = image.shape[axis]
    blocks = []
    for offset in range(-context, context + 1):
        shifted = torch.full_like(image, PAD_VALUE)
        low, high = max(0, -offset), min(count, count - offset)  # positions p whose neighbour p + offset exists
        if high > low:
            shifted.narrow(axis, low, high - low).copy_(image.narrow(axis, low + offset, high - low))
        blocks.append(shifted)
    return torch.cat(blocks)
