"""What every layout shares: :class:`CaseRef`, file-name helpers, and the file readers (NIfTI, 2D images)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mriseg.data.case import Case
from mriseg.errors import BadInputError, MrisegError


NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIXES = ("_mask", "_seg", "_label", "_labels")
LABEL_KEYS = ("seg", "label")
# kaggle_3m slice and mask names (detection and the lgg reader both use them).
LGG_SLICE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tif$")
LGG_MASK = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)_mask\.tif$")
@dataclass(frozen=True)
class CaseRef:
    """Where one case's files are, found from file names alone (no pixels read).

    ``image_paths`` holds one file per channel (brats, nnU-Net), one 4D file (MSD),
    or one file per slice in slice order (lgg). ``label_paths`` is empty when the
    case has no label, one file, or one mask per slice (lgg).
    """

    case_id: str
    layout: str
    image_paths: tuple[Path, ...]
    label_paths: tuple[Path, ...] = ()
    modalities: tuple[str, ...] = ()
    label_names: tuple[tuple[int, str], ...] = ()
    naming: str = ""
    label_regions: tuple[tuple[str, tuple[int, ...]], ...] = ()   # nnU-Net dataset.json region lists
    ignore_label: int | None = None                               # nnU-Net dataset.json "ignore"
    allowed_labels: tuple[int, ...] = ()                          # every value dataset.json declares

    @property
    def source_paths(self) -> list[Path]:
        return [*self.image_paths, *self.label_paths]

    @property
    def has_label(self) -> bool:
        return bool(self.label_paths)


def strip_suffix(name: str) -> tuple[str, str]:
    """``'a_seg.nii.gz' -> ('a_seg', '.nii.gz')``; any other single suffix likewise."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot else (name, "")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def is_2d_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_2D_SUFFIXES


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` not starting with a dot (MSD tarballs carry macOS ``._`` files)."""
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as error:
        raise BadInputError(folder, f"cannot list folder ({error.strerror})") from error
    for entry in entries:
        if entry.is_symlink() and not entry.exists() and (is_nifti(entry) or is_2d_image(entry)):
            raise BadInputError(entry, "is a symbolic link that points nowhere or to itself")
    return entries


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in entries(folder) if p.is_file())


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in entries(folder) if p.is_dir())


def require_existing(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise BadInputError(path, "is a symbolic link that points nowhere or to itself")
    if not path.exists():
        raise BadInputError(path, "no such file or folder")


def parse_modalities(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """``'flair=Flair_x,seg=OT'`` -> ``{'flair': 'Flair_x', 'seg': 'OT'}`` (order kept)."""
    if spec is None or isinstance(spec, dict):
        return spec
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, file_name = item.strip().partition("=")
        if not sep or not name.strip() or not file_name.strip():
            raise MrisegError(f"--modalities: '{item}' is not NAME=FILENAME (e.g. flair=Flair_subtrMeanDivStd)")
        mapping[name.strip()] = file_name.strip()
    if not any(k not in LABEL_KEYS for k in mapping):
        raise MrisegError("--modalities names no image modality, only a label")
    return mapping


def check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise BadInputError(path, f"contains {bad} NaN/Inf voxels")


def check_image_dtype(array: np.ndarray, path: Path) -> None:
    """Refuse data types whose conversion to float32 would lose or invent information."""
    if np.iscomplexobj(array):
        raise BadInputError(path, f"complex-valued data ({array.dtype}); mriseg needs real intensities "
                                  "(take the magnitude first)")
    if array.dtype.kind not in "biuf":
        raise BadInputError(path, f"unsupported data type {array.dtype} (expected numbers)")


def as_label(array: np.ndarray, path: Path) -> np.ndarray:
    """Check that a label array holds integers 0..255 and return it as uint8."""
    check_image_dtype(array, path)
    if np.issubdtype(array.dtype, np.floating):
        check_finite(array, path)
        if not np.array_equal(array, np.round(array)):
            raise BadInputError(path, "label has non-integer values (is this an image rather than a mask?)")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise BadInputError(path, f"label has unsupported type {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise BadInputError(path, f"label values must lie in 0..255, found {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def nifti_slice_axis(affine: np.ndarray) -> int:
    """The array axis closest to the superior-inferior world axis of ``affine``."""
    import nibabel.orientations as orientations

    world_axes = orientations.io_orientation(affine)[:3, 0]
    matches = np.flatnonzero(world_axes == 2)
    return int(matches[0]) if matches.size else 2


# NIfTI length units (xyzt_units) in mm; "unknown" is read as mm, as nibabel and ITK do.
MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a NIfTI file: (array in nibabel's voxel order, affine, header geometry)."""
    import nibabel as nib

    check_readable(path)
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # its header fixes are reported once, below
            image = nib.load(str(path))
        check_voxel_sizes(path, type(image.header))
        array = np.asanyarray(image.dataobj)
        header = image.header
        geometry = {
            "qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"]),
            "qform": header.get_qform().tolist(), "sform": header.get_sform().tolist(),
            "zooms": [float(z) for z in header.get_zooms()],
            "xyzt_units": int(header["xyzt_units"]),
        }
        # zooms are in the header's length unit; every distance and volume mriseg reports is in mm
        geometry["spacing_mm"] = [abs(z) * MM_PER_UNIT.get(header.get_xyzt_units()[0], 1.0)
                                  for z in geometry["zooms"][:3]]
        affine = np.asarray(image.affine, dtype=np.float64)
        stored = [header.get_sform()] if geometry["sform_code"] > 0 else []
        stored += [header.get_qform()] if geometry["qform_code"] > 0 else []
        if not np.isfinite(affine).all() or not all(np.isfinite(m).all() for m in stored):
            raise BadInputError(path, "the affine (qform/sform) holds NaN or infinite values")
    except BadInputError:
        raise
    except Exception as error:  # nibabel, gzip, zlib and OS errors alike: the file is unusable
        raise BadInputError(path, f"cannot read NIfTI ({type(error).__name__}: {error})") from error
    return array, affine, geometry


def check_readable(path: Path) -> None:
    """Name the OS's reason (permission, a folder, ...) that nibabel's own message hides."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise BadInputError(path, f"cannot open ({error.strerror})") from error


def check_voxel_sizes(path: Path, header_class: type) -> None:
    """Refuse zero or non-finite voxel sizes, which nibabel would silently replace by 1 mm.

    Negative sizes break the standard too, but their meaning is clear (nibabel, like ITK,
    takes the absolute value), so they are accepted with a warning.
    """
    import nibabel as nib

    with nib.openers.ImageOpener(str(path)) as stream:
        raw = header_class.from_fileobj(stream, check=False)
    dims = int(raw["dim"][0])
    sizes = [float(z) for z in raw["pixdim"][1:1 + min(max(dims, 1), 3)]]
    if not all(np.isfinite(sizes)) or 0.0 in sizes:
        raise BadInputError(path, f"voxel size (pixdim) {sizes} must be finite and non-zero")
    if min(sizes) < 0:
        from mriseg import log

        log.warn(f"{path}: negative voxel size (pixdim) {sizes}; using absolute values")


def read_image_2d(path: Path, intensities: bool = False) -> np.ndarray:
    """Read a PNG/TIF/JPEG image as (H, W) or (H, W, C); TIF via tifffile, others via Pillow.

    A palette image holds indices into its colour table: a mask's labels, but for an image to
    segment (``intensities``) the colours are wanted, as grey levels when the table is grey.
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(str(path))
        else:
            from PIL import Image

            with Image.open(path) as image:
                palette = intensities and image.mode == "P"
                array = np.asarray(image.convert("RGB") if palette else image)
            if palette and (array == array[..., :1]).all():
                array = array[..., 0]  # a grey colour table: one channel, as the image means it
    except Exception as error:  # truncated or not an image: unusable either way
        raise BadInputError(path, f"cannot read image ({type(error).__name__}: {error})") from error
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIF
    if array.ndim not in (2, 3):
        raise BadInputError(path, f"expected a 2D image, got an array of shape {array.shape}")
    return array


def image_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, 3|4) -> (3, H, W), alpha dropped; float32."""
    check_image_dtype(array, path)
    if array.ndim == 2:
        array = array[None]
    else:
        array = np.moveaxis(array[..., :3] if array.shape[-1] == 4 else array, -1, 0)
    array = array.astype(np.float32)
    check_finite(array, path)
    return array


def mask_2d(array: np.ndarray, path: Path) -> np.ndarray:
    """A 2D mask; RGB masks whose channels agree are reduced to one channel."""
    if array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(array.shape[-1], 3))):
            raise BadInputError(path, "mask is a colour-coded image (its channels differ); "
                                  "convert it to one class index per pixel")
        array = array[..., 0]
    return as_label(array, path)


def binary_mask_from_255(label: np.ndarray, path: Path) -> np.ndarray:
    """LGG-style masks: {0, 255} -> {0, 1}; {0, 1} kept; anything else refused."""
    values = set(np.unique(label).tolist())
    if values <= {0, 1}:
        return label
    if values <= {0, 255}:
        return (label // 255).astype(np.uint8)
    raise BadInputError(path, f"mask values {sorted(values)[:8]} are neither 0/255 nor 0/1")


AFFINE_TOLERANCE_MM = 1e-3


def check_same_grid(path: Path, file_affine: np.ndarray, reference: Path, affine: np.ndarray) -> None:
    """Files of one case must share a voxel grid; mixing grids would misalign channels or labels."""
    if not np.allclose(file_affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        difference = float(np.abs(file_affine - affine).max())
        raise BadInputError(path, f"affine differs from that of {reference.name} by up to {difference:.3g} mm "
                                  "(not on the same voxel grid; resample it first)")


def read_nifti_case(ref: CaseRef, channels_last_4d: bool) -> Case:
    channels: list[np.ndarray] = []
    affine = geometry = None
    reference: Path | None = None
    for path in ref.image_paths:
        array, file_affine, file_geometry = read_nifti(path)
        if array.ndim == 4 and channels_last_4d:
            parts = [array[..., c] for c in range(array.shape[-1])]
        elif array.ndim == 3:
            parts = [array]
        else:
            allowed = "a 3D volume or a 4D channels-last volume" if channels_last_4d else "a 3D volume"
            raise BadInputError(path, f"expected {allowed}, got shape {array.shape}")
        check_image_dtype(array, path)
        if array.dtype == bool:
            raise BadInputError(path, "a boolean image (is this a mask given as a modality?)")
        for part in parts:
            if channels and part.shape != channels[0].shape:
                raise BadInputError(path, f"shape {part.shape} differs from {channels[0].shape} of {reference.name}")
            part = part.astype(np.float32)
            check_finite(part, path)
            channels.append(part)
        if affine is None:
            affine, geometry, reference = file_affine, file_geometry, path
        else:
            check_same_grid(path, file_affine, reference, affine)
    image = np.stack(channels)
    label = None
    if ref.label_paths:
        path = ref.label_paths[0]
        array, label_affine, _ = read_nifti(path)
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.shape != image.shape[1:]:
            raise BadInputError(path, f"label shape {array.shape} differs from image shape {image.shape[1:]} "
                                      f"of {reference.name}")
        label = as_label(array, path)
        check_same_grid(path, label_affine, reference, affine)
        if set(np.unique(label).tolist()) == {0, 255}:  # a binary mask saved as 0/255
            label = binary_mask_from_255(label, path)
        if ref.layout == "msd" and ref.allowed_labels:
            unknown = sorted(set(np.unique(label).tolist()) - set(ref.allowed_labels))
            if unknown:
                raise BadInputError(path, f"label values {unknown} are not among the labels of dataset.json "
                                          f"({list(ref.allowed_labels)})")
    modalities = list(ref.modalities) if len(ref.modalities) == image.shape[0] else \
        [f"channel{c}" for c in range(image.shape[0])]
    geometry = dict(geometry)
    if ref.label_names:
        geometry["label_names"] = {str(k): v for k, v in ref.label_names}
    if ref.naming:
        geometry["naming"] = ref.naming
    return Case(case_id=ref.case_id, image=image, label=label,
                spacing=tuple(geometry["spacing_mm"]), affine=affine, modalities=modalities,
                source_paths=ref.source_paths, layout=ref.layout, slice_axis=nifti_slice_axis(affine),
                header=geometry)


# Suffixes a mask file name may carry beyond its case id (``<id>_seg.nii.gz``).
ID_SUFFIXES = ("_seg", "-seg", "_mask", "_label", "_labels")


def case_id_from_name(name: str) -> str:
    """``BraTS_001_seg.nii.gz`` -> ``BraTS_001``; ``case.png`` -> ``case``."""
    for suffix in NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    for suffix in ID_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
