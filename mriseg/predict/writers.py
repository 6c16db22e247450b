"""Writers that keep the source geometry: NIfTI (affine, qform/sform, codes, units) and slice masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mriseg.data.case import Case
from mriseg.data.nifti import write_nifti
from mriseg.files import atomic_path, folder_in_place, write_bytes_atomic
from mriseg.inference import LoadedModel
from mriseg.predict.options import PredictOptions



def slice_mask_names(case: Case) -> list[str]:
    """File names for one mask per source slice, in the source's naming style.

    LGG slices ``PATIENT_12.tif`` get ``PATIENT_12_mask.tif`` (the kaggle_3m convention);
    a single image ``scan.png`` gets ``scan_mask.png``.
    """
    names = case.header.get("slice_names")
    if not names:
        names = [Path(case.source_paths[0]).name] if case.source_paths else [f"{case.case_id}.png"]
    return [f"{Path(name).stem}_mask{mask_suffix(Path(name).suffix)}" for name in names]


def mask_suffix(source_suffix: str) -> str:
    """The source's format for TIF and PNG; PNG for anything else: a JPEG mask would be lossy (its
    label values smeared) and evaluate reads TIF and PNG masks."""
    return source_suffix if source_suffix.lower() in (".tif", ".tiff", ".png") else ".png"


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
        with folder_in_place(planned["mask"]) as folder:
            write_slice_masks(labels, case, folder, binary)
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
