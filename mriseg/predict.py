"""``mriseg predict``: run a trained model and write masks in each input's own geometry.

The pieces, in the order a case goes through them:

* inference engines: :func:`slicewise_predict` runs a 2D model over a volume in batches of
  slices; :func:`sliding_window_predict` runs a 3D model over overlapping patches blended
  with Gaussian weights (as nnU-Net and MONAI do); :func:`with_flips` averages mirrored
  copies (test-time augmentation);
* post-processing: :func:`probabilities_to_labels` (threshold, argmax, or BraTS-style
  regions back to their labels) and :func:`keep_largest_component`, the reference
  program's clean-up;
* writers that keep the source geometry: :func:`write_nifti` (affine, qform/sform codes)
  and :func:`write_slice_masks` (one mask per source slice, named after it).

Every file is written under a temporary name in the same folder and renamed when
complete, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import gzip
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from skimage.measure import label as connected_components

from mriseg.data.case import Case
from mriseg.errors import BadInputError

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""A batch (N, C, *spatial) in, per-class scores (N, K, *spatial) out."""

# U-Nets halve the resolution at most five times, so 2D inputs padded to a multiple
# of 32 fit every model in the registry whatever size the source slices have.
SIZE_MULTIPLE = 32


# --- inference engines -------------------------------------------------------

def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """Weights of shape ``patch_size`` that peak at the patch centre.

    Voxels near a window's border see less context and are predicted worse, so when
    windows overlap each voxel's result is a weighted mean favouring the windows it
    sits in the middle of (Isensee et al., nnU-Net, Nature Methods 2021). The
    standard deviation is ``sigma_scale`` times the patch size on each axis; weights
    are clamped away from zero so that every voxel keeps some weight.
    """
    weights: torch.Tensor | None = None
    for size in patch_size:
        offsets = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        axis_weights = torch.exp(-offsets**2 / (2 * (size * sigma_scale) ** 2))
        weights = axis_weights if weights is None else weights.unsqueeze(-1) * axis_weights
    assert weights is not None, "patch_size must have at least one axis"
    return weights.clamp_min(max(weights.min().item(), 1e-3))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``patch`` covering ``size`` with the given overlap.

    Windows advance by ``patch * (1 - overlap)``; the last one is moved back to end
    exactly at the border, so every window lies fully inside the (padded) volume.
    """
    if patch >= size:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    return [*range(0, size - patch, step), size - patch]


def sliding_window_predict(predictor: Predictor, image: torch.Tensor, patch_size: Sequence[int],
                           overlap: float = 0.5, batch_size: int = 4,
                           importance: str = "gaussian") -> torch.Tensor:
    """Predict a whole volume from overlapping patches.

    Args:
        predictor: the model (plus activation) applied to a batch of patches.
        image: (C, *spatial) on the device the predictor runs on.
        patch_size: the window size the model was trained on, one entry per spatial axis.
        overlap: fraction of a window shared with its neighbour on each axis, in [0, 1).
        batch_size: windows per forward pass.
        importance: ``"gaussian"`` (centre-weighted) or ``"constant"`` (plain mean).

    Returns:
        (K, *spatial) float32 scores. Volumes smaller than the patch are padded with
        zeros symmetrically (as MONAI's ``sliding_window_inference`` does) and cropped back.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial = tuple(image.shape[1:])
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(spatial):
        raise ValueError(f"patch {patch} has {len(patch)} axes but the image has {len(spatial)}")
    padding = [max(p - s, 0) for p, s in zip(patch, spatial)]
    pad_before = [total // 2 for total in padding]
    if any(padding):
        # F.pad lists (before, after) pairs from the last axis backwards.
        pairs = [(before, total - before) for before, total in zip(pad_before, padding)]
        image = torch.nn.functional.pad(image, [n for pair in reversed(pairs) for n in pair])
    padded = tuple(image.shape[1:])
    weights = (gaussian_importance_map(patch, device=image.device) if importance == "gaussian"
               else torch.ones(patch, device=image.device))
    corners = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded, patch))))
    scores: torch.Tensor | None = None
    weight_sum = torch.zeros(padded, device=image.device)
    for first in range(0, len(corners), batch_size):
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch))
                   for corner in corners[first:first + batch_size]]
        batch = torch.stack([image[(slice(None), *window)] for window in windows])
        output = predictor(batch).float() * weights
        if scores is None:
            scores = torch.zeros((output.shape[1], *padded), device=image.device)
        for window, window_scores in zip(windows, output):
            scores[(slice(None), *window)] += window_scores
            weight_sum[window] += weights
    assert scores is not None
    scores /= weight_sum
    crop = tuple(slice(before, before + s) for before, s in zip(pad_before, spatial))
    return scores[(slice(None), *crop)]


def slicewise_predict(predictor: Predictor, image: torch.Tensor, slice_axis: int | None,
                      batch_size: int = 16) -> torch.Tensor:
    """Run a 2D model over every slice of a volume (or once over a 2D image).

    Args:
        image: (C, *spatial): (C, H, W) for a 2D image or (C, D0, D1, D2) for a volume.
        slice_axis: spatial axis (0-based, channels not counted) to slice along; ignored for 2D.

    Returns:
        (K, *spatial) float32 scores in the input's axis order. Slices are padded with
        zeros to a multiple of :data:`SIZE_MULTIPLE` for the network and cropped back.
    """
    if image.ndim == 3:
        slices, axis = image.unsqueeze(0), None
    else:
        if slice_axis is None:
            raise ValueError("a volume needs a slice_axis for a 2D model")
        axis = slice_axis + 1
        slices = image.movedim(axis, 0)
    height, width = slices.shape[-2:]
    pad_h, pad_w = (-height) % SIZE_MULTIPLE, (-width) % SIZE_MULTIPLE
    outputs = []
    for first in range(0, slices.shape[0], batch_size):
        batch = slices[first:first + batch_size]
        if pad_h or pad_w:
            batch = torch.nn.functional.pad(batch, (0, pad_w, 0, pad_h))
        outputs.append(predictor(batch)[..., :height, :width].float())
    scores = torch.cat(outputs)
    return scores[0] if axis is None else scores.movedim(0, axis)


def with_flips(predictor: Predictor, spatial_dims: int) -> Predictor:
    """Test-time augmentation: the mean of the predictions on every mirrored copy.

    All 2**spatial_dims combinations of flipped spatial axes are run and each result is
    flipped back before averaging.
    """
    axes = [2 + d for d in range(spatial_dims)]
    flip_sets = [combo for r in range(1, len(axes) + 1) for combo in itertools.combinations(axes, r)]

    def averaged(batch: torch.Tensor) -> torch.Tensor:
        total = predictor(batch).float()
        for flipped in flip_sets:
            total += predictor(batch.flip(flipped)).float().flip(flipped)
        return total / (len(flip_sets) + 1)

    return averaged


def make_predictor(model: torch.nn.Module, activation: str, amp: bool = False) -> Predictor:
    """Wrap a network as a :data:`Predictor` returning probabilities.

    ``activation`` is ``"sigmoid"`` (binary or overlapping regions) or ``"softmax"``
    (mutually exclusive classes). ``amp`` runs the network in bfloat16 on CPU and
    float16 on CUDA.
    """
    device_type = next(model.parameters()).device.type

    def predict_batch(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type, enabled=amp,
                                                    dtype=torch.float16 if device_type == "cuda" else torch.bfloat16):
            logits = model(batch)
        logits = logits.float()
        return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)

    return predict_batch


# --- post-processing ---------------------------------------------------------

def regions_to_labels(region_masks: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """Turn overlapping region masks back into one label map.

    BraTS models predict nested regions (whole tumour {1, 2, 4} ⊃ tumour core {1, 4}
    ⊃ enhancing {4}). Regions are painted from the largest to the smallest, each with
    the label it holds that no smaller region holds, so the innermost region wins
    (2 where only WT, 1 where TC but not ET, 4 where ET).

    Args:
        region_masks: (R, *spatial) bool, one mask per region, in ``regions`` order.
        regions: the label values each region is made of.
    """
    labels = np.zeros(region_masks.shape[1:], dtype=np.uint8)
    order = sorted(range(len(regions)), key=lambda r: -len(regions[r]))
    for position, region in enumerate(order):
        smaller = set().union(*(set(regions[r]) for r in order[position + 1:]))
        own = sorted(set(regions[region]) - smaller) or sorted(regions[region])
        labels[region_masks[region]] = own[0]
    return labels


def probabilities_to_labels(probabilities: np.ndarray, task: dict, threshold: float = 0.5) -> np.ndarray:
    """Turn per-channel probabilities (K, *spatial) into a label map (*spatial) uint8.

    ``task["kind"]`` decides how: ``binary`` thresholds the single channel and writes
    the task's foreground label (1 unless the task says otherwise); ``multiclass``
    takes the argmax and maps channel i to ``task["labels"][i]``; ``regions``
    thresholds each channel and paints ``task["regions"]`` back to their labels.
    """
    kind = task.get("kind", "binary")
    if kind == "binary":
        foreground = int(task.get("foreground_label", 1))
        return np.where(probabilities[0] >= threshold, foreground, 0).astype(np.uint8)
    if kind == "multiclass":
        label_values = np.asarray(task.get("labels", range(probabilities.shape[0])), dtype=np.uint8)
        return label_values[np.argmax(probabilities, axis=0)]
    if kind == "regions":
        regions = [list(region) for region in _region_label_lists(task)]
        return regions_to_labels(probabilities >= threshold, regions)
    raise ValueError(f"unknown task kind {kind!r}")


def _region_label_lists(task: dict) -> list[list[int]]:
    regions = task["regions"]
    return [list(r) for r in (regions.values() if isinstance(regions, dict) else regions)]


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest face-connected blob of tumour (all labels together).

    The reference program cleans each predicted volume this way: a brain tumour is
    one lesion, so small detached blobs are taken as false positives.
    """
    foreground = labels > 0
    components, count = connected_components(foreground, connectivity=1, return_num=True)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == np.argmax(sizes), labels, 0).astype(labels.dtype)


def tumour_volume_ml(labels: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of all non-zero voxels in millilitres (voxel sizes in mm)."""
    return float(np.count_nonzero(labels) * np.prod(spacing) / 1000.0)


# --- writers -----------------------------------------------------------------

def _temporary_beside(path: Path) -> Path:
    """A hidden name in the same folder, keeping the extension readers look at."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}{''.join(path.suffixes)}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file only appears once complete."""
    temporary = _temporary_beside(path)
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise BadInputError(path, f"cannot write: {error.strerror or error}") from error


def nifti_like_source(array: np.ndarray, case: Case) -> nib.Nifti1Image:
    """A NIfTI image holding ``array`` with the source's affine, qform/sform and codes.

    ``case.header`` carries what the reader saw (``qform``, ``qform_code``, ``sform``,
    ``sform_code``, ``zooms``); without it the case's affine is used for both.
    """
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    zooms = case.header.get("zooms") or case.spacing
    header.set_zooms(tuple(float(z) for z in zooms)[:array.ndim])
    affine = case.affine if case.affine is not None else np.diag([*case.spacing, 1.0])
    image = nib.Nifti1Image(array, None, header)
    image.set_sform(np.asarray(case.header.get("sform", affine)), code=int(case.header.get("sform_code", 1)))
    image.set_qform(np.asarray(case.header.get("qform", affine)), code=int(case.header.get("qform_code", 1)))
    return image


def write_nifti(array: np.ndarray, case: Case, path: Path) -> Path:
    """Write ``array`` (the case's spatial shape) as NIfTI in the source's geometry."""
    if tuple(array.shape) != case.spatial_shape:
        raise ValueError(f"array shape {array.shape} differs from the source's {case.spatial_shape}")
    data = nifti_like_source(array, case).to_bytes()
    write_atomically(path, gzip.compress(data, compresslevel=6) if path.name.endswith(".gz") else data)
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


def write_slice_masks(labels: np.ndarray, case: Case, folder: Path) -> list[Path]:
    """Write a slice stack (or one 2D image) as 8-bit masks named after the source slices.

    Binary masks use 255 for tumour, as the LGG masks do; multi-class maps keep their
    label values.
    """
    names = slice_mask_names(case)
    planes = [labels] if labels.ndim == 2 else list(np.moveaxis(labels, case.slice_axis or 0, 0))
    if len(planes) != len(names):
        raise ValueError(f"{len(planes)} slices but {len(names)} source slice names")
    scale = 255 if labels.max(initial=0) <= 1 else 1
    written = []
    for plane, name in zip(planes, names):
        path = folder / name
        temporary = _temporary_beside(path)
        try:
            Image.fromarray((plane * scale).astype(np.uint8)).save(temporary)
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise BadInputError(path, f"cannot write: {error.strerror or error}") from error
        written.append(path)
    return written
