"""Preprocessing of one case: crop, nearest resize, per-channel normalisation, label remap.

:func:`preprocess_case` turns a :class:`~mriseg.data.case.Case` into the arrays stored in the
cache and a record of what was done; :func:`restore_to_source` undoes the geometry (resize,
then crop) so that predict can put a mask back onto the case's original grid.

Background: the "brain" over which statistics are taken and whose bounding box is cropped is
every voxel that differs from the channel's background value. The background value is 0,
unless most corners of the volume hold one other constant (the real BraTS 2013 cases are
z-scored with a constant negative value outside the brain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from mriseg.data.case import Case
from mriseg.errors import MrisegError
from mriseg.labels import remap_labels
from mriseg.options import parse_numbers, require_memory

NORMALISATIONS = ("zscore", "minmax", "max", "percentile")
DTYPES = ("float16", "float32")
PERCENTILES = (0.5, 99.5)
INTERPOLATIONS = ("nearest", "linear")


@dataclass
class PreprocessParams:
    """Every parameter that changes the cached arrays (stored in manifest.json and checkpoints).

    Attributes:
        size: target spatial size. Two numbers (H, W) resize the in-plane axes of a volume
            (all but ``slice_axis``) or a 2D image; as many numbers as spatial axes resize
            every axis in array order. None keeps the size.
        crop: crop to the bounding box of the non-background region first.
        norm: per-channel intensity normalisation, one of :data:`NORMALISATIONS`.
        label_map: label values to replace, e.g. ``{3: 1}``; unlisted values are kept.
        dtype: storage type of the image arrays, ``float16`` or ``float32``.
    """

    size: tuple[int, ...] | None = None
    crop: bool = False
    norm: str = "zscore"
    label_map: dict[int, int] = field(default_factory=dict)
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = tuple(int(s) for s in self.size)
            if len(self.size) not in (2, 3) or min(self.size) < 1 or max(self.size) > 4096:
                raise MrisegError(f"--size must be 2 (H,W) or 3 (D,H,W) numbers from 1 to 4096, got {self.size}")
        if self.norm not in NORMALISATIONS:
            raise MrisegError(f"--norm must be one of {', '.join(NORMALISATIONS)}, got '{self.norm}'")
        if self.dtype not in DTYPES:
            raise MrisegError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        self.label_map = {int(k): int(v) for k, v in self.label_map.items()}
        if any(not 0 <= v <= 255 for pair in self.label_map.items() for v in pair):
            raise MrisegError("--label-map values must lie in 0..255")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size"] = list(self.size) if self.size is not None else None
        data["label_map"] = {str(k): v for k, v in sorted(self.label_map.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessParams":
        size = data.get("size")
        return cls(size=tuple(size) if size is not None else None, crop=bool(data.get("crop", False)),
                   norm=data.get("norm", "zscore"),
                   label_map={int(k): int(v) for k, v in (data.get("label_map") or {}).items()},
                   dtype=data.get("dtype", "float16"))


def parse_size(text: str | None) -> tuple[int, ...] | None:
    """``'128,128'`` -> ``(128, 128)``; also accepts ``x`` as separator."""
    return parse_numbers(text, "--size", count=(2, 3))


def parse_label_map(text: str | None) -> dict[int, int]:
    """``'3:1,5:0'`` -> ``{3: 1, 5: 0}``."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        source, sep, target = item.partition(":")
        if not sep or not source.strip().isdigit() or not target.strip().isdigit():
            raise MrisegError(f"--label-map item '{item}' is not FROM:TO with integers (e.g. 3:1)")
        mapping[int(source)] = int(target)
    return mapping


# ----------------------------------------------------------------------------- geometry


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index for nearest-neighbour resizing: ``i * in // out``."""
    return (np.arange(out_size, dtype=np.int64) * in_size) // out_size


def resize_nearest(array: np.ndarray, out_shape: Sequence[int], axes: Sequence[int] | None = None) -> np.ndarray:
    """Nearest-neighbour resize of ``array`` along ``axes`` (default: the last ``len(out_shape)`` axes).

    Output index ``i`` along an axis of input length ``n`` and output length ``m`` reads
    input index ``i * n // m``, the formula of the per-voxel loop it replaces.

    Per-element fancy indexing costs several times a plain copy, so the gather is split:
    the last two axes form planes, and every output plane is one ``np.take`` of a small
    flat index (which stays in cache) from one contiguous input plane chosen by the
    leading axes. Only views are made along the way; the output is written once.
    """
    if axes is None:
        axes = tuple(range(array.ndim - len(out_shape), array.ndim))
    index = [np.arange(n) for n in array.shape]
    changed = False
    for axis, size in zip(axes, out_shape):
        if array.shape[axis] != size:
            index[axis % array.ndim] = nearest_indices(array.shape[axis], size)
            changed = True
    if not changed:
        return np.ascontiguousarray(array)
    if array.ndim == 1:
        return array[index[0]]
    source = np.ascontiguousarray(array)
    height, width = source.shape[-2:]
    plane_index = (index[-2][:, None] * width + index[-1][None, :]).ravel()
    out = np.empty(tuple(len(i) for i in index), dtype=source.dtype)
    out_planes = out.reshape(-1, plane_index.size)
    source_planes = source.reshape(-1, height * width)
    leading = np.ravel_multi_index(np.ix_(*index[:-2]), source.shape[:-2]).ravel() if source.ndim > 2 else [0]
    for row, source_row in enumerate(leading):
        np.take(source_planes[source_row], plane_index, out=out_planes[row], mode="wrap")  # in range: no check needed
    return out


def background_values(image: np.ndarray) -> np.ndarray:
    """Per-channel background value: 0, unless most corners hold one constant that is also the
    channel's minimum (the real BraTS 2013 cases: a negative constant outside the brain).

    The minimum condition keeps noisy backgrounds at 0: a kaggle_3m FLAIR plane has 1 in its
    corners but 0 elsewhere outside the head, so it has no constant background.
    """
    corner_index = np.ix_(*[[0, n - 1] for n in image.shape[1:]])
    values = []
    for channel in image:
        corners = channel[corner_index].ravel()
        candidates, counts = np.unique(corners, return_counts=True)
        best = int(np.argmax(counts))
        majority = counts[best] * 2 > corners.size
        values.append(float(candidates[best]) if majority and candidates[best] == channel.min() else 0.0)
    return np.asarray(values, dtype=np.float32)


def foreground_box(image: np.ndarray, background: np.ndarray,
                   label: np.ndarray | None = None) -> list[tuple[int, int]] | None:
    """Bounding box [(start, stop) per spatial axis] of voxels off the background in any channel."""
    mask = np.any(image != background.reshape((-1,) + (1,) * (image.ndim - 1)), axis=0)
    if label is not None:
        mask |= label > 0
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append((int(present[0]), int(present[-1]) + 1))
    return box


def target_shape(spatial_shape: Sequence[int], size: Sequence[int] | None, slice_axis: int | None) -> tuple[int, ...]:
    """Spatial shape after resizing ``spatial_shape`` to ``size`` (see :class:`PreprocessParams`)."""
    shape = tuple(spatial_shape)
    if size is None:
        return shape
    if len(size) == len(shape):
        return tuple(size)
    if len(size) == 2 and len(shape) == 3:
        axis = 2 if slice_axis is None else slice_axis
        in_plane = [a for a in range(3) if a != axis]
        out = list(shape)
        out[in_plane[0]], out[in_plane[1]] = size
        return tuple(out)
    raise MrisegError(f"--size {','.join(map(str, size))} does not fit a {len(shape)}D case of shape {shape}")


# ----------------------------------------------------------------------------- intensities


def normalise(image: np.ndarray, method: str, background: np.ndarray) -> np.ndarray:
    """Normalise each channel; never NaN (a constant or empty channel becomes zeros).

    ``zscore`` and ``percentile`` take statistics over the non-background voxels and set the
    background to 0; ``minmax`` scales all voxels to [0, 1]; ``max`` divides by the largest
    absolute value.
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        channel = channel.astype(np.float32, copy=False)
        if method in ("zscore", "percentile"):
            brain = channel != background[c]
            values = channel[brain]
            if values.size == 0:
                out[c] = 0.0
                continue
            if method == "zscore":
                mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
                scaled = (channel - mean) / (std if std > 0 else 1.0)
            else:
                low, high = np.percentile(values, PERCENTILES)
                scaled = (np.clip(channel, low, high) - low) / (high - low) if high > low else channel * 0.0
            out[c] = np.where(brain, scaled, 0.0)
        elif method == "minmax":
            low, high = float(channel.min()), float(channel.max())
            out[c] = (channel - low) / (high - low) if high > low else 0.0
        elif method == "max":
            peak = float(np.abs(channel).max()) if channel.size else 0.0
            out[c] = channel / peak if peak > 0 else 0.0
        else:
            raise MrisegError(f"unknown normalisation '{method}'")
    return out


# ----------------------------------------------------------------------------- one case


def preprocess_case(case: Case, params: PreprocessParams) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, resize, normalise and remap one case.

    Returns:
        image: (C, *spatial) in ``params.dtype``; label: (*spatial) uint8 or None;
        record: JSON-ready dict with the original geometry and what was done, enough for
        :func:`restore_to_source`.
    """
    image, label = case.image, case.label
    original_shape = tuple(image.shape[1:])
    background = background_values(image)
    box = foreground_box(image, background, label) if params.crop else None
    if box is not None:
        region = tuple(slice(start, stop) for start, stop in box)
        image = image[(slice(None), *region)]
        label = label[region] if label is not None else None
    cropped_shape = tuple(image.shape[1:])
    out_shape = target_shape(cropped_shape, params.size, case.slice_axis)
    # the normalised copy, the resized image and its stored copy, before any is allocated
    require_memory(f"{case.case_id}: preprocessing to {'x'.join(map(str, out_shape))}",
                   4.0 * image.shape[0] * (np.prod(cropped_shape, dtype=np.float64) + 2 * np.prod(out_shape, dtype=np.float64)))
    # Normalise before resizing: statistics then describe the whole brain, not a subsample.
    image = normalise(image, params.norm, background)
    image = resize_nearest(image, out_shape).astype(params.dtype)
    label_values_original = sorted(np.unique(label).tolist()) if label is not None else []
    if label is not None:
        label = resize_nearest(remap_labels(label, params.label_map), out_shape)
    record = {
        "case_id": case.case_id,
        "layout": case.layout,
        "modalities": list(case.modalities),
        "original_shape": list(original_shape),
        "spacing": [float(s) for s in case.spacing],
        "affine": case.affine.tolist() if case.affine is not None else None,
        "header": case.header,
        "slice_axis": case.slice_axis,
        "background": background.tolist(),
        "crop_box": [list(pair) for pair in box] if box is not None else None,
        "cropped_shape": list(cropped_shape),
        "shape": list(out_shape),
        "label_values_original": label_values_original,
        "label_values": sorted(np.unique(label).tolist()) if label is not None else [],
        "has_label": label is not None,
    }
    return image, label, record


def inverse_taps(source_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How each source index is read back from a grid made by :func:`nearest_indices`.

    Output index ``i`` holds source voxel ``s_i = i * n // m``. Source index ``j`` lies between
    the samples ``s_lo <= j <= s_hi`` of two neighbouring outputs ``lo`` and ``hi = lo + 1``;
    it is read as ``(1 - w) * out[lo] + w * out[hi]`` with ``w = (j - s_lo) / (s_hi - s_lo)``
    (clamped past the last sample). Where several outputs sample one source voxel (upsampling)
    the middle one is taken. Returns ``(lo, hi, w)``, each of length ``source_size``.
    """
    samples = nearest_indices(source_size, out_size)
    source = np.arange(source_size)
    first = np.searchsorted(samples, source, side="left")
    last = np.searchsorted(samples, source, side="right") - 1
    exact = (first < out_size) & (first <= last)
    middle = (first + last) // 2
    lo = np.clip(last, 0, out_size - 1)          # the last sample at or before j
    hi = np.clip(lo + 1, 0, out_size - 1)
    gap = samples[hi] - samples[lo]
    weight = np.where(gap > 0, (source - samples[lo]) / np.maximum(gap, 1), 0.0)
    lo = np.where(exact, middle, lo)
    hi = np.where(exact, middle, hi)
    weight = np.where(exact, 0.0, np.clip(weight, 0.0, 1.0))
    return lo.astype(np.int64), hi.astype(np.int64), weight.astype(np.float32)


def resize_back(array: np.ndarray, source_shape: Sequence[int], interpolation: str = "nearest") -> np.ndarray:
    """Undo :func:`resize_nearest` on the last ``len(source_shape)`` axes.

    ``nearest``: each source voxel takes the preprocessed voxel whose sample position is
    nearest (exact for every voxel that was sampled: a mask resized forward and back is the
    source mask wherever the forward resize kept a voxel). ``linear``: soft outputs are
    interpolated between the two neighbouring samples (for probabilities, before thresholding).
    """
    if interpolation not in INTERPOLATIONS:
        raise MrisegError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    out = array
    first_axis = array.ndim - len(source_shape)
    for offset, size in enumerate(source_shape):
        axis = first_axis + offset
        if out.shape[axis] == size:
            continue
        lo, hi, weight = inverse_taps(int(size), out.shape[axis])
        if interpolation == "nearest":
            out = np.take(out, np.where(weight >= 0.5, hi, lo), axis=axis)
            continue
        shape = [1] * out.ndim
        shape[axis] = int(size)
        w = weight.reshape(shape)
        low, high = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        out = (low * (1 - w) + high * w).astype(array.dtype, copy=False)
    return np.ascontiguousarray(out)


def restore_to_source(array: np.ndarray, record: dict, fill: float | Sequence[float] = 0,
                      interpolation: str = "nearest") -> np.ndarray:
    """Map an array on the preprocessed grid back onto the case's original grid.

    ``array`` is (*shape) or (C, *shape) where ``shape = record["shape"]`` (labels or
    probabilities). The resize is undone by :func:`resize_back` (``nearest`` for labels,
    ``linear`` for probabilities), the crop by padding with ``fill`` (one value, or one per
    channel: e.g. 1 for the background class of probabilities).
    """
    shape = tuple(record["shape"])
    has_channels = array.ndim == len(shape) + 1
    if tuple(array.shape[-len(shape):]) != shape or array.ndim not in (len(shape), len(shape) + 1):
        raise MrisegError(f"array of shape {array.shape} is not on the preprocessed grid {shape}")
    restored = resize_back(array, record["cropped_shape"], interpolation)
    box = record.get("crop_box")
    if box is None:
        return restored
    original = tuple(record["original_shape"])
    lead = array.shape[:1] if has_channels else ()
    out = np.empty(lead + original, dtype=array.dtype)
    if has_channels:
        fills = np.broadcast_to(np.asarray(fill, dtype=array.dtype), (array.shape[0],))
        out[...] = fills.reshape((-1,) + (1,) * len(original))
    else:
        out[...] = fill
    region = tuple(slice(start, stop) for start, stop in box)
    out[(slice(None), *region) if has_channels else region] = restored
    return out
