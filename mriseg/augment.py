"""Batched data augmentation in torch, on whatever device the batch lives on.

Flips, rotation and scaling are folded into one affine matrix per sample, an optional
elastic displacement field is added to the sampling grid, and the whole batch is
resampled with a single ``grid_sample`` call: images and weight maps bilinearly, labels
with nearest neighbour so no new label values appear. Intensity shift and scale are
drawn per sample and channel. Random numbers come from a CPU ``torch.Generator`` so a
seeded run draws the same transforms on CPU and GPU.

Defaults follow the reference LGG program: left-right flips, rotation +-15 degrees,
scaling +-5 %; elastic deformation (U-Net paper) is off unless asked for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mriseg.errors import MrisegError


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; a zero range switches that transform off.

    flip: mirror with probability 1/2 along the last spatial axis (2D) or every axis (3D).
    rotate_degrees: uniform rotation in +-degrees (in-plane for 2D, about each axis for 3D).
    scale: uniform zoom factor in 1 +- scale.
    elastic: largest displacement in voxels of a smooth random field with control points
        every ``elastic_spacing`` voxels (U-Net paper style).
    intensity_shift / intensity_scale: per-channel ``x * (1 + g) + s`` with g, s uniform in +-range.
    modality_dropout: probability that a sample loses one modality, chosen at random, which is set
        to 0 (the normalised brain mean), so the network cannot lean on one contrast alone; only
        with two or more modalities.
    """

    flip: bool = True
    rotate_degrees: float = 15.0
    scale: float = 0.05
    elastic: float = 0.0
    elastic_spacing: int = 16
    intensity_shift: float = 0.1
    intensity_scale: float = 0.1
    modality_dropout: float = 0.0

    @property
    def enabled(self) -> bool:
        return self != NO_AUGMENTATION

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENTATION = AugmentConfig(flip=False, rotate_degrees=0.0, scale=0.0, elastic=0.0,
                                intensity_shift=0.0, intensity_scale=0.0, modality_dropout=0.0)
_KEYS = {"rotate": "rotate_degrees", "scale": "scale", "elastic": "elastic", "spacing": "elastic_spacing",
         "shift": "intensity_shift", "gain": "intensity_scale", "dropout": "modality_dropout"}


def parse_augment(spec: str) -> AugmentConfig:
    """``--augment``: ``default``, ``none``, or a comma list such as ``flip,rotate=15,scale=0.05,elastic=4``.

    In a list, named transforms are on (with their default range unless ``=value`` is given)
    and unnamed ones are off; ``intensity`` turns on both shift and gain; ``default`` in a list
    turns on the defaults, so ``default,dropout`` adds modality dropout to them.
    """
    spec = spec.strip().lower()
    if spec == "default":
        return AugmentConfig()
    if spec in ("none", "off", ""):
        return NO_AUGMENTATION
    defaults = AugmentConfig()
    chosen: dict = {field: getattr(NO_AUGMENTATION, field) for field in asdict(NO_AUGMENTATION)}
    chosen["elastic_spacing"] = defaults.elastic_spacing
    for item in spec.split(","):
        name, _, raw = item.strip().partition("=")
        if name == "default":  # "default,dropout": the defaults plus what follows
            chosen.update(asdict(defaults))
        elif name == "flip":
            if raw not in ("", "1", "0", "on", "off", "true", "false"):
                raise MrisegError(f"--augment: flip={raw!r}; flip takes no value, or on/off")
            chosen["flip"] = raw not in ("0", "off", "false")
        elif name == "intensity":  # both ranges, the default ones or the value given
            value = _number(name, raw) if raw else None
            chosen["intensity_shift"] = defaults.intensity_shift if value is None else value
            chosen["intensity_scale"] = defaults.intensity_scale if value is None else value
        elif name in _KEYS:
            field = _KEYS[name]
            chosen[field] = type(getattr(defaults, field))(_number(name, raw, integer=field == "elastic_spacing")) \
                if raw else getattr(defaults, field)
            if not raw and name in _DEFAULT_WHEN_NAMED:
                chosen[field] = _DEFAULT_WHEN_NAMED[name]
        else:
            raise MrisegError(f"--augment: unknown transform {name!r}; use flip, rotate, scale, elastic, "
                              "spacing, shift, gain, intensity, dropout, or 'default' / 'none'")
    config = AugmentConfig(**chosen)
    check_augment(config)
    return config


def _number(name: str, raw: str, integer: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise MrisegError(f"--augment: {name}={raw!r} is not a number") from None
    if integer and not value.is_integer():
        raise MrisegError(f"--augment: {name}={raw!r} is not a whole number")
    return value


# off by default, so naming one without a value needs a range of its own
_DEFAULT_WHEN_NAMED = {"elastic": 4.0, "dropout": 0.25}
# the largest value each range may take: beyond it a transform is no longer a plausible scan
_LIMITS = {"rotate_degrees": (180.0, "degrees"), "scale": (0.5, "a zoom factor of 1 +- scale"),
           "elastic": (64.0, "voxels"), "intensity_shift": (2.0, "normalised units"),
           "intensity_scale": (0.9, "a gain of 1 +- gain, which must stay positive"),
           "modality_dropout": (1.0, "a probability")}


def check_augment(config: AugmentConfig) -> None:
    """One line naming the transform whose range is negative, not finite or beyond its limit."""
    inverse = {field: name for name, field in _KEYS.items()}
    for field, (limit, meaning) in _LIMITS.items():
        value = getattr(config, field)
        if not (math.isfinite(value) and 0 <= value <= limit):
            raise MrisegError(f"--augment: {inverse[field]}={value:g} is out of range; it takes 0 to {limit:g} "
                              f"({meaning})")
    if config.elastic_spacing < 2:
        raise MrisegError(f"--augment: spacing={config.elastic_spacing} is out of range; the elastic field's "
                          "control points need at least 2 voxels between them")


def _uniform(count: int, spread: float, generator: torch.Generator, shape: tuple[int, ...] = ()) -> Tensor:
    return (torch.rand((count, *shape), generator=generator) * 2 - 1) * spread


def _rotation_matrices(angles: Tensor, spatial_dims: int) -> Tensor:
    """(N, d, d) rotations in (x, y[, z]) order from angles in radians, (N,) for 2D or (N, 3) for 3D."""
    if spatial_dims == 2:
        cos, sin = angles.cos(), angles.sin()
        return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    matrices = torch.eye(3).repeat(len(angles), 1, 1)
    for axis in range(3):
        cos, sin = angles[:, axis].cos(), angles[:, axis].sin()
        i, j = [a for a in range(3) if a != axis]
        single = torch.eye(3).repeat(len(angles), 1, 1)
        single[:, i, i], single[:, i, j], single[:, j, i], single[:, j, j] = cos, -sin, sin, cos
        matrices = matrices @ single
    return matrices


def _sampling_grid(shape: tuple[int, ...], config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """A grid for ``grid_sample`` holding one random flip/rotation/scale (+ elastic) per sample."""
    count, spatial = shape[0], shape[1:]
    dims = len(spatial)
    sizes_xyz = torch.tensor(spatial[::-1], dtype=torch.float32)  # affine_grid orders axes x, y, z
    angles = _uniform(count, math.radians(config.rotate_degrees), generator, () if dims == 2 else (3,))
    zoom = 1 + _uniform(count, config.scale, generator)
    matrix = _rotation_matrices(angles, dims) * zoom.view(-1, 1, 1)
    if config.flip:
        flip_axes = torch.ones(count, dims)
        flippable = [0] if dims == 2 else list(range(dims))  # x is the left-right axis of a 2D slice
        draws = torch.rand(count, len(flippable), generator=generator) < 0.5
        flip_axes[:, flippable] = torch.where(draws, -1.0, 1.0)
        matrix = matrix * flip_axes.view(count, 1, dims)
    # rotate in voxel units, not in normalised units, so non-square images keep their aspect
    to_voxels = torch.diag(sizes_xyz)
    theta = torch.linalg.inv(to_voxels) @ matrix @ to_voxels
    theta = torch.cat([theta, torch.zeros(count, dims, 1)], dim=2)
    grid = F.affine_grid(theta, [count, 1, *spatial], align_corners=False)
    if config.elastic > 0:
        coarse = [max(2, size // config.elastic_spacing + 1) for size in spatial]
        noise = _uniform(count, 1.0, generator, (dims, *coarse))
        mode = "bicubic" if dims == 2 else "trilinear"
        field = F.interpolate(noise, size=list(spatial), mode=mode, align_corners=True)
        field = field * (config.elastic * 2 / sizes_xyz).view(1, dims, *[1] * dims)
        grid = grid + field.movedim(1, -1)
    return grid


def augment_batch(images: Tensor, labels: Tensor, config: AugmentConfig, generator: torch.Generator,
                  weights: Tensor | None = None, slices: int = 1) -> tuple[Tensor, Tensor, Tensor | None]:
    """Randomly transform a batch.

    Args:
        images: float ``(N, C, *spatial)``.
        labels: integer ``(N, *spatial)`` label values (resampled with nearest neighbour).
        config: transform ranges.
        generator: CPU generator the random parameters are drawn from.
        weights: optional float ``(N, *spatial)`` per-voxel loss weights, moved with the labels.
        slices: 2.5D input (:mod:`mriseg.inference.context`): the channels are this many blocks of
            the same modalities, which get the same intensity gain and shift, as one scan would.

    Returns:
        ``(images, labels, weights)`` on the input's device, same shapes and dtypes.
    """
    if not config.enabled:
        return images, labels, weights
    device = images.device
    count, channels = images.shape[:2]
    spatial = images.shape[2:]
    if config.flip or config.rotate_degrees or config.scale or config.elastic:
        grid = _sampling_grid((count, *spatial), config, generator).to(device)
        grid = grid.to(images.dtype) if images.is_floating_point() else grid
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        label_grid = grid.float()
        labels = F.grid_sample(labels.unsqueeze(1).float(), label_grid, mode="nearest",
                               padding_mode="border", align_corners=False).squeeze(1).to(labels.dtype)
        if weights is not None:
            weights = F.grid_sample(weights.unsqueeze(1).float(), label_grid, mode="bilinear",
                                    padding_mode="border", align_corners=False).squeeze(1).to(weights.dtype)
    if config.intensity_shift or config.intensity_scale:
        view = (count, channels, *[1] * len(spatial))
        modalities = channels // slices
        gain = (1 + _uniform(count, config.intensity_scale, generator, (modalities,))).repeat(1, slices).view(view)
        shift = _uniform(count, config.intensity_shift, generator, (modalities,)).repeat(1, slices).view(view)
        images = images * gain.to(device, images.dtype) + shift.to(device, images.dtype)
    if config.modality_dropout and channels // slices > 1:
        images = drop_modalities(images, config.modality_dropout, generator, slices)
    return images, labels, weights


def drop_modalities(images: Tensor, probability: float, generator: torch.Generator, slices: int = 1) -> Tensor:
    """Set one random modality (with all its 2.5D context slices) of each chosen sample to 0.

    A sample is chosen with ``probability``; at most one of its modalities is dropped, so every
    sample keeps at least one.
    """
    count, channels = images.shape[:2]
    modalities = channels // slices
    chosen = torch.rand(count, generator=generator) < probability
    dropped = torch.randint(modalities, (count,), generator=generator)
    keep = torch.ones(count, modalities)
    keep[chosen, dropped[chosen]] = 0.0
    keep = keep.repeat(1, slices).view(count, channels, *[1] * (images.ndim - 2))
    return images * keep.to(images.device, images.dtype)
