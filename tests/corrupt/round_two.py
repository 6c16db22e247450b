"""Bad inputs of the second round (docs/reliability.md, "Round two"): outputs over inputs,
ambiguous file names, values a type conversion would silently change, and files mriseg wrote
itself that were edited or swapped afterwards."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from corrupt.corpus import (BadInput, Scenario, Workspace, brats_file, evaluate_scenario, lgg_slice, make_run_folder,
                            predict_scenario, reject, resume_scenario, set_pixdim, train_scenario)


def _resave(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    source = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, source.affine if affine is None else affine), str(path))


# --- outputs over inputs ------------------------------------------------------------------

def predict_out_is_the_patient(ws: Workspace) -> Scenario:
    """predict PATIENT --out PATIENT --overwrite would replace the true _mask.tif files."""
    src = ws.copy("lgg")
    patient = lgg_slice(src, 1, 1).parent
    return Scenario(["predict", str(patient), "--model", str(ws.templates["checkpoint"]), "--out", str(patient),
                     "--overwrite", "--device", "cpu"], ws.out, (patient.name, "never land on inputs"))


def predict_out_holds_the_input(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    patient = lgg_slice(src, 1, 1).parent
    return Scenario(["predict", str(patient), "--model", str(ws.templates["checkpoint"]), "--out", str(src),
                     "--overwrite", "--device", "cpu"], ws.out, ("holds the input", "never land on inputs"))


def preprocess_cache_inside_the_data(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    return Scenario(["preprocess", str(src), str(src / "cache")], ws.out, ("lies inside", "never land on inputs"))


def evaluate_out_is_the_truth(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    return Scenario(["evaluate", str(pred), str(pred), "--out", str(pred), "--overwrite"], ws.out,
                    ("pred", "never land on inputs"))


# --- ambiguous names ---------------------------------------------------------------------------

def lgg_two_files_one_slice_number(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    first = lgg_slice(src, 1, 2)
    shutil.copy(first, first.with_name(first.name.replace("_2.tif", "_02.tif")))
    return reject(ws, src, first.parent, "slice number 2")


def brats_two_files_one_modality(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    flair = brats_file(src, 1, "flair")
    shutil.copy(flair, flair.with_name(flair.name.replace("_flair", "_old_flair")))
    return reject(ws, src, flair.parent, "both match modality 'flair'")


def evaluate_duplicate_region_names(ws: Workspace) -> Scenario:
    scenario = evaluate_scenario(ws, ws.templates["masks"], ws.templates["masks"], "twice")
    scenario.args += ["--regions", "WT=1;WT=2"]
    scenario.fragments = ("WT", "twice")
    return scenario


# --- values a conversion would change silently -------------------------------------------------

def nifti_complex_image(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t1")
    data = np.asanyarray(nib.load(str(target)).dataobj).astype(np.complex64) * (1 + 1j)
    _resave(target, data)
    return reject(ws, src, target, "complex")


def nifti_nan_affine(ws: Workspace) -> Scenario:
    """srow_x holds NaN in the raw header (nibabel would write a clean one on save)."""
    src = ws.copy("brats")
    target = brats_file(src, 1, "t2")
    raw = bytearray(gzip.decompress(target.read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    header["srow_x"] = [np.nan, 0, 0, 0]
    header["sform_code"], header["qform_code"] = 1, 0
    raw[:348] = header.binaryblock
    target.write_bytes(gzip.compress(bytes(raw)))
    return reject(ws, src, target, "NaN")


def nifti_half_label(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "seg")
    data = np.asanyarray(nib.load(str(target)).dataobj).astype(np.float32)
    data[data > 0] = 0.5
    _resave(target, data)
    return reject(ws, src, target, "non-integer")


def evaluate_zero_voxel_size(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    target = sorted(pred.glob("*.nii.gz"))[0]
    set_pixdim(target, (1.0, 0.0, 1.0))
    return evaluate_scenario(ws, pred, target, "voxel size")


def synth_into_a_file(ws: Workspace) -> Scenario:
    target = ws.root / "data"
    target.write_text("an existing file")
    return Scenario(["synth", str(target)], ws.out, (target.name, "not a folder"))


def predict_device_mps(ws: Workspace) -> Scenario:
    scenario = predict_scenario(ws, ws.templates["checkpoint"], ws.templates["checkpoint"])
    scenario.args += ["--device", "mps"]
    scenario.fragments = ("--device mps", "not available")
    return scenario


# --- files mriseg wrote, edited or swapped afterwards ----------------------------------------------

def resume_last_copied_from_best(ws: Workspace) -> Scenario:
    """last.pt replaced by a best.pt (weights only, no optimiser state)."""
    run = make_run_folder(ws)
    return resume_scenario(ws, run / "last.pt", "no training state", "best.pt")


def resume_config_edited(ws: Workspace) -> Scenario:
    run = make_run_folder(ws)
    config = json.loads((run / "config.json").read_text())
    config["options"]["lr"] = "fast"
    (run / "config.json").write_text(json.dumps(config))
    return resume_scenario(ws, run / "config.json", "--lr")


def cache_manifest_field_mistyped(ws: Workspace) -> Scenario:
    cache = ws.copy("cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    first = next(iter(manifest["cases"]))
    manifest["cases"][first]["shape"] = "big"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return train_scenario(ws, cache, cache / "manifest.json", "shape")


def cache_array_wrong_shape(ws: Workspace) -> Scenario:
    cache = ws.copy("cache")
    first = sorted((cache / "cases").iterdir())[0]
    image = np.load(first / "image.npy")
    np.save(first / "image.npy", image[:, :-1])
    return train_scenario(ws, cache, first / "image.npy", "the manifest says")


def checkpoint_task_without_fields(ws: Workspace) -> Scenario:
    target = ws.root / "no-task.pt"
    document = torch.load(ws.templates["checkpoint"], weights_only=True)
    document["task"] = {"kind": "regions"}
    torch.save(document, target)
    return predict_scenario(ws, target, target, "regions")


ROUND_TWO: list[BadInput] = [
    BadInput("predict-out-is-input", "predict", "--out is the patient folder, with --overwrite", "refused",
             predict_out_is_the_patient),
    BadInput("predict-out-holds-input", "predict", "--out is the folder holding the patient", "refused",
             predict_out_holds_the_input),
    BadInput("preprocess-cache-inside-data", "preprocess", "cache folder inside the dataset", "refused",
             preprocess_cache_inside_the_data),
    BadInput("evaluate-out-is-input", "evaluate", "--out is the prediction folder", "refused",
             evaluate_out_is_the_truth),
    BadInput("lgg-slice-number-twice", "preprocess", "_2.tif and _02.tif in one patient", "refused",
             lgg_two_files_one_slice_number),
    BadInput("brats-modality-twice", "preprocess", "two files match *_flair in one case", "refused",
             brats_two_files_one_modality),
    BadInput("evaluate-region-twice", "evaluate", "--regions names WT twice", "refused",
             evaluate_duplicate_region_names),
    BadInput("nifti-complex", "preprocess", "complex-valued modality", "refused", nifti_complex_image),
    BadInput("nifti-nan-affine", "preprocess", "sform holding NaN", "refused", nifti_nan_affine),
    BadInput("label-half", "preprocess", "float label values 0.5", "refused", nifti_half_label),
    BadInput("evaluate-zero-voxel", "evaluate", "prediction mask with a zero voxel size", "refused",
             evaluate_zero_voxel_size),
    BadInput("synth-into-file", "synth", "synth OUT where OUT is an existing file", "refused", synth_into_a_file),
    BadInput("predict-device-mps", "predict", "--device mps where MPS is missing", "refused", predict_device_mps),
    BadInput("resume-last-from-best", "train", "--resume with last.pt copied from best.pt", "refused",
             resume_last_copied_from_best),
    BadInput("resume-config-edited", "train", "--resume with config.json's lr edited to text", "refused",
             resume_config_edited),
    BadInput("cache-record-mistyped", "train", "cache manifest: a case's shape is text", "refused",
             cache_manifest_field_mistyped),
    BadInput("cache-array-wrong-shape", "train", "a cached image.npy one row short of the manifest", "refused",
             cache_array_wrong_shape),
    BadInput("checkpoint-task-fields", "predict", "checkpoint task {'kind': 'regions'} without regions", "refused",
             checkpoint_task_without_fields),
]
