"""Readers: find the cases in a folder and read each into a :class:`~mriseg.data.case.Case`.

Layouts (see ``docs/data-formats.md``):

* ``lgg``: Kaggle kaggle_3m, ``TCGA_*/<patient>_<n>.tif`` RGB slices with ``<patient>_<n>_mask.tif``
  (0/255) masks; slices sorted by the integer ``n``; one patient is one 3-channel volume.
* ``brats``: one folder per case, one NIfTI per modality, recognised by suffix
  (2018-2021 ``_t1 _t1ce _t2 _flair _seg``, 2023 ``-t1n -t1c -t2w -t2f -seg``) or by a
  ``--modalities`` name map such as ``flair=Flair_subtrMeanDivStd,seg=OTMultiClass``.
* ``msd``: Medical Segmentation Decathlon / nnU-Net raw: ``imagesTr/`` + ``labelsTr/``,
  4D NIfTI or ``_0000``-suffixed channel files, ``dataset.json`` for channel and label names.
* ``pairs``: image/mask files (PNG, TIF, NIfTI) matched by name: sibling folders such as
  ``images/`` + ``masks/``, ``train_imgs/`` + ``train_mask/`` or ``train_images/`` + ``train_labels/``
  with equal stems, or ``<stem>`` + ``<stem>_mask`` in one folder.

Listing (:func:`list_cases`) only looks at file names; :func:`read_case` reads pixels.
Every failure while reading a file becomes a :class:`~mriseg.errors.BadInputError`
naming that file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mriseg.data.case import Case
from mriseg.errors import BadInputError, MrisegError
from mriseg.labels import LABEL_NAMES, label_names_for, label_scheme

LAYOUTS = ("lgg", "brats", "msd", "pairs")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIXES = ("_mask", "_seg", "_label", "_labels")
LABEL_KEYS = ("seg", "label")

# kaggle_3m slice channels, in file order (Buda et al. 2019).
LGG_MODALITIES = ["pre-contrast", "flair", "post-contrast"]
LGG_SLICE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tif$")
LGG_MASK = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)_mask\.tif$")

# BraTS file-name suffixes: {modality: suffix}; the label key is "seg".
BRATS_NAMINGS = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1n": "-t1n", "t1c": "-t1c", "t2w": "-t2w", "t2f": "-t2f", "seg": "-seg"},
}

NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

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

    @property
    def source_paths(self) -> list[Path]:
        return [*self.image_paths, *self.label_paths]

    @property
    def has_label(self) -> bool:
        return bool(self.label_paths)


# ----------------------------------------------------------------------------- helpers


def _strip_suffix(name: str) -> tuple[str, str]:
    """``'a_seg.nii.gz' -> ('a_seg', '.nii.gz')``; any other single suffix likewise."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot else (name, "")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_2d_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_2D_SUFFIXES


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` not starting with a dot (MSD tarballs carry macOS ``._`` files)."""
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as error:
        raise BadInputError(folder, f"cannot list folder ({error.strerror})") from error
    for entry in entries:
        if entry.is_symlink() and not entry.exists() and (_is_nifti(entry) or _is_2d_image(entry)):
            raise BadInputError(entry, "is a symbolic link that points nowhere or to itself")
    return entries


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in _entries(folder) if p.is_file())


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in _entries(folder) if p.is_dir())


def _require_existing(path: Path) -> None:
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


# ----------------------------------------------------------------------------- detection


def _lgg_patient_files(folder: Path) -> bool:
    """A kaggle_3m patient folder: slice masks, or (without masks, for predict) slices named after the folder."""
    for file in _visible_files(folder):
        match = LGG_MASK.match(file.name) or LGG_SLICE.match(file.name)
        if match and (file.name.endswith("_mask.tif") or match["patient"] == folder.name):
            return True
    return False


def _nifti_files(folder: Path) -> list[Path]:
    return [p for p in _visible_files(folder) if _is_nifti(p)]


IMAGE_FOLDER_WORDS = re.compile(r"images|imgs|image|img")
MASK_FOLDER_WORDS = re.compile(r"masks|mask|labels|label|segmentations|segs|seg")


def _folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Sibling image and mask folders whose names differ only in those words.

    ``images`` + ``masks``, ``train_imgs`` + ``train_mask`` (the seeds' shapes data),
    ``train_images`` + ``train_labels`` (CamVid), ...; MSD's ``imagesTr`` is left to the msd layout.
    """
    folders = [d for d in _visible_dirs(root) if d.name not in ("imagesTr", "imagesTs", "labelsTr")]
    masks = {}
    for folder in folders:
        if MASK_FOLDER_WORDS.search(folder.name.lower()):
            masks.setdefault(MASK_FOLDER_WORDS.sub("*", folder.name.lower()), folder)
    pairs = []
    for folder in folders:
        name = folder.name.lower()
        if IMAGE_FOLDER_WORDS.search(name) and not MASK_FOLDER_WORDS.search(name):
            key = IMAGE_FOLDER_WORDS.sub("*", name)
            if key in masks:
                pairs.append((folder, masks[key]))
    return pairs


def _pair_candidates(folder: Path) -> bool:
    names = {p.name.lower(): p for p in _visible_files(folder)}
    stems = {_strip_suffix(n)[0] for n in names}
    return any(stem.endswith(MASK_SUFFIXES) and stem.rsplit("_", 1)[0] in stems for stem in stems)


def detect_layout(path: str | Path) -> str:
    """Guess the layout of a dataset folder, or of a single case folder.

    Raises:
        BadInputError: the path does not exist or matches no layout.
    """
    path = Path(path)
    _require_existing(path)
    if path.is_file():
        raise BadInputError(path, "is a file; a dataset is a folder (see docs/data-formats.md)")
    subdirs = _visible_dirs(path)
    layout = _layout_of(path, subdirs)
    if layout is not None:
        return layout
    if any(_looks_like_dicom(f) for folder in (path, *subdirs) for f in _visible_files(folder)[:20]):
        raise BadInputError(path, "holds DICOM files, which mriseg does not read: convert each series to "
                                  "NIfTI first (e.g. dcm2niix -z y -o OUT SERIES_FOLDER)")
    # Downloads often wrap the dataset in a folder or two (Kaggle's lgg-mri-segmentation/kaggle_3m).
    below = [(d, found) for d in subdirs if (found := _layout_of(d, _visible_dirs(d))) is not None]
    hint = (f"; the dataset seems to be one level down: {below[0][0]} ({below[0][1]} layout)" if below else
            " (use --layout, see docs/data-formats.md)")
    raise BadInputError(path, "unrecognised layout: no kaggle_3m TIF slices, BraTS/MSD NIfTI cases or "
                              f"image/mask pairs found{hint}")


def _layout_of(path: Path, subdirs: list[Path]) -> str | None:
    """The layout ``path`` (with its sub-folders ``subdirs``) is in, judged by file names; None if none."""
    if "imagesTr" in {d.name for d in subdirs}:
        return "msd"
    if _folder_pairs(path):
        return "pairs"
    if _lgg_patient_files(path) or any(_lgg_patient_files(d) for d in subdirs):
        return "lgg"
    if _nifti_files(path) and not _pair_candidates(path):
        return "brats"
    if any(_nifti_files(d) for d in subdirs):
        return "brats"
    if _pair_candidates(path):
        return "pairs"
    return None


def _looks_like_dicom(path: Path) -> bool:
    """A .dcm name, or the DICOM preamble: 128 bytes, then "DICM"."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------- listing


def _list_lgg(root: Path) -> list[CaseRef]:
    folders = [root] if _lgg_patient_files(root) else [d for d in _visible_dirs(root) if _lgg_patient_files(d)]
    refs = []
    for folder in folders:
        slices: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for file in _visible_files(folder):
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
        missing = [slices[n].name for n in numbers if n not in masks]
        if masks and missing:
            raise BadInputError(folder / missing[0], f"slice has no mask (expected {missing[0][:-4]}_mask.tif)")
        refs.append(CaseRef(
            case_id=folder.name, layout="lgg",
            image_paths=tuple(slices[n] for n in numbers),
            label_paths=tuple(masks[n] for n in numbers) if masks else (),
            modalities=tuple(LGG_MODALITIES), label_names=tuple(LABEL_NAMES["binary"].items()),
        ))
    return refs


def _match_modalities(folder: Path, suffixes: dict[str, str], exact: bool) -> dict[str, Path]:
    """Map each key to the file whose stem ends with (or, if ``exact``, equals) its suffix."""
    found: dict[str, Path] = {}
    for file in _nifti_files(folder):
        stem = _strip_suffix(file.name)[0].lower()
        for key, suffix in suffixes.items():
            suffix = suffix.lower()
            if stem == suffix or (not exact and stem.endswith(suffix)) or (
                    exact and (stem.endswith("_" + suffix) or stem.endswith("-" + suffix))):
                if key in found:
                    raise BadInputError(folder, f"{found[key].name} and {file.name} both match modality "
                                                f"{key!r} ({suffix!r}); rename one or pass --modalities "
                                                f"with a file name that matches one file")
                found[key] = file
    return found


def _brats_ref(folder: Path, modalities: dict[str, str] | None) -> CaseRef:
    if modalities is not None:
        found = _match_modalities(folder, modalities, exact=True)
        naming, wanted = "custom", modalities
    else:
        best = max(BRATS_NAMINGS, key=lambda n: len(_match_modalities(folder, BRATS_NAMINGS[n], exact=False)))
        naming, wanted = best, BRATS_NAMINGS[best]
        found = _match_modalities(folder, wanted, exact=False)
        if not any(k not in LABEL_KEYS for k in found):
            raise BadInputError(folder, "no BraTS modality files recognised (names like *_flair.nii.gz or "
                                        "*-t2f.nii.gz); pass --modalities NAME=FILENAME,...")
    image_keys = [k for k in wanted if k not in LABEL_KEYS]
    missing = [k for k in image_keys if k not in found]
    if missing:
        raise BadInputError(folder, f"missing modality {missing[0]} (a NIfTI named like *{wanted[missing[0]]}.nii.gz)")
    label_key = next((k for k in wanted if k in LABEL_KEYS), None)
    label = (found[label_key],) if label_key and label_key in found else ()
    return CaseRef(case_id=folder.name, layout="brats", image_paths=tuple(found[k] for k in image_keys),
                   label_paths=label, modalities=tuple(image_keys), naming=naming)


def _list_brats(root: Path, modalities: dict[str, str] | None) -> list[CaseRef]:
    folders = [d for d in _visible_dirs(root) if _nifti_files(d)]
    if not folders and _nifti_files(root):
        folders = [root]  # a single case folder
    refs = [_brats_ref(folder, modalities) for folder in folders]
    if len({r.modalities for r in refs}) > 1:
        first, other = refs[0], next(r for r in refs if r.modalities != refs[0].modalities)
        raise BadInputError(other.image_paths[0].parent,
                            f"modalities {list(other.modalities)} differ from {list(first.modalities)} "
                            f"of {first.case_id}")
    return refs


def _read_dataset_json(root: Path) -> tuple[list[str] | None, dict[int, str]]:
    path = root / "dataset.json"
    if not path.is_file():
        return None, {}
    try:
        meta = json.loads(path.read_text())
        channels = meta.get("channel_names") or meta.get("modality") or {}
        channel_names = [str(channels[k]) for k in sorted(channels, key=int)] or None
        labels = meta.get("labels") or {}
        if labels and all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background"}
            label_names = {int(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0}; region lists are not single values
            label_names = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    except (ValueError, TypeError, AttributeError) as error:
        raise BadInputError(path, f"not a valid MSD/nnU-Net dataset.json ({error})") from error
    return channel_names, label_names


def _list_msd(root: Path) -> list[CaseRef]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    channel_names, label_names = _read_dataset_json(root)
    groups: dict[str, dict[int, Path]] = {}
    for file in _nifti_files(images_dir):
        stem = _strip_suffix(file.name)[0]
        match = NNUNET_CHANNEL.match(stem)
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, -1)
        if channel in groups.get(case_id, {}):
            raise BadInputError(file, f"case {case_id} is also given by {groups[case_id][channel].name}")
        groups.setdefault(case_id, {})[channel] = file
    refs = []
    for case_id, channels in sorted(groups.items()):
        if -1 in channels and len(channels) > 1:
            raise BadInputError(channels[-1], "mixes a 4D image with _0000-style channel files of the same case")
        order = sorted(channels)
        if order != [-1] and order != list(range(len(order))):
            raise BadInputError(images_dir, f"case {case_id} has channel files {order}, expected 0..{len(order) - 1}")
        label = [p for p in (labels_dir / f"{case_id}{s}" for s in NIFTI_SUFFIXES) if p.is_file()]
        names = tuple(channel_names) if channel_names and (order == [-1] or len(channel_names) == len(order)) else ()
        refs.append(CaseRef(case_id=case_id, layout="msd", image_paths=tuple(channels[c] for c in order),
                            label_paths=tuple(label[:1]), modalities=names,
                            label_names=tuple(sorted(label_names.items()))))
    return refs


def _list_pair_folder(images: Path, masks: Path, id_prefix: str) -> list[CaseRef]:
    by_stem = {}
    for path in _visible_files(masks):
        stem = _strip_suffix(path.name)[0]
        by_stem[stem] = path
        for suffix in MASK_SUFFIXES:  # images/a.png with masks/a_mask.png
            if stem.endswith(suffix):
                by_stem.setdefault(stem[: -len(suffix)], path)
    refs = []
    for image in _visible_files(images):
        stem = _strip_suffix(image.name)[0]
        if _is_nifti(image) or _is_2d_image(image):
            refs.append(CaseRef(case_id=id_prefix + stem, layout="pairs", image_paths=(image,),
                                label_paths=(by_stem[stem],) if stem in by_stem else ()))
    return refs


def _list_pairs(root: Path) -> list[CaseRef]:
    folder_pairs = _folder_pairs(root)
    if folder_pairs:
        # Several pairs (train_images + train_labels, val_images + val_labels): ids get the folder name.
        several = len(folder_pairs) > 1
        return [ref for images, masks in folder_pairs
                for ref in _list_pair_folder(images, masks, f"{images.name}-" if several else "")]
    files = {_strip_suffix(p.name)[0]: p for p in _visible_files(root) if _is_nifti(p) or _is_2d_image(p)}
    mask_stems = {s for s in files if s.endswith(MASK_SUFFIXES) and s.rsplit("_", 1)[0] in files}
    refs = []
    for stem, image in sorted(files.items()):
        if stem in mask_stems:
            continue
        mask = next((files[stem + s] for s in MASK_SUFFIXES if stem + s in files), None)
        refs.append(CaseRef(case_id=stem, layout="pairs", image_paths=(image,),
                            label_paths=(mask,) if mask else ()))
    return refs


def list_cases(path: str | Path, layout: str | None = None,
               modalities: str | dict[str, str] | None = None) -> list[CaseRef]:
    """Find every case under ``path`` from file names alone.

    Args:
        path: a dataset folder, or one case folder (BraTS case, LGG patient).
        layout: one of :data:`LAYOUTS`; detected when None.
        modalities: BraTS name map (``"flair=Flair_x,seg=OT"`` or a dict).

    Raises:
        BadInputError: missing path, unknown layout, or no cases found.
    """
    path = Path(path)
    _require_existing(path)
    if not path.is_dir():
        raise BadInputError(path, "is a file; a dataset is a folder")
    layout = layout or detect_layout(path)
    mapping = parse_modalities(modalities)
    if mapping is not None and layout != "brats":
        raise MrisegError(f"--modalities applies to the brats layout, not {layout}")
    if layout == "lgg":
        refs = _list_lgg(path)
    elif layout == "brats":
        refs = _list_brats(path, mapping)
    elif layout == "msd":
        if not (path / "imagesTr").is_dir():
            raise BadInputError(path, "layout msd needs an imagesTr/ folder")
        refs = _list_msd(path)
    elif layout == "pairs":
        refs = _list_pairs(path)
    else:
        raise MrisegError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if not refs:
        raise BadInputError(path, f"no cases found for layout {layout} (see docs/data-formats.md)")
    ids = [r.case_id for r in refs]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise BadInputError(path, f"two cases share the id {duplicate}")
    return refs


# ----------------------------------------------------------------------------- file readers


def _check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise BadInputError(path, f"contains {bad} NaN/Inf voxels")


def _check_image_dtype(array: np.ndarray, path: Path) -> None:
    """Refuse data types whose conversion to float32 would lose or invent information."""
    if np.iscomplexobj(array):
        raise BadInputError(path, f"complex-valued data ({array.dtype}); mriseg needs real intensities "
                                  "(take the magnitude first)")
    if array.dtype.kind not in "biuf":
        raise BadInputError(path, f"unsupported data type {array.dtype} (expected numbers)")


def _as_label(array: np.ndarray, path: Path) -> np.ndarray:
    """Check that a label array holds integers 0..255 and return it as uint8."""
    _check_image_dtype(array, path)
    if np.issubdtype(array.dtype, np.floating):
        _check_finite(array, path)
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


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a NIfTI file: (array in nibabel's voxel order, affine, header geometry)."""
    import nibabel as nib

    _check_readable(path)
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # its header fixes are reported once, below
            image = nib.load(str(path))
        _check_voxel_sizes(path, type(image.header))
        array = np.asanyarray(image.dataobj)
        header = image.header
        geometry = {
            "qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"]),
            "qform": header.get_qform().tolist(), "sform": header.get_sform().tolist(),
            "zooms": [float(z) for z in header.get_zooms()],
            "xyzt_units": int(header["xyzt_units"]),
        }
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


def _check_readable(path: Path) -> None:
    """Name the OS's reason (permission, a folder, ...) that nibabel's own message hides."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise BadInputError(path, f"cannot open ({error.strerror})") from error


def _check_voxel_sizes(path: Path, header_class: type) -> None:
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


def read_image_2d(path: Path) -> np.ndarray:
    """Read a PNG/TIF/JPEG image as (H, W) or (H, W, C); TIF via tifffile, others via Pillow."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(str(path))
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
    except Exception as error:  # truncated or not an image: unusable either way
        raise BadInputError(path, f"cannot read image ({type(error).__name__}: {error})") from error
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIF
    if array.ndim not in (2, 3):
        raise BadInputError(path, f"expected a 2D image, got an array of shape {array.shape}")
    return array


def _image_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, 3|4) -> (3, H, W), alpha dropped; float32."""
    _check_image_dtype(array, path)
    if array.ndim == 2:
        array = array[None]
    else:
        array = np.moveaxis(array[..., :3] if array.shape[-1] == 4 else array, -1, 0)
    array = array.astype(np.float32)
    _check_finite(array, path)
    return array


def _mask_2d(array: np.ndarray, path: Path) -> np.ndarray:
    """A 2D mask; RGB masks whose channels agree are reduced to one channel."""
    if array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(array.shape[-1], 3))):
            raise BadInputError(path, "mask is a colour-coded image (its channels differ); "
                                  "convert it to one class index per pixel")
        array = array[..., 0]
    return _as_label(array, path)


def binary_mask_from_255(label: np.ndarray, path: Path) -> np.ndarray:
    """LGG-style masks: {0, 255} -> {0, 1}; {0, 1} kept; anything else refused."""
    values = set(np.unique(label).tolist())
    if values <= {0, 1}:
        return label
    if values <= {0, 255}:
        return (label // 255).astype(np.uint8)
    raise BadInputError(path, f"mask values {sorted(values)[:8]} are neither 0/255 nor 0/1")


# ----------------------------------------------------------------------------- case readers


def _read_lgg(ref: CaseRef) -> Case:
    slices = [_image_channels(read_image_2d(p), p) for p in ref.image_paths]
    first = slices[0]
    for path, array in zip(ref.image_paths, slices):
        if array.shape != first.shape:
            raise BadInputError(path, f"slice shape {array.shape[1:]} x{array.shape[0]} channels differs from "
                                      f"{first.shape[1:]} x{first.shape[0]} of {ref.image_paths[0].name}")
    image = np.stack(slices, axis=1)  # (C, slices, H, W)
    label = None
    if ref.label_paths:
        masks = []
        for image_path, mask_path in zip(ref.image_paths, ref.label_paths):
            mask = binary_mask_from_255(_mask_2d(read_image_2d(mask_path), mask_path), mask_path)
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
AFFINE_TOLERANCE_MM = 1e-3


def _check_same_grid(path: Path, file_affine: np.ndarray, reference: Path, affine: np.ndarray) -> None:
    """Files of one case must share a voxel grid; mixing grids would misalign channels or labels."""
    if not np.allclose(file_affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        difference = float(np.abs(file_affine - affine).max())
        raise BadInputError(path, f"affine differs from that of {reference.name} by up to {difference:.3g} mm "
                                  "(not on the same voxel grid; resample it first)")


def _read_nifti_case(ref: CaseRef, channels_last_4d: bool) -> Case:
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
        _check_image_dtype(array, path)
        if array.dtype == bool:
            raise BadInputError(path, "a boolean image (is this a mask given as a modality?)")
        for part in parts:
            if channels and part.shape != channels[0].shape:
                raise BadInputError(path, f"shape {part.shape} differs from {channels[0].shape} of {reference.name}")
            part = part.astype(np.float32)
            _check_finite(part, path)
            channels.append(part)
        if affine is None:
            affine, geometry, reference = file_affine, file_geometry, path
        else:
            _check_same_grid(path, file_affine, reference, affine)
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
        label = _as_label(array, path)
        _check_same_grid(path, label_affine, reference, affine)
        if set(np.unique(label).tolist()) == {0, 255}:  # a binary mask saved as 0/255
            label = binary_mask_from_255(label, path)
        if ref.layout == "msd" and ref.label_names:
            unknown = sorted(set(np.unique(label).tolist()) - {value for value, _ in ref.label_names})
            if unknown:
                raise BadInputError(path, f"label values {unknown} are not among the labels of dataset.json "
                                          f"({sorted(value for value, _ in ref.label_names)})")
    modalities = list(ref.modalities) if len(ref.modalities) == image.shape[0] else \
        [f"channel{c}" for c in range(image.shape[0])]
    geometry = dict(geometry)
    if ref.label_names:
        geometry["label_names"] = {str(k): v for k, v in ref.label_names}
    if ref.naming:
        geometry["naming"] = ref.naming
    return Case(case_id=ref.case_id, image=image, label=label,
                spacing=tuple(float(z) for z in geometry["zooms"][:3]), affine=affine, modalities=modalities,
                source_paths=ref.source_paths, layout=ref.layout, slice_axis=nifti_slice_axis(affine),
                header=geometry)


def _read_pair(ref: CaseRef) -> Case:
    path = ref.image_paths[0]
    if _is_nifti(path):
        return _read_nifti_case(ref, channels_last_4d=True)
    image = _image_channels(read_image_2d(path), path)
    label = None
    if ref.label_paths:
        mask_path = ref.label_paths[0]
        if _is_nifti(mask_path):
            raise BadInputError(mask_path, f"a NIfTI mask for the 2D image {path.name}")
        label = _mask_2d(read_image_2d(mask_path), mask_path)
        if set(np.unique(label).tolist()) <= {0, 255}:
            label = binary_mask_from_255(label, mask_path)
        if label.shape != image.shape[1:]:
            raise BadInputError(mask_path, f"mask shape {label.shape} differs from image shape {image.shape[1:]} "
                                           f"of {path.name}")
    return Case(case_id=ref.case_id, image=image, label=label, spacing=(1.0, 1.0), affine=None,
                modalities=[f"channel{c}" for c in range(image.shape[0])] if image.shape[0] > 1 else ["image"],
                source_paths=ref.source_paths, layout="pairs", slice_axis=None, header={})


def _single_file_ref(path: Path) -> CaseRef:
    stem = _strip_suffix(path.name)[0]
    if _is_nifti(path) or _is_2d_image(path):
        return CaseRef(case_id=stem, layout="pairs", image_paths=(path,))
    if _looks_like_dicom(path):
        raise BadInputError(path, "is a DICOM file, which mriseg does not read: convert the series to NIfTI "
                                  "first (e.g. dcm2niix -z y -o OUT SERIES_FOLDER)")
    raise BadInputError(path, "not a NIfTI (.nii, .nii.gz) or 2D image (PNG, TIF, JPEG) file")


def read_case(ref_or_path: CaseRef | str | Path, layout: str | None = None,
              modalities: str | dict[str, str] | None = None) -> Case:
    """Read one case.

    ``ref_or_path`` is a :class:`CaseRef` from :func:`list_cases`, or a path to a single
    input: a NIfTI file (3D, or 4D with channels last), a 2D PNG/TIF image, or a folder
    holding exactly one case (a BraTS/MSD case folder, an LGG patient folder).

    Raises:
        BadInputError: naming the file that cannot be used and why.
    """
    if isinstance(ref_or_path, CaseRef):
        ref = ref_or_path
    else:
        path = Path(ref_or_path)
        _require_existing(path)
        if path.is_file():
            ref = _single_file_ref(path)
        else:
            refs = list_cases(path, layout=layout, modalities=modalities)
            if len(refs) != 1:
                raise BadInputError(path, f"holds {len(refs)} cases; give one case folder or file")
            ref = refs[0]
    if ref.layout == "lgg":
        return _read_lgg(ref)
    if ref.layout in ("brats", "msd"):
        return _read_nifti_case(ref, channels_last_4d=ref.layout == "msd")
    return _read_pair(ref)


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


__all__ = ["CaseRef", "LAYOUTS", "detect_layout", "list_cases", "read_case", "read_nifti", "read_image_2d",
           "label_scheme", "label_names_for", "parse_modalities", "nifti_slice_axis", "case_id_from_name"]
