"""The one in-memory form every reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Case:
    """One patient or image, as read from disk, before any preprocessing.

    Attributes:
        case_id: unique id within its dataset (folder or file stem).
        image: float32, channels first: (C, H, W) for 2D, (C, *spatial) for 3D.
            NIfTI arrays keep nibabel's voxel order (i, j, k), so ``affine`` maps
            them to world coordinates unchanged; LGG slice stacks are (C, slices, H, W).
        label: integer array of the spatial shape, or None when the case has no label.
        spacing: voxel size in mm for each spatial axis, in array order.
        affine: 4x4 voxel-to-world matrix for NIfTI sources, else None.
        modalities: one name per channel (e.g. ``["flair", "t1ce"]``).
        source_paths: the files the case was read from, images first, label last.
        layout: the reader that produced it (``lgg``, ``brats``, ``msd``, ``pairs``).
        slice_axis: the spatial axis (0-based, not counting channels) along which
            2D models take slices; the axial axis. None for single 2D images.
        header: extra geometry to restore on output (NIfTI: a dict with
            ``qform_code``, ``sform_code``, ``qform``, ``sform``, ``zooms``; TIF/PNG
            slice stacks: ``slice_names`` in order).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    modalities: list[str] = field(default_factory=list)
    source_paths: list[Path] = field(default_factory=list)
    layout: str = ""
    slice_axis: int | None = None
    header: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def spatial_dims(self) -> int:
        return self.image.ndim - 1
