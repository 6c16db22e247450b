"""Predicting inputs: expanding them, sharding, one case through the engine, then the writers."""

from __future__ import annotations

import glob
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

import torch

from mriseg.data.case import Case
from mriseg.devices import choose_precision
from mriseg.data.readers import list_cases, read_case
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import check_writable_folder, refuse_output_over_inputs
from mriseg.inference import LoadedModel, keep_largest_component, load_model, tumour_volume_ml
from mriseg.log import info, progress
from mriseg.predict.options import CaseResult, DEFAULT_OUT, NAMINGS, SUBSETS, PredictOptions
from mriseg.predict.writers import slice_mask_names, write_outputs
from mriseg.predict.pictures import labels_for_overlay, write_pictures



T = TypeVar("T")


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


def predict(inputs: Sequence[str], model: str | Path | Sequence[str | Path] | None = None, options: PredictOptions | None = None,
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
    if options.patch_size is not None and loaded.spatial_dims == 2:
        raise MrisegError(f"--patch-size sets the sliding window of 3D models; {loaded.path} is a 2D model, which "
                          "reads whole slices")
    if options.threshold is not None and loaded.task.kind == "multiclass":
        raise MrisegError(f"--threshold {options.threshold:g}: {loaded.path} is a multi-class (softmax) model, "
                          "whose labels are the most probable class; --threshold applies to binary and region "
                          "models only")
    info(f"precision: {choose_precision(loaded.device, options.amp, options.channels_last).describe()}")
    prepare_output_folder(options.out)
    results, claimed = [], {}
    for path in progress(paths, description="predict"):
        for result in predict_path(path, loaded, options, claimed):
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def prepare_output_folder(out: Path) -> None:
    """Create ``out`` and check that files can be written in it."""
    if out == DEFAULT_OUT:
        info(f"output folder: {out}/ (default)")
    check_writable_folder(out)


def predict_path(path: str, loaded: LoadedModel, options: PredictOptions,
                 claimed: dict[Path, str] | None = None) -> list[CaseResult]:
    """Predict the case (or every case of a dataset folder) at ``path``; never raises for bad input.

    ``claimed`` maps the outputs written so far in this run to their inputs (filled in here), so
    that two inputs with one case id never write, or overwrite, the same file.
    """
    claimed = {} if claimed is None else claimed
    started = time.perf_counter()
    try:
        folder = Path(path)
        if options.subset is not None and folder.exists() and not folder.is_dir():
            raise BadInputError(folder, f"--subset {options.subset} picks a folder of an nnU-Net/MSD dataset; "
                                        "this is a file")
        subset = dataset_subset(folder, options.subset) if folder.is_dir() else None
        refs = (list_cases(subset, layout="nnunet-images") if subset is not None else
                list_cases(folder, modalities=options.modalities) if folder.is_dir() else [folder])
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
            result = predict_case(read_case(ref), loaded, options, claimed)
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


def dataset_subset(folder: Path, subset: str | None) -> Path | None:
    """The images folder to predict when ``folder`` is an nnU-Net/MSD dataset root (else None):
    ``--subset``, else ``imagesTs`` when it exists, else ``imagesTr``; said on stderr."""
    present = [name for name in SUBSETS if (folder / name).is_dir()]
    if not present:
        if subset is not None:
            raise BadInputError(folder, f"--subset {subset}: not an nnU-Net/MSD dataset (no imagesTr/ or imagesTs/)")
        return None
    chosen = subset or present[0]
    if chosen not in present:
        raise BadInputError(folder / chosen, f"--subset {chosen}: no such folder in this dataset")
    other = [name for name in present if name != chosen]
    info(f"{folder}: nnU-Net/MSD dataset; predicting {chosen}/" +
         (f" (--subset {other[0]} predicts {other[0]}/)" if other else ""))
    return folder / chosen


def predict_case(case: Case, loaded: LoadedModel, options: PredictOptions,
                 claimed: dict[Path, str] | None = None) -> CaseResult:
    """Predict with the one engine (:meth:`LoadedModel.predict`), post-process and write
    (``claimed``: outputs already written in this run, by input; see :func:`predict_path`)."""
    planned = planned_outputs(case, options)
    source = str(case.source_paths[0]) if case.source_paths else case.case_id
    if options.labels is not None and options.labels.is_file() and claimed:
        raise BadInputError(options.labels, f"--labels names one file, which outlines one case, and this run "
                                            f"predicts several (now {case.case_id}); give a folder of label files "
                                            "named after the cases")
    truth = labels_for_overlay(case, options.labels) if options.overlay or options.gif else None
    taken = [p for p in planned.values() if p.resolve() in (claimed or {})]
    if taken:
        raise BadInputError(Path(source), f"its output {taken[0]} was already written in this run for "
                                          f"{claimed[taken[0].resolve()]} (the same case id {case.case_id!r}); "
                                          "predict one of them into another --out")
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
    if claimed is not None:
        claimed.update({p.resolve(): source for p in planned.values()})
    if options.overlay or options.gif:
        outputs.update(write_pictures(case, labels, truth, loaded, planned, options))
    return CaseResult(case_id=case.case_id, input=str(case.source_paths[0]) if case.source_paths else "",
                      outputs={key: str(value) for key, value in outputs.items()},
                      volume_ml=tumour_volume_ml(labels, case.spacing))


def predicted(case: Case, loaded: LoadedModel, options: PredictOptions):
    """The engine's prediction of ``case`` with ``--threshold`` and ``--largest-component`` applied."""
    prediction = loaded.predict(case, options.inference(), threshold=options.threshold)
    if options.largest_component if options.largest_component is not None else loaded.largest_component:
        prediction.labels = keep_largest_component(prediction.labels)
    return prediction


def planned_outputs(case: Case, options: PredictOptions) -> dict[str, Path]:
    """Where each output of a case goes, so that existing files are found before any work.

    NIfTI sources give ``OUT/<case>_seg.nii.gz`` (``OUT/<case>.nii.gz`` with ``--naming nnunet|brats``,
    the default for nnU-Net/MSD inputs); slice stacks give ``OUT/<case>/`` with one
    mask per source slice; single 2D images give ``OUT/<name>_mask.<ext>``.
    """
    out = options.out
    planned: dict[str, Path] = {}
    if case.affine is not None:
        naming = options.naming or ("nnunet" if case.layout == "msd" else "mriseg")
        planned["mask"] = out / NAMINGS[naming].format(case=case.case_id)
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
