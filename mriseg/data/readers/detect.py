"""Which layout a folder holds, from its file and folder names alone (rules tried in a fixed order)."""

from __future__ import annotations

import re
from pathlib import Path


from mriseg.data.readers.common import (LGG_MASK, LGG_SLICE, MASK_SUFFIXES, is_nifti, require_existing, strip_suffix,
                                        visible_dirs, visible_files)
from mriseg.errors import BadInputError


def lgg_patient_files(folder: Path) -> bool:
    """A kaggle_3m patient folder: slice masks, or (without masks, for predict) slices named after the folder."""
    for file in visible_files(folder):
        match = LGG_MASK.match(file.name) or LGG_SLICE.match(file.name)
        if match and (file.name.endswith("_mask.tif") or match["patient"] == folder.name):
            return True
    return False


def nifti_files(folder: Path) -> list[Path]:
    return [p for p in visible_files(folder) if is_nifti(p)]


NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def is_channel_folder(folder: Path) -> bool:
    """Every NIfTI file directly in ``folder`` is an nnU-Net channel file, and some case has channel 0000."""
    stems = [strip_suffix(f.name)[0] for f in nifti_files(folder)]
    matches = [NNUNET_CHANNEL.match(stem) for stem in stems]
    return bool(stems) and all(matches) and any(m["channel"] == "0000" for m in matches if m)


IMAGE_FOLDER_WORDS = re.compile(r"images|imgs|image|img")
MASK_FOLDER_WORDS = re.compile(r"masks|mask|labels|label|segmentations|segs|seg")


def folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Sibling image and mask folders whose names differ only in those words.

    ``images`` + ``masks``, ``train_imgs`` + ``train_mask`` (the seeds' shapes data),
    ``train_images`` + ``train_labels`` (CamVid), ...; MSD's ``imagesTr`` is left to the msd layout.
    """
    folders = [d for d in visible_dirs(root) if d.name not in ("imagesTr", "imagesTs", "labelsTr")]
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


def pair_candidates(folder: Path) -> bool:
    names = {p.name.lower(): p for p in visible_files(folder)}
    stems = {strip_suffix(n)[0] for n in names}
    return any(stem.endswith(MASK_SUFFIXES) and stem.rsplit("_", 1)[0] in stems for stem in stems)


def detect_layout(path: str | Path) -> str:
    """Guess the layout of a dataset folder, or of a single case folder.

    Raises:
        BadInputError: the path does not exist or matches no layout.
    """
    path = Path(path)
    require_existing(path)
    if path.is_file():
        raise BadInputError(path, "is a file; a dataset is a folder (see docs/data-formats.md)")
    subdirs = visible_dirs(path)
    layout = layout_of(path, subdirs)
    if layout is not None:
        return layout
    if any(looks_like_dicom(f) for folder in (path, *subdirs) for f in visible_files(folder)[:20]):
        raise BadInputError(path, "holds DICOM files, which mriseg does not read: convert each series to "
                                  "NIfTI first (e.g. dcm2niix -z y -o OUT SERIES_FOLDER)")
    # Downloads often wrap the dataset in a folder or two (Kaggle's lgg-mri-segmentation/kaggle_3m).
    below = [(d, found) for d in subdirs if (found := layout_of(d, visible_dirs(d))) is not None]
    hint = (f"; the dataset seems to be one level down: {below[0][0]} ({below[0][1]} layout)" if below else
            " (see docs/data-formats.md; preprocess and convert take --layout to name it)")
    raise BadInputError(path, "unrecognised layout: no kaggle_3m TIF slices, BraTS/MSD NIfTI cases or "
                              f"image/mask pairs found{hint}")


def layout_of(path: Path, subdirs: list[Path]) -> str | None:
    """The layout ``path`` (with its sub-folders ``subdirs``) is in, judged by file names; None if none."""
    if "imagesTr" in {d.name for d in subdirs}:
        return "msd"
    if is_channel_folder(path):
        return "nnunet-images"
    if folder_pairs(path):
        return "pairs"
    if lgg_patient_files(path) or any(lgg_patient_files(d) for d in subdirs):
        return "lgg"
    if nifti_files(path) and not pair_candidates(path):
        return "brats"
    if any(nifti_files(d) for d in subdirs):
        return "brats"
    if pair_candidates(path):
        return "pairs"
    return None


def looks_like_dicom(path: Path) -> bool:
    """A .dcm name, or the DICOM preamble: 128 bytes, then "DICM"."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False
