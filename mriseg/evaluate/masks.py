"""Reading masks for scoring: NIfTI files, TIF/PNG slices, case folders, and the truth of a dataset."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mriseg.data.readers import case_id_from_name
from mriseg.errors import BadInputError, MrisegError
from mriseg.labels import Region, regions_from_label_names, scheme_of_regions
from mriseg.log import warn



NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_SUFFIXES = (".tif", ".tiff", ".png")


@dataclass
class MaskVolume:
    """One case's label volume as read for scoring."""

    case_id: str
    labels: np.ndarray                 # integer label values, spatial shape only
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    path: Path                         # what to name in error messages
    spacing_known: bool = True
    ignore_label: int | None = None    # truth voxels with this value count on neither side (nnU-Net's "ignore")
    values: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.labels.dtype.kind == "u" and self.labels.itemsize <= 2:
            # A histogram avoids np.unique's sort of the whole volume.
            self.values = np.flatnonzero(np.bincount(self.labels.ravel()))
        else:
            self.values = np.unique(self.labels)


def _visible(folder: Path) -> list[Path]:
    """Entries not starting with a dot: temporary files of an unfinished write are hidden."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_side_output(path: Path) -> bool:
    """What ``mriseg predict`` writes beside its masks: soft maps and overlay pictures."""
    stem = case_id_from_name(path.name)
    return (path.is_dir() and path.name == "overlays") or stem.endswith("_probabilities")


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels from a stored array; floats must hold whole numbers (BraTS stores float32)."""
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind != "f":
        raise BadInputError(path, f"mask has unsupported data type {data.dtype}")
    if not np.isfinite(data).all():
        raise BadInputError(path, "mask contains NaN or infinite values")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise BadInputError(path, "mask holds non-integer values (probabilities?); threshold it first")
    if rounded.min() < 0 or rounded.max() > 65535:
        raise BadInputError(path, f"mask values outside 0..65535 ({rounded.min():g}..{rounded.max():g})")
    return rounded.astype(np.uint16)


def read_nifti_mask(path: Path, case_id: str | None = None) -> MaskVolume:
    """A NIfTI mask through the readers' one NIfTI reader (readable, voxel sizes and affine checked)."""
    from mriseg.data.readers import read_nifti

    data, affine, geometry = read_nifti(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise BadInputError(path, f"mask must be 2D or 3D, got shape {data.shape}")
    zooms = tuple(float(z) for z in geometry["spacing_mm"][: data.ndim])
    return MaskVolume(case_id or case_id_from_name(path.name), _as_labels(data, path), zooms, affine, path)


def _read_slice(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            data = np.asarray(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError for broken files
        raise BadInputError(path, f"cannot read mask image ({error.__class__.__name__}: {error})") from error
    if data.ndim == 3:
        # RGB(A) masks saved by image editors: grey when all colour channels agree.
        if not all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, min(3, data.shape[-1]))):
            raise BadInputError(path, f"mask is a colour image of shape {data.shape}; expected a grey mask")
        data = data[..., 0]
    return _as_labels(data, path)


def _slice_number(path: Path) -> tuple[int, str]:
    """Sort key: the last integer in the name (``..._10_mask.tif`` -> 10), not the lexical order."""
    numbers = re.findall(r"\d+", path.name)
    return (int(numbers[-1]) if numbers else -1, path.name)


def read_slice_folder(folder: Path) -> MaskVolume:
    """Stack a folder of TIF/PNG mask slices along axis 0, in slice-number order."""
    files = [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES]
    masks = [p for p in files if case_id_from_name(p.name) != p.name.rsplit(".", 1)[0]]
    files = sorted(masks or files, key=_slice_number)
    if not files:
        raise BadInputError(folder, "no NIfTI, TIF or PNG mask files in this folder")
    slices = [_read_slice(p) for p in files]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise BadInputError(folder, f"mask slices have different shapes: {sorted(shapes)}")
    stacked = np.stack(slices)
    return MaskVolume(folder.name, stacked, (1.0,) * stacked.ndim, None, folder, spacing_known=False)


def read_mask(path: Path) -> MaskVolume:
    """One case's mask from a NIfTI file, a single TIF/PNG image, or a folder per case."""
    name = path.name.lower()
    if path.is_file():
        if name.endswith(NIFTI_SUFFIXES):
            return read_nifti_mask(path)
        if name.endswith(SLICE_SUFFIXES):
            labels = _read_slice(path)
            return MaskVolume(case_id_from_name(path.name), labels, (1.0,) * labels.ndim, None, path,
                              spacing_known=False)
        raise BadInputError(path, "not a mask file (expected .nii.gz, .nii, .tif, .tiff or .png)")
    niftis = [p for p in _visible(path) if p.name.lower().endswith(NIFTI_SUFFIXES) and not _is_side_output(p)]
    if len(niftis) == 1:
        return read_nifti_mask(niftis[0], case_id=path.name)
    if len(niftis) > 1:
        raise BadInputError(path, f"{len(niftis)} NIfTI files in one case folder; expected one mask (for a "
                                  "BraTS dataset named otherwise pass --modalities flair=...,seg=LABEL_NAME)")
    return read_slice_folder(path)


def find_mask_cases(root: Path) -> dict[str, Path]:
    """Case id -> mask path for a mask file or a folder of mask files / case folders."""
    if not root.exists():
        raise BadInputError(root, "no such file or folder")
    if root.is_file():
        return {case_id_from_name(root.name): root}
    cases: dict[str, Path] = {}
    for entry in _visible(root):
        if _is_side_output(entry):
            continue
        lower = entry.name.lower()
        if entry.is_dir() or lower.endswith(NIFTI_SUFFIXES + SLICE_SUFFIXES):
            case_id = case_id_from_name(entry.name) if entry.is_file() else entry.name
            if case_id in cases:
                raise BadInputError(entry, f"case id {case_id!r} also given by {cases[case_id].name}")
            cases[case_id] = entry
    if not cases:
        raise BadInputError(root, "no masks found (expected <case_id>.nii.gz files, TIF/PNG masks "
                                  "or one folder per case)")
    return cases



@dataclass
class TruthSource:
    """The true label volumes, by case id, and the label scheme they imply."""

    case_ids: list[str]
    read: Callable[[str], MaskVolume]
    default_scheme: str


def scheme_for_dataset(ref: Any) -> str | tuple[Region, ...]:
    """The ``--regions auto`` scheme of a dataset, from a reader's :class:`CaseRef` (nnU-Net
    dataset.json region lists are scored as those regions)."""
    if getattr(ref, "label_regions", ()):
        return tuple(Region(name, tuple(labels)) for name, labels in ref.label_regions)
    if ref.layout == "brats":
        return "brats2023" if ref.naming == "brats2023" else "brats"
    if ref.layout == "msd":
        named = regions_from_label_names(ref.label_names)
        if named is not None:
            return scheme_of_regions(named)
        return "binary" if len([value for value, _ in ref.label_names if value]) <= 1 else "labels"
    return "binary"


def read_reference_labels(ref: Any) -> MaskVolume:
    """Only the label files of a reader's case: no need to decode four modalities to score."""
    if ref.layout == "lgg":
        slices = [_read_slice(path) for path in ref.label_paths]
        stacked = np.stack(slices)
        return MaskVolume(ref.case_id, stacked, (1.0,) * stacked.ndim, None, ref.label_paths[0].parent,
                          spacing_known=False)
    mask = read_mask(ref.label_paths[0])
    mask.case_id = ref.case_id
    mask.ignore_label = getattr(ref, "ignore_label", None)
    return mask


def without_ignored(pred: MaskVolume, truth: MaskVolume) -> tuple[MaskVolume, MaskVolume]:
    """Both volumes with the truth's ignore-label voxels set to background on both sides, so they
    are neither found nor missed (nnU-Net leaves them out of its counts)."""
    if truth.ignore_label is None or truth.ignore_label not in truth.values:
        return pred, truth
    ignored = truth.labels == truth.ignore_label
    return (replace(pred, labels=np.where(ignored, 0, pred.labels)),
            replace(truth, labels=np.where(ignored, 0, truth.labels), ignore_label=None))


def open_truth(root: Path, modalities: str | None = None) -> TruthSource:
    """The truth at ``root``: a labelled dataset the readers know, else mask files.

    ``modalities`` is the readers' BraTS file-name map (``seg=OTMultiClass,...``) for datasets
    whose files are not named like BraTS's.

    A folder of bare masks (``<case_id>.nii.gz``, TIF/PNG masks, a folder per case holding
    one mask) is not a dataset to the readers, so their refusal sends us to the mask files.
    """
    from mriseg.data.readers import list_cases

    try:
        refs = list_cases(root, modalities=modalities)
    except MrisegError as dataset_error:
        try:
            cases = find_mask_cases(root)
        except MrisegError as masks_error:
            raise MrisegError(f"{root}: neither a labelled dataset ({dataset_error}) nor a folder of masks "
                              f"({masks_error})") from masks_error
        return TruthSource(sorted(cases), lambda case_id: read_mask(cases[case_id]), "binary")
    labelled = {ref.case_id: ref for ref in refs if ref.has_label}
    if not labelled:
        raise BadInputError(root, f"a {refs[0].layout} dataset without labels: nothing to score against")
    if len(labelled) < len(refs):
        warn(f"{len(refs) - len(labelled)} case(s) in {root} have no label and are not scored")
    return TruthSource(sorted(labelled), lambda case_id: read_reference_labels(labelled[case_id]),
                       scheme_for_dataset(next(iter(labelled.values()))))
