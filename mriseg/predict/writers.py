"""Writers that keep the source geometry: NIfTI (affine, qform/sform, codes, units) and slice masks."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from mriseg.data.case import Case
from mriseg.files import atomic_path, write_bytes_atomic
from mriseg.inference import LoadedModel
from mriseg.predict.options import PredictOptions



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


def slice_mask_names(case: Case) -> list[str]:
    """File names for one mask per source slice, in the source's naming style.

    LGG slices ``PATIENT_12.tif`` get ``PATIENT_12_mask.tif`` (the kaggle_3m convention);
    a single image ``scan.png`` gets ``scan_mask.png``.
    """
    names = case.header.get("slice_names")
    if not names:
        names = [Path(case.source_paths[0]).name] if case.source_paths else [f"{case.case_id}.png"]
    return [f"{Path(name).stem}_mask{Path(name).suffix or '.png'}" for name in names]


def write_slice_masks(labels: np.ndarray, case: Case, folder: Path, binary: bool) -> list[Path]:
    """Write a slice stack (or one 2D image) as 8-bit masks named after the source slices.

    A binary task's masks use 255 for tumour, as the LGG masks do; other tasks keep their label
    values (decided by the task, never by the values a slice happens to hold).
    """
    names = slice_mask_names(case)
    planes = [labels] if labels.ndim == 2 else list(np.moveaxis(labels, case.slice_axis or 0, 0))
    if len(planes) != len(names):
        raise ValueError(f"{len(planes)} slices but {len(names)} source slice names")
    scale = 255 if binary else 1
    written = []
    for plane, name in zip(planes, names):
        with atomic_path(folder / name) as temporary:
            Image.fromarray((plane * scale).astype(np.uint8)).save(temporary)
        written.append(folder / name)
    return written


def write_outputs(case: Case, labels: np.ndarray, probabilities: np.ndarray, loaded: LoadedModel,
                  planned: dict[str, Path], options: PredictOptions) -> dict[str, Path]:
    """Write the mask (and soft maps with ``--probabilities``) in the source's format and geometry."""
    outputs: dict[str, Path] = {}
    binary = loaded.task.kind == "binary"
    if case.affine is not None:
        outputs["mask"] = write_nifti(labels, case, planned["mask"])
    elif case.spatial_dims == 3:
        planned["mask"].mkdir(exist_ok=True)
        write_slice_masks(labels, case, planned["mask"], binary)
        outputs["mask"] = planned["mask"]
    else:
        outputs["mask"] = write_slice_masks(labels, case, options.out, binary)[0]
    if options.probabilities:
        target = planned["probabilities"]
        soft = probabilities.astype(np.float32)
        if case.affine is not None:
            outputs["probabilities"] = write_nifti(np.moveaxis(soft, 0, -1), case, target)
        else:
            buffer = io.BytesIO()
            np.save(buffer, soft)
            outputs["probabilities"] = write_bytes_atomic(target, buffer.getvalue())
    return outputs
