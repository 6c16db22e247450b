"""Writing arrays as NIfTI in a case's source geometry (affine, qform/sform and their codes, units);
shared by ``predict`` (masks, probabilities) and ``convert`` (nnU-Net raw datasets)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from mriseg.data.case import Case
from mriseg.files import write_bytes_atomic


def nifti_like_source(array: np.ndarray, case: Case) -> nib.Nifti1Image:
    """A NIfTI image holding ``array`` with the source's affine, qform/sform and codes.

    ``case.header`` carries what the reader saw (``qform``, ``qform_code``, ``sform``,
    ``sform_code``, ``zooms``); without it the case's affine is used for both.
    """
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    spatial_zooms = [float(z) for z in (case.header.get("zooms") or case.spacing)][:case.spatial_dims]
    header.set_zooms(spatial_zooms + [1.0] * (array.ndim - len(spatial_zooms)))
    affine = case.affine if case.affine is not None else np.diag([*case.spacing, 1.0])
    image = nib.Nifti1Image(array, None, header)
    image.set_sform(np.asarray(case.header.get("sform", affine)), code=int(case.header.get("sform_code", 1)))
    image.set_qform(np.asarray(case.header.get("qform", affine)), code=int(case.header.get("qform_code", 1)))
    if "xyzt_units" in case.header:
        image.header["xyzt_units"] = int(case.header["xyzt_units"])
    return image


def write_nifti(array: np.ndarray, case: Case, path: Path) -> Path:
    """Write ``array`` as NIfTI in the source's geometry.

    ``array`` has the case's spatial shape, optionally followed by a channel axis
    (soft maps are written channels last, as MSD stores multi-modal images).
    """
    spatial = case.spatial_shape
    if tuple(array.shape[:len(spatial)]) != spatial or array.ndim > len(spatial) + 1:
        raise ValueError(f"array shape {array.shape} does not fit the source's {spatial}")
    data = nifti_like_source(array, case).to_bytes()
    write_bytes_atomic(path, gzip.compress(data, compresslevel=6) if path.name.endswith(".gz") else data)
    return path
