"""Readers: find the cases in a folder and read each into a :class:`~mriseg.data.case.Case`.

Layouts (see ``docs/data-formats.md``):

* ``lgg``: Kaggle kaggle_3m, ``TCGA_*/<patient>_<n>.tif`` RGB slices with ``<patient>_<n>_mask.tif``
  (0/255) masks; slices sorted by the integer ``n``; one patient is one 3-channel volume.
* ``brats``: one folder per case, one NIfTI per modality, recognised by suffix
  (2018-2021 ``_t1 _t1ce _t2 _flair _seg``, 2023 ``-t1n -t1c -t2w -t2f -seg``) or by a
  ``--modalities`` name map such as ``flair=Flair_subtrMeanDivStd,seg=OTMultiClass``.
* ``msd``: Medical Segmentation Decathlon / nnU-Net raw: ``imagesTr/`` + ``labelsTr/``,
  4D NIfTI or ``_0000``-suffixed channel files, ``dataset.json`` for channel and label names.
* ``nnunet-images``: a folder of nnU-Net channel files (``imagesTs/``), one case per ``CASE`` of
  ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...; channel names from the dataset.json above it.
* ``pairs``: image/mask files (PNG, TIF, NIfTI) matched by name: sibling folders such as
  ``images/`` + ``masks/``, ``train_imgs/`` + ``train_mask/`` or ``train_images/`` + ``train_labels/``
  with equal stems, or ``<stem>`` + ``<stem>_mask`` in one folder.

Listing (:func:`list_cases`) only looks at file names; :func:`read_case` reads pixels.
Every failure while reading a file becomes a :class:`~mriseg.errors.BadInputError`
naming that file.

Adding a layout: write ``mriseg/data/readers/<name>.py`` with a listing function (folder ->
``CaseRef`` list, from names alone) and a reading function (``CaseRef`` -> ``Case``), add one
row to :data:`LAYOUTS` below, and one detection rule to ``detect.py`` if the layout can be
recognised from its names. ``common.py`` holds what layouts share (file readers, checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mriseg.data.case import Case
from mriseg.data.readers.brats import list_brats
from mriseg.data.readers.common import (CaseRef, binary_mask_from_255, case_id_from_name, is_2d_image, is_nifti,
                                        nifti_slice_axis, parse_modalities, read_image_2d, read_nifti,
                                        read_nifti_case, require_existing, strip_suffix)
from mriseg.data.readers.detect import detect_layout, looks_like_dicom
from mriseg.data.readers.lgg import list_lgg, read_lgg
from mriseg.data.readers.msd import channel_group, list_image_folder, list_msd
from mriseg.data.readers.pairs import list_pairs, read_pair
from mriseg.errors import BadInputError, MrisegError
from mriseg.labels import label_names_for, label_scheme


@dataclass(frozen=True)
class Layout:
    """One data layout: how to list its cases and how to read one."""

    list_cases: Callable[[Path, dict[str, str] | None], list[CaseRef]]
    read_case: Callable[[CaseRef], Case]
    takes_modalities: bool = False


LAYOUTS: dict[str, Layout] = {
    "lgg": Layout(lambda root, _: list_lgg(root), read_lgg),
    "brats": Layout(list_brats, lambda ref: read_nifti_case(ref, channels_last_4d=False), takes_modalities=True),
    "msd": Layout(lambda root, _: list_msd(root), lambda ref: read_nifti_case(ref, channels_last_4d=True)),
    "nnunet-images": Layout(lambda root, _: list_image_folder(root),
                            lambda ref: read_nifti_case(ref, channels_last_4d=True)),
    "pairs": Layout(lambda root, _: list_pairs(root), read_pair),
}
"""The layouts mriseg reads, by name (``--layout``)."""


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
    require_existing(path)
    if not path.is_dir():
        raise BadInputError(path, "is a file; a dataset is a folder")
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise MrisegError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    mapping = parse_modalities(modalities)
    if mapping is not None and not LAYOUTS[layout].takes_modalities:
        raise MrisegError(f"--modalities applies to the brats layout, not {layout}")
    refs = LAYOUTS[layout].list_cases(path, mapping)
    if not refs:
        raise BadInputError(path, f"no cases found for layout {layout} (see docs/data-formats.md)")
    ids = [r.case_id for r in refs]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise BadInputError(path, f"two cases share the id {duplicate}")
    return refs


def single_file_ref(path: Path) -> CaseRef:
    """A case of one file: a NIfTI (3D, or 4D channels last) or a 2D image; an nnU-Net channel file
    (``CASE_0000.nii.gz``) stands for its whole case, every channel file beside it."""
    group = channel_group(path) if is_nifti(path) else None
    if group is not None:
        return group
    if is_nifti(path) or is_2d_image(path):
        return CaseRef(case_id=strip_suffix(path.name)[0], layout="pairs", image_paths=(path,))
    if looks_like_dicom(path):
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
        require_existing(path)
        if path.is_file():
            ref = single_file_ref(path)
        else:
            refs = list_cases(path, layout=layout, modalities=modalities)
            if len(refs) != 1:
                raise BadInputError(path, f"holds {len(refs)} cases; give one case folder or file")
            ref = refs[0]
    return LAYOUTS[ref.layout].read_case(ref)


__all__ = ["CaseRef", "LAYOUTS", "Layout", "binary_mask_from_255", "case_id_from_name", "detect_layout",
           "label_names_for", "label_scheme", "list_cases", "nifti_slice_axis", "parse_modalities", "read_case",
           "read_image_2d", "read_nifti"]
