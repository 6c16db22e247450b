"""Tiling a volume for a network: sliding windows (3D), slice by slice (2D), mirrored copies (TTA).

Every function takes a :data:`Predictor` (a batch ``(N, C, *P)`` in, logits ``(N, K, *P')`` out) and
an image ``(C, *S)`` already on the predictor's device, and returns logits ``(K, *S)`` in float32.
Images are padded with :data:`PAD_VALUE`, the normalised background (0 after z-score, min-max or
percentile scaling), as training pads its patches. Valid-convolution networks predict a centred
output ``margin`` voxels smaller than their input per axis; the input is then padded by half the
margin on each side, so that the outputs tile the whole image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Predictor = Callable[[torch.Tensor], torch.Tensor]
PAD_VALUE = 0.0
IMPORTANCE = ("gaussian", "constant")
# Without a size rule, 2D slices are padded to a multiple of 32: every U-Net here halves at most 5 times.
DEFAULT_MULTIPLE = 32


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """Weights of shape ``patch_size`` that peak at the patch centre.

    Voxels near a window's border see less context and are predicted worse, so overlapping
    windows are blended with weights favouring the window a voxel sits in the middle of
    (Isensee et al., nnU-Net, 2021). The standard deviation is ``sigma_scale`` times the patch
    size per axis; weights are clamped away from zero so that every voxel keeps some weight.
    """
    weights: torch.Tensor | None = None
    for size in patch_size:
        offsets = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        axis_weights = torch.exp(-offsets**2 / (2 * (size * sigma_scale) ** 2))
        weights = axis_weights if weights is None else weights.unsqueeze(-1) * axis_weights
    assert weights is not None, "patch_size must have at least one axis"
    return weights.clamp_min(max(weights.min().item(), 1e-3))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``patch`` covering ``size`` with the given overlap.

    Windows advance by ``patch * (1 - overlap)``; the last one is moved back to end exactly at the
    border, so every window lies inside the (padded) volume.
    """
    if patch >= size:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    return [*range(0, size - patch, step), size - patch]


def _pad(image: torch.Tensor, before: Sequence[int], after: Sequence[int]) -> torch.Tensor:
    """Pad the spatial axes of ``(C, *S)`` with :data:`PAD_VALUE` (F.pad lists pairs from the last axis)."""
    if not any(before) and not any(after):
        return image
    pairs = [n for b, a in zip(reversed(list(before)), reversed(list(after))) for n in (b, a)]
    return F.pad(image, pairs, value=PAD_VALUE)


def sliding_window(predictor: Predictor, image: torch.Tensor, patch_size: Sequence[int], overlap: float = 0.5,
                   batch_size: int = 4, importance: str = "gaussian", margin: int = 0) -> torch.Tensor:
    """Logits ``(K, *S)`` of a whole image from overlapping windows.

    Args:
        image: ``(C, *S)``; images smaller than the window are padded symmetrically (as MONAI's
            ``sliding_window_inference`` does) and cropped back.
        patch_size: the network's input window, one entry per spatial axis.
        overlap: fraction of a window shared with its neighbour on each axis, in [0, 1).
        importance: ``gaussian`` (centre-weighted) or ``constant`` (plain mean).
        margin: how much smaller the network's output is than its input, per axis.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    spatial = tuple(image.shape[1:])
    tile = tuple(int(p) - margin for p in patch_size)
    if len(tile) != len(spatial) or min(tile) < 1:
        raise ValueError(f"window {tuple(patch_size)} (margin {margin}) does not fit an image of shape {spatial}")
    short = [max(t - s, 0) for t, s in zip(tile, spatial)]
    before = [n // 2 for n in short]
    image = _pad(image, [b + margin // 2 for b in before],
                 [n - b + margin - margin // 2 for n, b in zip(short, before)])
    covered = tuple(s + n for s, n in zip(spatial, short))
    weights = (gaussian_importance_map(tile, device=image.device) if importance == "gaussian"
               else torch.ones(tile, device=image.device))
    corners = list(itertools.product(*(window_starts(s, t, overlap) for s, t in zip(covered, tile))))
    scores: torch.Tensor | None = None
    weight_sum = torch.zeros(covered, device=image.device)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        batch = torch.stack([image[(slice(None), *(slice(c, c + t + margin) for c, t in zip(corner, tile)))]
                             for corner in chunk])
        output = predictor(batch).float()
        if scores is None:
            scores = torch.zeros((output.shape[1], *covered), device=image.device)
        for corner, window_output in zip(chunk, output):
            region = tuple(slice(c, c + t) for c, t in zip(corner, tile))
            scores[(slice(None), *region)].addcmul_(window_output, weights)  # in place: no weighted copy
            weight_sum[region] += weights
    assert scores is not None
    scores /= weight_sum
    return scores[(slice(None), *(slice(b, b + s) for b, s in zip(before, spatial)))]


def accepted_size(size: int, axis_ok: Callable[[int, int], bool] | None, axis: int) -> int:
    """The smallest size >= ``size`` a network takes on ``axis`` (a multiple of 32 without a rule)."""
    if axis_ok is None:
        return -(-size // DEFAULT_MULTIPLE) * DEFAULT_MULTIPLE
    for candidate in range(size, size + 4096):
        if axis_ok(axis, candidate):
            return candidate
    raise ValueError(f"no accepted size at or above {size} on axis {axis}")


def accepted_at_most(limit: int, axis_ok: Callable[[int, int], bool] | None, axis: int) -> int:
    """The largest size at most ``limit`` a network takes on ``axis`` (a multiple of 32 without a
    rule), else the smallest it takes above."""
    if axis_ok is None:
        return max(DEFAULT_MULTIPLE, limit // DEFAULT_MULTIPLE * DEFAULT_MULTIPLE)
    return next((n for n in range(limit, 0, -1) if axis_ok(axis, n)), None) or accepted_size(limit, axis_ok, axis)


def slicewise(predictor: Predictor, image: torch.Tensor, slice_axis: int | None, batch_size: int = 16,
              axis_ok: Callable[[int, int], bool] | None = None, margin: int = 0) -> torch.Tensor:
    """Logits ``(K, *S)`` of a 2D network run over every slice of a volume (or once on a 2D image).

    Args:
        image: ``(C, H, W)`` or ``(C, D0, D1, D2)``.
        slice_axis: spatial axis (channels not counted) to slice along; ignored for 2D images.
        axis_ok: the network's size rule per axis; slices are padded to the nearest accepted size.
        margin: how much smaller the network's output is than its input, per axis.
    """
    if image.ndim == 3:
        slices, axis = image.unsqueeze(0), None
    else:
        if slice_axis is None:
            raise ValueError("a volume needs a slice_axis for a 2D model")
        axis = slice_axis + 1
        slices = image.movedim(axis, 0)
    height, width = slices.shape[-2:]
    sizes = [accepted_size(n + margin, axis_ok, a) for a, n in enumerate((height, width))]
    front = margin // 2
    outputs = []
    for first in range(0, slices.shape[0], batch_size):
        batch = slices[first:first + batch_size]
        batch = F.pad(batch, (front, sizes[1] - width - front, front, sizes[0] - height - front), value=PAD_VALUE)
        outputs.append(predictor(batch)[..., :height, :width].float())
    scores = torch.cat(outputs)
    return scores[0] if axis is None else scores.movedim(0, axis)


def with_flips(predictor: Predictor, spatial_dims: int) -> Predictor:
    """Test-time augmentation: the mean logits over every mirrored copy (all 2**dims axis subsets)."""
    axes = [2 + d for d in range(spatial_dims)]
    flip_sets = [combo for r in range(1, len(axes) + 1) for combo in itertools.combinations(axes, r)]

    def averaged(batch: torch.Tensor) -> torch.Tensor:
        total = predictor(batch).float().clone()  # outside inference mode: a tensor we may add to
        for flipped in flip_sets:
            total = total + predictor(batch.flip(flipped)).float().flip(flipped)
        return total / (len(flip_sets) + 1)

    return averaged
