"""``mriseg evaluate`` as Python functions: masks against truth, or a model predicted in memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from mriseg.errors import BadInputError, MrisegError
from mriseg.files import refuse_output_over_inputs
from mriseg.labels import Region, Task
from mriseg.log import info, warn
from mriseg.options import number
from mriseg.evaluate.masks import MaskVolume, TruthSource, find_mask_cases, open_truth, read_mask, scheme_for_dataset
from mriseg.evaluate.scoring import EMPTY_POLICIES, parse_regions
from mriseg.evaluate.report import EvaluationResult, match_case_ids, prepare_output_folder, score_and_report



def evaluate(pred: Path, truth: Path, out: Path, regions: str = "auto", empty: str = "score",
             strict: bool = False, overwrite: bool = False, modalities: str | None = None,
             workers: int = 1) -> EvaluationResult:
    """Score the masks in ``pred`` against ``truth``, matched by case id; write the reports into ``out``.

    Args:
        pred: a mask file, or a folder of ``<case_id>.nii.gz`` files, TIF/PNG masks or case folders.
        truth: the same kinds of masks, or a labelled dataset in a layout the readers know.
        out: folder for metrics.csv, summary.json and dsc.png.
        regions: ``auto`` (BraTS/MSD regions for those datasets, else binary), ``binary``, ``labels``
            (every label on its own), ``brats``, ``msd``, or ``NAME=1,2;NAME=4``.
        empty: empty-mask policy, a key of :data:`EMPTY_POLICIES`.
        strict: make case ids present on one side only an error instead of a warning.
        overwrite: replace earlier results in ``out``.
        modalities: file-name map for a BraTS truth dataset, as for ``mriseg preprocess``.
        workers: cases read and scored at once (threads).
    """
    number("workers", workers, low=1, integer=True)
    if empty not in EMPTY_POLICIES:
        raise MrisegError(f"--empty {empty!r}: choose one of {', '.join(EMPTY_POLICIES)}")
    scheme = parse_regions(regions)
    pred_cases = find_mask_cases(pred)
    truth_source = open_truth(truth, modalities)
    refuse_output_over_inputs(out, [pred, truth], nested=False)
    matched, pred_only, truth_only = match_case_ids(pred_cases, truth_source.case_ids, strict)
    if scheme == "auto":
        scheme = truth_source.default_scheme
        described = scheme if isinstance(scheme, str) else "regions of the dataset.json labels " + ", ".join(
            f"{region.name}={list(region.labels or ())}" for region in scheme)
        info(f"label scheme: {described} (from the truth; change with --regions)")
    prepare_output_folder(out, overwrite)
    loaders = [partial(_read_pair, pred_cases[case_id], truth_source, case_id) for case_id in matched]
    return score_and_report(loaders, len(matched), scheme, empty, out, pred_only, truth_only, workers)


def _read_pair(pred_path: Path, truth_source: TruthSource, case_id: str) -> tuple[MaskVolume, MaskVolume]:
    return read_mask(pred_path), truth_source.read(case_id)



def scheme_from_task(task: Task) -> tuple[Region, ...] | None:
    """The regions a model's outputs mean: a ``regions`` task's regions, or any task's own regions
    when its labels were remapped (the dataset's scheme no longer describes them); else None."""
    if task.kind == "regions":
        return task.regions
    return task.scored_regions() if task.label_map else None


def evaluate_model(model: Path | Sequence[Path], data: Path, out: Path, regions: str = "auto", empty: str = "score",
                   overwrite: bool = False, modalities: str | None = None, device: str = "auto",
                   batch_size: int = 8, tta: bool | None = None, largest_component: bool | None = None,
                   interpolation: str = "linear", amp: bool | None = None,
                   channels_last: bool | None = None) -> EvaluationResult:
    """Predict every labelled case of ``data`` with ``model`` in memory and score it; nothing but the
    reports is written.

    The prediction is the one ``mriseg predict`` writes (the same engine:
    :meth:`mriseg.inference.LoadedModel.predict`). The truth is mapped with the checkpoint's label
    map (``preprocess --label-map``) before scoring, so both sides use the trained labels.
    ``regions="auto"`` scores the regions the model was trained on when it was trained on regions,
    else the dataset's scheme.
    """
    from mriseg.data.readers import list_cases, read_case
    from mriseg.inference import InferenceSettings, keep_largest_component, load_model

    if empty not in EMPTY_POLICIES:
        raise MrisegError(f"--empty {empty!r}: choose one of {', '.join(EMPTY_POLICIES)}")
    scheme = parse_regions(regions)
    number("batch_size", batch_size, integer=True, low=1, high=4096)
    settings = InferenceSettings(batch_size=batch_size, tta=tta, interpolation=interpolation, amp=amp,
                                 channels_last=channels_last)
    refuse_output_over_inputs(out, [data], nested=False)
    loaded = load_model(model, device)
    refs = list_cases(data, modalities=modalities)
    labelled = [ref for ref in refs if ref.has_label]
    if not labelled:
        raise BadInputError(data, "no case has a label: nothing to score against")
    if len(labelled) < len(refs):
        warn(f"{len(refs) - len(labelled)} case(s) in {data} have no label and are not scored")
    if scheme == "auto":
        scheme = scheme_from_task(loaded.task) or scheme_for_dataset(labelled[0])
        info(f"label scheme: {scheme if isinstance(scheme, str) else 'regions of the checkpoint'} "
             "(change with --regions)")
    prepare_output_folder(out, overwrite)

    def pairs() -> Iterator[tuple[MaskVolume, MaskVolume]]:
        for ref in labelled:
            case = read_case(ref)
            labels = loaded.predict(case, settings).labels
            if largest_component if largest_component is not None else loaded.largest_component:
                labels = keep_largest_component(labels)
            # NIfTI carries its voxel size; TIF/PNG slices do not (the reader assumes 1 mm).
            known = case.affine is not None
            truth = loaded.task.truth_labels(case.label)
            if loaded.task.ignore_label is not None:  # ignored voxels count on neither side
                ignored = truth == loaded.task.ignore_label
                truth, labels = np.where(ignored, 0, truth), np.where(ignored, 0, labels)
            yield (MaskVolume(case.case_id, labels, case.spacing, case.affine, loaded.path, spacing_known=known),
                   MaskVolume(case.case_id, truth, case.spacing, case.affine, ref.label_paths[0],
                              spacing_known=known))

    return score_and_report((partial(lambda pair: pair, pair) for pair in pairs()), len(labelled),
                            scheme, empty, out)
