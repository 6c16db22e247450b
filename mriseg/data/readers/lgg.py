"""Kaggle kaggle_3m: ``TCGA_*/<patient>_<n>.tif`` RGB slices with ``<patient>_<n>_mask.tif`` masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mriseg.data.case import Case
from mriseg.data.readers.common import (CaseRef, LGG_MASK, LGG_SLICE, binary_mask_from_255, image_channels, mask_2d,
                                        read_image_2d, visible_dirs, visible_files)
from mriseg.data.readers.detect import lgg_patient_files
from mriseg.errors import BadInputError
from mriseg.labels import LABEL_NAMES


# kaggle_3m slice channels, in file order (Buda et al. 2019).
LGG_MODALITIES = ["pre-contrast", "flair", "post-contrast"]
def list_lgg(root: Path) -> list[CaseRef]:
    folders = [root] if lgg_patient_files(root) else [d for d in visible_dirs(root) if lgg_patient_files(d)]
    refs = []
    for folder in folders:
        slices: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for file in visible_files(folder):
            match = LGG_MASK.match(file.name) or LGG_SLICE.match(file.name)
            if not match:
                continue
            table = masks if file.name.endswith("_mask.tif") else slices
            number = int(match["n"])
            if number in table:  # _2.tif and _02.tif: one slice number, two files
                raise BadInputError(file, f"slice number {number} is also given by {table[number].name}; "
                                          "keep one file per slice")
            table[number] = file
        if not slices:
            raise BadInputError(folder, "has masks but no slice images <patient>_<n>.tif")
        numbers = sorted(slices)  # integer order: 2 before 10
        check_slice_numbers(folder, slices, masks)
        refs.append(CaseRef(
            case_id=folder.name, layout="lgg",
            image_paths=tuple(slices[n] for n in numbers),
            label_paths=tuple(masks[n] for n in numbers) if masks else (),
            modalities=tuple(LGG_MODALITIES), label_names=tuple(LABEL_NAMES["binary"].items()),
        ))
    return refs


def check_slice_numbers(folder: Path, slices: dict[int, Path], masks: dict[int, Path]) -> None:
    """One patient's slices must be consecutive (stacked with a gap, the slices either side of it
    would pass for neighbours in 3D), and masks and slices must pair up one to one."""
    numbers = sorted(slices)
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if gaps:
        stem = slices[numbers[0]].name.rsplit("_", 1)[0]
        raise BadInputError(folder / f"{stem}_{gaps[0]}.tif", f"slice missing: the patient's slices run "
                                                              f"{numbers[0]}..{numbers[-1]} with {len(gaps)} gap(s)")
    missing = [slices[n].name for n in numbers if n not in masks]
    if masks and missing:
        raise BadInputError(folder / missing[0], f"slice has no mask (expected {missing[0][:-4]}_mask.tif)")
    orphans = [masks[n] for n in sorted(masks) if n not in slices]
    if orphans:
        raise BadInputError(orphans[0], "mask has no slice image beside it (expected "
                                        f"{orphans[0].name.replace('_mask.tif', '.tif')})")


def read_lgg(ref: CaseRef) -> Case:
    slices = [image_channels(read_image_2d(p, intensities=True), p) for p in ref.image_paths]
    first = slices[0]
    if first.shape[0] != len(LGG_MODALITIES):
        raise BadInputError(ref.image_paths[0], f"slice has {first.shape[0]} channel(s); kaggle_3m slices are RGB: "
                                                f"{', '.join(LGG_MODALITIES)}")
    for path, array in zip(ref.image_paths, slices):
        if array.shape != first.shape:
            raise BadInputError(path, f"slice shape {array.shape[1:]} x{array.shape[0]} channels differs from "
                                      f"{first.shape[1:]} x{first.shape[0]} of {ref.image_paths[0].name}")
    image = np.stack(slices, axis=1)  # (C, slices, H, W)
    label = None
    if ref.label_paths:
        masks = []
        for image_path, mask_path in zip(ref.image_paths, ref.label_paths):
            mask = binary_mask_from_255(mask_2d(read_image_2d(mask_path), mask_path), mask_path)
            if mask.shape != first.shape[1:]:
                raise BadInputError(mask_path, f"mask shape {mask.shape} differs from image shape "
                                               f"{first.shape[1:]} of {image_path.name}")
            masks.append(mask)
        label = np.stack(masks)
    return Case(case_id=ref.case_id, image=image, label=label, spacing=(1.0,) * 3, affine=None,
                modalities=list(ref.modalities), source_paths=ref.source_paths, layout="lgg", slice_axis=0,
                header={"slice_names": [p.name for p in ref.image_paths],
                        "label_names": {str(k): v for k, v in ref.label_names}})


# Largest difference (mm) between two affines taken as the same grid: float32 rounding, not another scan.
