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

import glob
import gzip
import io
import itertools
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO, TypeVar

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from skimage.measure import label as connected_components

from mriseg import viz
from mriseg.checkpoint import load_checkpoint, model_from_checkpoint
from mriseg.data.case import Case
from mriseg.data.preprocess import PreprocessParams, preprocess_case, restore_to_source
from mriseg.data.readers import list_cases, read_case
from mriseg.errors import BadInputError, MrisegError
from mriseg.log import info, progress

T = TypeVar("T")

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
        output = predictor(batch).float()
        if scores is None:
            scores = torch.zeros((output.shape[1], *padded), device=image.device)
        for window, window_output in zip(windows, output):
            scores[(slice(None), *window)].addcmul_(window_output, weights)  # in place: no weighted copy
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
            output = model(batch)
        # Deep-supervision models may return several outputs; the first is full resolution.
        logits = (output[0] if isinstance(output, (list, tuple)) else output).float()
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
    spatial_zooms = [float(z) for z in (case.header.get("zooms") or case.spacing)][:case.spatial_dims]
    header.set_zooms(spatial_zooms + [1.0] * (array.ndim - len(spatial_zooms)))
    affine = case.affine if case.affine is not None else np.diag([*case.spacing, 1.0])
    image = nib.Nifti1Image(array, None, header)
    image.set_sform(np.asarray(case.header.get("sform", affine)), code=int(case.header.get("sform_code", 1)))
    image.set_qform(np.asarray(case.header.get("qform", affine)), code=int(case.header.get("qform_code", 1)))
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


# --- the command -------------------------------------------------------------

DEFAULT_RUN = Path("runs") / "latest"
DEFAULT_OUT = Path("predictions")
# Different datasets name the same sequence differently (BraTS 2021 vs 2023, MSD, LGG).
MODALITY_ALIASES = {"t1c": "t1ce", "t1gd": "t1ce", "t1-gd": "t1ce", "t1n": "t1", "t1w": "t1",
                    "t2w": "t2", "t2f": "flair", "t2-flair": "flair"}
TASK_KINDS = ("binary", "multiclass", "regions")
GENERIC_CHANNEL_NAME = re.compile(r"^(channel\d+|image)$")


@dataclass
class PredictOptions:
    """Everything ``mriseg predict`` can be told besides its inputs and model (see the CLI help)."""

    out: Path = DEFAULT_OUT
    overlap: float = 0.5
    batch_size: int = 8
    patch_size: tuple[int, ...] | None = None
    tta: bool = False
    amp: bool = False
    device: str = "auto"
    threshold: float = 0.5
    largest_component: bool = False
    probabilities: bool = False
    overlay: bool = False
    overlay_modality: str | None = None
    all_slices: bool = False
    labels: Path | None = None
    gif: bool = False
    gif_fps: float = 10.0
    modalities: str | None = None
    overwrite: bool = False


@dataclass
class LoadedModel:
    """A checkpoint and its network, ready to predict."""

    path: Path
    checkpoint: dict
    network: torch.nn.Module
    device: torch.device

    @property
    def spatial_dims(self) -> int:
        return int(self.checkpoint["model"]["spatial_dims"])

    @property
    def task(self) -> dict:
        return self.checkpoint["task"]

    @property
    def modalities(self) -> list[str]:
        return list(self.checkpoint.get("modalities") or [])

    @property
    def in_channels(self) -> int:
        return int(self.checkpoint["model"]["in_channels"])

    @property
    def activation(self) -> str:
        return self.task.get("activation") or ("softmax" if self.task.get("kind") == "multiclass" else "sigmoid")

    @property
    def label_names(self) -> dict[int, str]:
        """Names of the label values written (for overlay legends), background left out."""
        if self.task.get("kind") == "multiclass" and self.task.get("channel_names"):
            names = dict(zip(self.task["labels"], self.task["channel_names"]))
        else:
            names = (self.checkpoint.get("label_info") or {}).get("names") or {}
        return {int(value): str(name) for value, name in names.items() if int(value) != 0}


@dataclass
class CaseResult:
    """What happened to one case; ``as_json()`` is the ``--json`` line."""

    case_id: str
    input: str
    status: str = "ok"
    outputs: dict[str, str] = field(default_factory=dict)
    volume_ml: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def as_json(self) -> dict:
        return {"case_id": self.case_id, "input": self.input, "status": self.status, "outputs": self.outputs,
                "volume_ml": None if self.volume_ml is None else round(self.volume_ml, 4),
                "seconds": round(self.seconds, 3), "error": self.error}


def resolve_model_path(model: str | Path | None) -> Path:
    """The checkpoint to use: ``model`` (a .pt file or run folder), else ``$MRISEG_MODEL``,
    else ``runs/latest``. Prints which default was taken."""
    if model is None:
        from_env = os.environ.get("MRISEG_MODEL")
        if from_env:
            info(f"model: {from_env} (from $MRISEG_MODEL)")
            model = from_env
        else:
            if not DEFAULT_RUN.exists():
                raise MrisegError(f"no model given, $MRISEG_MODEL is not set and {DEFAULT_RUN}/ does not exist: "
                                  "train one with `mriseg train`, or run `mriseg demo` for a small one, "
                                  "then pass --model RUN_DIR_OR_CHECKPOINT")
            info(f"model: {DEFAULT_RUN} (default: the newest run)")
            model = DEFAULT_RUN
    path = Path(model)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise BadInputError(path, "run folder has no best.pt (did training finish an epoch?)")
        path = path / "best.pt"
    return path


def choose_device(name: str) -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise MrisegError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps, auto)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MrisegError(f"--device {name}: no CUDA GPU is available here")
    return device


def load_model(model: str | Path | None, device: str = "auto") -> LoadedModel:
    """Find, read and rebuild the model (see :func:`resolve_model_path`)."""
    path = resolve_model_path(model)
    checkpoint = load_checkpoint(path)
    kind = checkpoint["task"].get("kind") if isinstance(checkpoint["task"], dict) else None
    if kind not in TASK_KINDS:
        raise BadInputError(path, f"checkpoint task kind {kind!r} is not one of {', '.join(TASK_KINDS)}")
    target = choose_device(device)
    network = model_from_checkpoint(checkpoint).to(target).eval()
    return LoadedModel(path=path, checkpoint=checkpoint, network=network, device=target)


def expand_inputs(inputs: Sequence[str], stdin: TextIO | None = None) -> list[str]:
    """Inputs as given, with globs expanded (sorted) and ``-`` replaced by one path per stdin line.

    A pattern that matches nothing is kept as is, so that it is reported as a missing input.
    """
    expanded: list[str] = []
    for item in inputs:
        if item == "-":
            lines = (stdin or sys.stdin).read().splitlines()
            expanded += [line.strip() for line in lines if line.strip()]
        elif glob.has_magic(item):
            expanded += sorted(glob.glob(item)) or [item]
        else:
            expanded.append(item)
    return expanded


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n (e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise MrisegError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def take_shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Every ``count``-th item starting at ``index``: shards 0..count-1 together take each item once."""
    return list(items[index::count])


def select_modalities(case: Case, expected: list[str], in_channels: int) -> Case:
    """Reorder (and pick) the case's channels to the checkpoint's modality order.

    Names are compared case-insensitively after mapping common aliases (t1c = t1ce,
    t2f = flair, ...). A file without modality names (a plain NIfTI or image) is used
    as is when its channel count fits.
    """
    source = case.source_paths[0] if case.source_paths else Path(case.case_id)
    names = [canonical_modality(name) for name in case.modalities]
    wanted = [canonical_modality(name) for name in expected]
    if wanted and all(name in names for name in wanted):
        order = [names.index(name) for name in wanted]
        image = case.image[order]
    elif case.image.shape[0] == in_channels and (not wanted or all(GENERIC_CHANNEL_NAME.match(n) for n in names)):
        image = case.image
    else:
        missing = [name for name in wanted if name not in names]
        needed = f"modalities {', '.join(expected)}" if expected else f"{in_channels} channels"
        raise BadInputError(source, f"the model needs {needed}; this input has {', '.join(case.modalities)}"
                                    + (f" (missing {', '.join(missing)})" if missing else ""))
    return replace(case, image=image, modalities=list(expected) or list(case.modalities))


def canonical_modality(name: str) -> str:
    name = name.strip().lower()
    return MODALITY_ALIASES.get(name, name)


def predict(inputs: Sequence[str], model: str | Path | None = None, options: PredictOptions | None = None,
            shard: tuple[int, int] | None = None, stdin: TextIO | None = None,
            on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Predict every input; the Python form of ``mriseg predict``.

    Inputs are files or folders (a folder holding several cases predicts each), globs, or
    ``-`` for paths on stdin. A bad input is reported in its :class:`CaseResult` and the
    others go on. ``on_result`` is called as each case finishes (the CLI prints there).

    Raises:
        MrisegError: when nothing can start: no inputs, no usable model, or an output
            folder that cannot be written.
    """
    options = options or PredictOptions()
    paths = expand_inputs(inputs, stdin)
    if not paths:
        raise MrisegError("no inputs given (pass files, folders, globs, or - to read paths from stdin)")
    if shard is not None:
        paths = take_shard(paths, *shard)
        info(f"shard {shard[0]}/{shard[1]}: {len(paths)} input(s)")
    loaded = load_model(model, options.device)
    prepare_output_folder(options.out)
    results = []
    for path in progress(paths, description="predict"):
        for result in predict_path(path, loaded, options):
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def prepare_output_folder(out: Path) -> None:
    """Create ``out`` and check that files can be written in it."""
    if out == DEFAULT_OUT:
        info(f"output folder: {out}/ (default)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise BadInputError(out, f"output folder is not writable: {error.strerror or error}") from error


def predict_path(path: str, loaded: LoadedModel, options: PredictOptions) -> list[CaseResult]:
    """Predict the case (or every case of a dataset folder) at ``path``; never raises for bad input."""
    started = time.perf_counter()
    try:
        folder = Path(path)
        refs = list_cases(folder, modalities=options.modalities) if folder.is_dir() else [folder]
        if folder.is_dir() and len(refs) > 1:
            info(f"{path}: {len(refs)} cases")
    except MrisegError as error:
        return [CaseResult(case_id=Path(path).name.split(".")[0], input=path, status="failed", error=str(error),
                           seconds=time.perf_counter() - started)]
    results = []
    for ref in refs:
        started = time.perf_counter()
        case_id = ref.name.split(".")[0] if isinstance(ref, Path) else ref.case_id
        try:
            result = predict_case(read_case(ref), loaded, options)
            result.input = path
        except MrisegError as error:
            result = CaseResult(case_id=case_id, input=path, status="failed", error=str(error))
        except torch.OutOfMemoryError:
            result = CaseResult(case_id=case_id, input=path, status="failed",
                                error=f"{path}: out of memory on {loaded.device} (try a smaller --batch-size, "
                                      "or --amp)")
        result.seconds = time.perf_counter() - started
        results.append(result)
    return results


def predict_case(case: Case, loaded: LoadedModel, options: PredictOptions) -> CaseResult:
    """Preprocess as in training, infer, map back to the source grid, post-process and write."""
    selected = select_modalities(case, loaded.modalities, loaded.in_channels)
    truth = labels_for_overlay(case, options.labels) if options.overlay or options.gif else None
    planned = planned_outputs(case, options)
    existing = [str(p) for p in planned.values() if p.exists()]
    if existing and not options.overwrite:
        raise BadInputError(existing[0], "output exists (pass --overwrite to replace it)")
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(options.out, f"cannot create the output folder: {error.strerror or error}") from error
    params = PreprocessParams.from_dict(loaded.checkpoint.get("preprocess") or {})
    image, _, record = preprocess_case(selected, params)
    probabilities = infer(loaded, np.asarray(image, dtype=np.float32), selected.slice_axis, options)
    labels = restore_to_source(probabilities_to_labels(probabilities, loaded.task, options.threshold), record)
    if options.largest_component:
        labels = keep_largest_component(labels)
    outputs = write_outputs(case, labels, probabilities, record, loaded, planned, options)
    if options.overlay or options.gif:
        outputs.update(write_pictures(case, labels, truth, loaded, planned, options))
    return CaseResult(case_id=case.case_id, input=str(case.source_paths[0]) if case.source_paths else "",
                      outputs={key: str(value) for key, value in outputs.items()},
                      volume_ml=tumour_volume_ml(labels, case.spacing))


def infer(loaded: LoadedModel, image: np.ndarray, slice_axis: int | None, options: PredictOptions) -> np.ndarray:
    """Probabilities (K, *spatial) for a preprocessed image (C, *spatial), on the model's device."""
    predictor = make_predictor(loaded.network, loaded.activation, amp=options.amp)
    if options.tta:
        predictor = with_flips(predictor, loaded.spatial_dims)
    tensor = torch.from_numpy(image).to(loaded.device)
    if loaded.spatial_dims == 2:
        scores = slicewise_predict(predictor, tensor, slice_axis, options.batch_size)
    else:
        if tensor.ndim != 4:
            raise MrisegError(f"the model is 3D but the input is {tensor.ndim - 1}D")
        # Training without --patch-size saw whole volumes: predict them whole too.
        patch = options.patch_size or tuple(loaded.checkpoint.get("patch_size") or tensor.shape[1:])
        scores = sliding_window_predict(predictor, tensor, patch, options.overlap, options.batch_size)
    return scores.cpu().numpy()


def planned_outputs(case: Case, options: PredictOptions) -> dict[str, Path]:
    """Where each output of a case goes, so that existing files are found before any work.

    NIfTI sources give ``OUT/<case>_seg.nii.gz``; slice stacks give ``OUT/<case>/`` with one
    mask per source slice; single 2D images give ``OUT/<name>_mask.<ext>``.
    """
    out = options.out
    planned: dict[str, Path] = {}
    if case.affine is not None:
        planned["mask"] = out / f"{case.case_id}_seg.nii.gz"
        if options.probabilities:
            planned["probabilities"] = out / f"{case.case_id}_probabilities.nii.gz"
    elif case.spatial_dims == 3:
        planned["mask"] = out / case.case_id
        if options.probabilities:
            planned["probabilities"] = out / f"{case.case_id}_probabilities.npy"
    else:
        planned["mask"] = out / slice_mask_names(case)[0]
        if options.probabilities:
            planned["probabilities"] = out / f"{case.case_id}_probabilities.npy"
    if options.overlay:
        planned["overlays"] = out / "overlays" / case.case_id
    if options.gif:
        planned["gif"] = out / f"{case.case_id}.gif"
    return planned


def write_outputs(case: Case, labels: np.ndarray, probabilities: np.ndarray, record: dict, loaded: LoadedModel,
                  planned: dict[str, Path], options: PredictOptions) -> dict[str, Path]:
    """Write the mask (and soft maps with ``--probabilities``) in the source's format and geometry."""
    outputs: dict[str, Path] = {}
    if case.affine is not None:
        outputs["mask"] = write_nifti(labels, case, planned["mask"])
    elif case.spatial_dims == 3:
        planned["mask"].mkdir(exist_ok=True)
        write_slice_masks(labels, case, planned["mask"])
        outputs["mask"] = planned["mask"]
    else:
        outputs["mask"] = write_slice_masks(labels, case, options.out)[0]
    if options.probabilities:
        # Outside the crop the model saw nothing: background is certain there.
        background = [1.0 if loaded.activation == "softmax" and channel == 0 else 0.0
                      for channel in range(probabilities.shape[0])]
        soft = restore_to_source(probabilities.astype(np.float32), record, fill=background)
        target = planned["probabilities"]
        if case.affine is not None:
            outputs["probabilities"] = write_nifti(np.moveaxis(soft, 0, -1), case, target)
        else:
            buffer = io.BytesIO()
            np.save(buffer, soft)
            write_atomically(target, buffer.getvalue())
            outputs["probabilities"] = target
    return outputs


def labels_for_overlay(case: Case, labels_path: Path | None) -> np.ndarray | None:
    """The true labels to outline in green: ``--labels`` (a file, or a folder holding a file
    named after the case) when given, else the labels the reader found beside the image."""
    if labels_path is None:
        return case.label
    path = Path(labels_path)
    if path.is_dir():
        matches = sorted(p for p in path.iterdir() if p.name.startswith(case.case_id) and p.is_file())
        if not matches:
            raise BadInputError(path, f"no label file starting with {case.case_id}")
        path = matches[0]
    label_case = read_case(path)
    label = np.rint(label_case.image[0]).astype(np.int64)
    if label.shape != case.spatial_shape:
        raise BadInputError(path, f"label shape {label.shape} differs from the image's {case.spatial_shape}")
    if set(np.unique(label).tolist()) <= {0, 255}:
        label = label // 255
    return label


def write_pictures(case: Case, labels: np.ndarray, truth: np.ndarray | None, loaded: LoadedModel,
                   planned: dict[str, Path], options: PredictOptions) -> dict[str, Path]:
    """Overlay PNGs (``--overlay``) and an animated GIF (``--gif``) of the case.

    Slices are those holding predicted or true tumour (every slice with ``--all-slices``);
    the GIF runs through the same slices, or through all of them when there is no tumour.
    """
    channel = overlay_channel(case, options.overlay_modality)
    grey = viz.to_grey(case.image[channel])
    if case.spatial_dims == 2:
        planes = [[grey], [labels], [truth]]
    else:
        axis_codes = nib.aff2axcodes(case.affine) if case.affine is not None else None
        planes = [viz.display_planes(volume, case.slice_axis or 0, axis_codes) if volume is not None
                  else [None] * grey.shape[case.slice_axis or 0] for volume in (grey, labels, truth)]
    grey_planes, predicted_planes, truth_planes = planes
    count = len(grey_planes)
    with_tumour = [i for i in range(count) if predicted_planes[i].any()
                   or (truth_planes[i] is not None and truth_planes[i].any())]
    shown = list(range(count)) if options.all_slices else with_tumour
    multiclass = loaded.task.get("kind", "binary") != "binary"
    names = loaded.label_names or {int(value): name for value, name in case.header.get("label_names", {}).items()
                                   if int(value) != 0}

    def picture(index: int) -> np.ndarray:
        predicted = predicted_planes[index] if multiclass else predicted_planes[index] > 0
        true = truth_planes[index]
        if true is not None and not multiclass:
            true = true > 0
        return viz.overlay_picture(grey_planes[index], predicted, true, multiclass, names,
                                   caption=f"slice {index + 1:0{len(str(count))}d}/{count}")

    written: dict[str, Path] = {}
    if options.overlay:
        folder = planned["overlays"]
        folder.mkdir(parents=True, exist_ok=True)
        slice_names = case.header.get("slice_names")
        for index in shown:
            name = (f"{Path(slice_names[index]).stem}.png" if slice_names and len(slice_names) == count
                    else f"{case.case_id}_{index:03d}.png")
            save_picture(viz.save_png, picture(index), folder / name)
        written["overlays"] = folder
    if options.gif:
        frames = [picture(index) for index in (shown or range(count))]
        save_picture(lambda frames_, path: viz.save_gif(frames_, path, options.gif_fps), frames, planned["gif"])
        written["gif"] = planned["gif"]
    return written


def save_picture(save: Callable, picture, path: Path) -> None:
    try:
        save(picture, path)
    except OSError as error:
        raise BadInputError(path, f"cannot write: {error.strerror or error}") from error


def overlay_channel(case: Case, modality: str | None) -> int:
    """The channel drawn under the outlines: ``modality`` if given, else FLAIR when present, else the first."""
    names = [canonical_modality(name) for name in case.modalities]
    if modality is not None:
        wanted = canonical_modality(modality)
        if wanted not in names:
            source = case.source_paths[0] if case.source_paths else case.case_id
            raise BadInputError(source, f"--overlay-modality {modality}: this input has {', '.join(case.modalities)}")
        return names.index(wanted)
    return names.index("flair") if "flair" in names else 0
