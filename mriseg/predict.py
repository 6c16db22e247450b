"""``mriseg predict``: run a trained model and write masks in each input's own geometry.

A case goes through the one inference engine (:mod:`mriseg.inference`: the checkpoint's
preprocessing, slice-wise or sliding-window inference, probabilities resampled back to the source
grid and decoded there), optional clean-up (:func:`~mriseg.inference.keep_largest_component`), and
writers that keep the source geometry: :func:`write_nifti` (affine, qform/sform and their codes,
units) and :func:`write_slice_masks` (one mask per source slice, named after it).

Every file is written through :mod:`mriseg.files`, so an interrupted run never leaves a file that
looks finished.
"""

from __future__ import annotations

import glob
import gzip
import io
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from mriseg import viz
from mriseg.data.case import Case
from mriseg.data.readers import case_id_from_name, list_cases, read_case
from mriseg.devices import choose_device
from mriseg.errors import BadInputError, MrisegError
from mriseg import options as checks
from mriseg.data.preprocess import INTERPOLATIONS
from mriseg.files import atomic_path, check_writable_folder, refuse_output_over_inputs, write_bytes_atomic
from mriseg.inference import (InferenceSettings, LoadedModel, canonical_modality, keep_largest_component,
                              load_model, tumour_volume_ml)
from mriseg.log import info, progress

T = TypeVar("T")


# --- writers -----------------------------------------------------------------

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


DEFAULT_OUT = Path("predictions")


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
    threshold: float | None = None               # None: the checkpoint's
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
    interpolation: str = "linear"

    def check(self) -> None:
        """Every option's range, before any model is loaded or any input read."""
        checks.number("overlap", self.overlap, low=0.0, high=1.0, high_open=True)
        checks.number("batch_size", self.batch_size, integer=True, low=1, high=4096)
        checks.number("threshold", self.threshold, low=0.0, high=1.0, low_open=True, high_open=True, optional=True)
        checks.number("fps", self.gif_fps, low=0.1, high=100.0)
        checks.sizes("patch_size", self.patch_size, count=3)
        checks.choice("interpolation", self.interpolation, INTERPOLATIONS)
        choose_device(self.device)
        self.inference()

    def inference(self, patch_size: tuple[int, ...] | None = None) -> InferenceSettings:
        """The engine's settings (validated there)."""
        return InferenceSettings(patch_size=self.patch_size or patch_size, overlap=self.overlap,
                                 batch_size=self.batch_size, tta=self.tta, amp=self.amp,
                                 interpolation=self.interpolation)


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
    options.check()
    paths = expand_inputs(inputs, stdin)
    if not paths:
        raise MrisegError("no inputs given (pass files, folders, globs, or - to read paths from stdin)")
    refuse_output_over_inputs(options.out, paths)
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
    check_writable_folder(out)


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
    """Predict with the one engine (:meth:`LoadedModel.predict`), post-process and write."""
    truth = labels_for_overlay(case, options.labels) if options.overlay or options.gif else None
    planned = planned_outputs(case, options)
    sources = {Path(p).resolve() for p in case.source_paths}
    clash = [p for p in planned.values() if p.resolve() in sources]
    if clash:
        raise BadInputError(clash[0], "an output would replace this input file; choose another --out")
    existing = [str(p) for p in planned.values() if p.exists()]
    if existing and not options.overwrite:
        raise BadInputError(existing[0], "output exists (pass --overwrite to replace it)")
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(options.out, f"cannot create the output folder: {error.strerror or error}") from error
    prediction = predicted(case, loaded, options)
    labels = prediction.labels
    truth = loaded.task.truth_labels(truth) if truth is not None else None  # as the model was trained
    outputs = write_outputs(case, labels, prediction.probabilities, loaded, planned, options)
    if options.overlay or options.gif:
        outputs.update(write_pictures(case, labels, truth, loaded, planned, options))
    return CaseResult(case_id=case.case_id, input=str(case.source_paths[0]) if case.source_paths else "",
                      outputs={key: str(value) for key, value in outputs.items()},
                      volume_ml=tumour_volume_ml(labels, case.spacing))


def predicted(case: Case, loaded: LoadedModel, options: PredictOptions):
    """The engine's prediction of ``case`` with ``--threshold`` and ``--largest-component`` applied."""
    prediction = loaded.predict(case, options.inference(), threshold=options.threshold)
    if options.largest_component:
        prediction.labels = keep_largest_component(prediction.labels)
    return prediction


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


def labels_for_overlay(case: Case, labels_path: Path | None) -> np.ndarray | None:
    """The true labels to outline in green: ``--labels`` (a file, or a folder holding exactly one
    file whose case id is the case's) when given, else the labels the reader found beside the image."""
    if labels_path is None:
        return case.label
    path = Path(labels_path)
    if path.is_dir():
        matches = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                         and case_id_from_name(p.name) == case.case_id)
        if len(matches) != 1:
            found = f"{len(matches)} files ({', '.join(p.name for p in matches[:3])})" if matches else "no file"
            raise BadInputError(path, f"{found} named after case {case.case_id} (e.g. {case.case_id}_seg.nii.gz)")
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
    multiclass = loaded.task.kind != "binary"
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
