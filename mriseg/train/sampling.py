"""What training sees of the cache: volumes, random slices or patches, step batches, the split.

Sample ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)``, so runs, workers,
ranks and resumes agree.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from mriseg.errors import BadInputError, MrisegError
from mriseg.inference.context import slice_with_context
from mriseg.inference.windows import PAD_VALUE
from mriseg.losses import border_weight_map
from mriseg.train.options import TrainOptions
from mriseg.train.run_folder import read_run_config


@dataclass
class Volume:
    """One cached case as the sampler sees it; arrays stay memory-mapped until used."""

    case_id: str
    image: np.ndarray            # (C, *S)
    label: np.ndarray            # (*S) uint8
    slice_axis: int              # spatial axis 2D models slice along
    slice_weights: np.ndarray | None = None      # 2D: probability of each slice
    foreground: np.ndarray | None = None         # 3D: (K, 3) sample of foreground voxel indices
    border_weights: np.ndarray | None = None     # border-ce: U-Net weight map, same shape as label

    @property
    def slices(self) -> int:
        return self.label.shape[self.slice_axis]

    @property
    def in_plane_shape(self) -> tuple[int, ...]:
        """The shape of one slice (what a 2D model sees)."""
        return tuple(n for axis, n in enumerate(self.label.shape) if axis != self.slice_axis)


def load_volumes(cache: Any, case_ids: list[str], spatial_dims: int, uniform_share: float,
                 border_weights: bool, ignore_index: int) -> list[Volume]:
    """Open the cases, precompute 2D slice weights / 3D foreground samples and, for
    ``border-ce``, the U-Net weight maps (computed once here, per slice for 2D)."""
    volumes = []
    for case_id in case_ids:
        image, label = cache.image(case_id), cache.label(case_id)
        record = cache.record(case_id)
        slice_axis = record.get("slice_axis")
        if image.ndim == 3:  # one 2D image: a volume of one slice
            image, label, slice_axis = image[:, None], label[None], 0
        volume = Volume(case_id, image, label, slice_axis if slice_axis is not None else 0)
        if spatial_dims == 2:
            other_axes = tuple(a for a in range(label.ndim) if a != volume.slice_axis)
            area = (np.asarray(label) > 0).sum(axis=other_axes).astype(np.float64)
            uniform = np.full(len(area), 1 / len(area))
            # the reference LGG program: tumour-area weighting plus a uniform share
            volume.slice_weights = uniform if area.sum() == 0 else (1 - uniform_share) * area / area.sum() + \
                uniform_share * uniform
        else:
            coordinates = np.argwhere(np.asarray(label) > 0)
            keep = np.random.default_rng(0).permutation(len(coordinates))[:20000]
            volume.foreground = coordinates[np.sort(keep)]
        if border_weights:
            label_array = np.asarray(label)
            if spatial_dims == 2:
                maps = [border_weight_map(np.take(label_array, index, axis=volume.slice_axis),
                                          ignore_index=ignore_index) for index in range(volume.slices)]
                volume.border_weights = np.stack(maps, axis=volume.slice_axis).astype(np.float16)
            else:
                volume.border_weights = border_weight_map(label_array, ignore_index=ignore_index).astype(np.float16)
        volumes.append(volume)
    return volumes


class TrainingSamples(Dataset):
    """Sample ``i`` of epoch ``e``: a random slice (2D) or patch (3D) drawn with ``rng(seed, e, i)``.

    2D: a patient uniformly, then a slice with the volume's tumour-area weights (and ``context``
    neighbouring slices on each side as extra channels, :mod:`mriseg.inference.context`); with a
    2D ``patch_size`` the slice is then cut to it as a 3D volume is (slices of any size batch).
    3D: a patient uniformly, then a ``patch_size`` patch centred on a tumour voxel with probability
    ``foreground_share``, anywhere otherwise (volumes or slices smaller than the patch are padded
    at the end with the normalised background, the value inference pads with).
    Returns ``(image (C, *P) float32, label (*P) int64, weights (*P) float32 or empty)``.
    """

    def __init__(self, volumes: list[Volume], spatial_dims: int, patch_size: tuple[int, ...] | None,
                 foreground_share: float, seed: int, context: int = 0, front: int = 0):
        self.volumes = volumes
        self.front = front  # valid convolutions: half the output margin, padded before the data
        self.context = context
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.foreground_share = foreground_share
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sys.maxsize  # indices come from StepBatches

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        volume = self.volumes[rng.integers(len(self.volumes))]
        if self.spatial_dims == 2:
            position = int(rng.choice(volume.slices, p=volume.slice_weights))
            image = slice_with_context(volume.image, volume.slice_axis, position, self.context)
            label = np.take(volume.label, position, axis=volume.slice_axis)
            weights = (np.take(volume.border_weights, position, axis=volume.slice_axis)
                       if volume.border_weights is not None else None)
            if self.patch_size is not None:
                image, label, weights = cut_patch(image, label, weights, self.patch_size, np.argwhere(label > 0),
                                                  self.foreground_share, rng, self.front)
        else:
            image, label, weights = cut_patch(volume.image, volume.label, volume.border_weights,
                                              self.patch_size, volume.foreground, self.foreground_share, rng,
                                              self.front)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)) if weights is not None
                else torch.zeros(0))


def cut_patch(image: np.ndarray, label: np.ndarray, weights: np.ndarray | None, patch_size: tuple[int, ...],
              foreground: np.ndarray, foreground_share: float, rng: np.random.Generator, front: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A ``patch_size`` window of ``image (C, *S)``, ``label (*S)`` and ``weights``: centred on a
    random ``foreground`` index with probability ``foreground_share``, anywhere otherwise; axes
    shorter than the patch are padded at the end (image with :data:`PAD_VALUE`, label with
    background), so samples of any size stack into one batch. ``front`` pads every axis before the
    data first (half a valid-convolution network's output margin, as inference pads): the network's
    smaller, centred output then covers the data's first voxels too."""
    if front:
        pad = [(front, 0)] * label.ndim
        image = np.pad(np.asarray(image, dtype=np.float32), [(0, 0), *pad], constant_values=PAD_VALUE)
        label = np.pad(np.asarray(label), pad)
        weights = np.pad(np.asarray(weights), pad, constant_values=1) if weights is not None else None
        foreground = foreground + front if len(foreground) else foreground
    shape = np.array(label.shape)
    patch = np.array(patch_size)
    if len(foreground) and rng.random() < foreground_share:
        centre = foreground[rng.integers(len(foreground))]
        start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
    else:
        start = np.array([rng.integers(max(size - p, 0) + 1) for size, p in zip(shape, patch)])
    region = tuple(slice(int(s), int(s + p)) for s, p in zip(start, patch))
    image = np.asarray(image[(slice(None), *region)], dtype=np.float32)
    label = np.asarray(label[region])
    weights = np.asarray(weights[region]) if weights is not None else None
    missing = patch - np.array(label.shape)
    if missing.any():
        pad = [(0, int(m)) for m in missing]
        image = np.pad(image, [(0, 0), *pad], constant_values=PAD_VALUE)
        label = np.pad(label, pad)
        weights = np.pad(weights, pad, constant_values=1) if weights is not None else None
    return image, label, weights


class StepBatches(Sampler[list[int]]):
    """The distributed batch sampler: step ``t`` of rank ``r`` gets sample indices
    ``[(t * world + r) * batch, ... + batch)``, from ``first_step`` on (for mid-epoch resume)."""

    def __init__(self, steps: int, batch_size: int, rank: int, world_size: int, first_step: int = 0):
        self.steps, self.batch_size, self.rank, self.world_size = steps, batch_size, rank, world_size
        self.first_step = first_step

    def __len__(self) -> int:
        return self.steps - self.first_step

    def __iter__(self):
        for step in range(self.first_step, self.steps):
            start = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(start, start + self.batch_size))


def read_split_file(path: Path, fold: int) -> tuple[list[str], list[str]]:
    """``{"train": [...], "val": [...]}``, or nnU-Net's ``splits_final.json`` (a list of such
    objects, one per fold), from which ``fold`` is taken."""
    try:
        split = json.loads(path.read_text())
        if isinstance(split, list):
            if not split:
                raise ValueError("the list of folds is empty")
            if not 0 <= fold < len(split):
                raise BadInputError(path, f"holds folds 0..{len(split) - 1}; --fold {fold} is not among them")
            split = split[fold]
        train_ids, val_ids = [str(c) for c in split["train"]], [str(c) for c in split["val"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(path, "not a split file with 'train' and 'val' lists of case ids, or a list of "
                                  f"them per fold as nnU-Net's splits_final.json ({error})") from error
    return train_ids, val_ids


def split_cases(case_ids: list[str], options: TrainOptions) -> tuple[list[str], list[str]]:
    """Train / validation case ids, split by patient: ``--split``, ``--folds/--fold`` or ``--val-fraction``
    (0: every case trains, none validates)."""
    if options.split:
        path = Path(options.split)
        train_ids, val_ids = read_split_file(path, options.fold)
        unknown = sorted(set(train_ids + val_ids) - set(case_ids))
        if unknown:
            raise BadInputError(path, f"case ids not in the cache: {', '.join(unknown[:5])}")
        if set(train_ids) & set(val_ids):
            raise BadInputError(path, "a case is in both train and val")
        if not train_ids or not val_ids:
            raise BadInputError(path, f"the {'train' if not train_ids else 'val'} list is empty")
        return train_ids, val_ids
    if options.val_fraction == 0:
        return list(case_ids), []
    order = [case_ids[i] for i in np.random.default_rng(options.seed).permutation(len(case_ids))]
    if options.folds:
        if len(order) < options.folds:
            raise MrisegError(f"--folds {options.folds} needs at least that many labelled cases, have {len(order)}")
        folds = np.array_split(np.arange(len(order)), options.folds)
        val_ids = [order[i] for i in folds[options.fold]]
    else:
        val_ids = order[:max(1, round(options.val_fraction * len(order)))]
    train_ids = [case_id for case_id in case_ids if case_id not in val_ids]
    if not train_ids:
        raise MrisegError(f"only {len(case_ids)} labelled case(s): nothing left to train on after the validation split")
    return train_ids, sorted(val_ids, key=case_ids.index)


def saved_split(run_dir: Path, labelled: list[str]) -> tuple[list[str], list[str]]:
    """The train / validation split a resumed run was started with (config.json), never recomputed:
    cases added to the cache since then must not move from training into validation."""
    path = run_dir / "config.json"
    saved = read_run_config(path)
    train_ids, val_ids = saved.get("train_cases"), saved.get("val_cases")
    if not (isinstance(train_ids, list) and isinstance(val_ids, list) and train_ids):
        raise BadInputError(path, "has no train_cases / val_cases lists to resume with")
    missing = sorted(set(train_ids + val_ids) - set(labelled))
    if missing:
        raise BadInputError(path, f"cases of the run are no longer labelled in the cache: {', '.join(missing[:5])}")
    return [str(c) for c in train_ids], [str(c) for c in val_ids]
