"""Image/mask pairs matched by name: ``images/`` + ``masks/`` folders, or ``<stem>`` + ``<stem>_mask``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mriseg.data.case import Case
from mriseg.data.readers.common import (CaseRef, MASK_SUFFIXES, binary_mask_from_255, image_channels, is_2d_image,
                                        is_nifti, mask_2d, read_image_2d, read_nifti_case, strip_suffix,
                                        visible_files)
from mriseg.data.readers.detect import folder_pairs
from mriseg.errors import BadInputError


def by_stem(files: list[Path]) -> dict[str, Path]:
    """Files by name without extension; two files with one stem (``a.png`` and ``a.tif``) would
    leave which one is the case (or its mask) to chance, so they are refused."""
    found: dict[str, Path] = {}
    for path in files:
        stem = strip_suffix(path.name)[0]
        if stem in found:
            raise BadInputError(path, f"{found[stem].name} has the same name without extension; keep one "
                                      "(which one is the case would be a guess)")
        found[stem] = path
    return found


def list_pair_folder(images: Path, masks: Path, id_prefix: str) -> list[CaseRef]:
    by_stem_of_masks = {}
    for stem, path in by_stem([p for p in visible_files(masks) if is_nifti(p) or is_2d_image(p)]).items():
        by_stem_of_masks[stem] = path
        for suffix in MASK_SUFFIXES:  # images/a.png with masks/a_mask.png
            if stem.endswith(suffix):
                by_stem_of_masks.setdefault(stem[: -len(suffix)], path)
    refs = []
    for stem, image in by_stem([p for p in visible_files(images) if is_nifti(p) or is_2d_image(p)]).items():
        refs.append(CaseRef(case_id=id_prefix + stem, layout="pairs", image_paths=(image,),
                            label_paths=(by_stem_of_masks[stem],) if stem in by_stem_of_masks else ()))
    return refs


def list_pairs(root: Path) -> list[CaseRef]:
    pairs = folder_pairs(root)
    if pairs:
        # Several pairs (train_images + train_labels, val_images + val_labels): ids get the folder name.
        several = len(pairs) > 1
        return [ref for images, masks in pairs
                for ref in list_pair_folder(images, masks, f"{images.name}-" if several else "")]
    files = by_stem([p for p in visible_files(root) if is_nifti(p) or is_2d_image(p)])
    mask_stems = {s for s in files if s.endswith(MASK_SUFFIXES) and s.rsplit("_", 1)[0] in files}
    refs = []
    for stem, image in sorted(files.items()):
        if stem in mask_stems:
            continue
        mask = next((files[stem + s] for s in MASK_SUFFIXES if stem + s in files), None)
        refs.append(CaseRef(case_id=stem, layout="pairs", image_paths=(image,),
                            label_paths=(mask,) if mask else ()))
    return refs


def read_pair(ref: CaseRef) -> Case:
    path = ref.image_paths[0]
    if is_nifti(path):
        return read_nifti_case(ref, channels_last_4d=True)
    image = image_channels(read_image_2d(path, intensities=True), path)
    label = None
    if ref.label_paths:
        mask_path = ref.label_paths[0]
        if is_nifti(mask_path):
            raise BadInputError(mask_path, f"a NIfTI mask for the 2D image {path.name}")
        label = mask_2d(read_image_2d(mask_path), mask_path)
        if set(np.unique(label).tolist()) <= {0, 255}:
            label = binary_mask_from_255(label, mask_path)
        if label.shape != image.shape[1:]:
            raise BadInputError(mask_path, f"mask shape {label.shape} differs from image shape {image.shape[1:]} "
                                           f"of {path.name}")
    return Case(case_id=ref.case_id, image=image, label=label, spacing=(1.0, 1.0), affine=None,
                modalities=[f"channel{c}" for c in range(image.shape[0])] if image.shape[0] > 1 else ["image"],
                source_paths=ref.source_paths, layout="pairs", slice_axis=None, header={})
