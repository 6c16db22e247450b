"""Write an nnU-Net v2 raw dataset (``DatasetNNN_NAME``) from any layout mriseg reads."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mriseg import __version__
from mriseg.data.case import Case
from mriseg.data.nifti import write_nifti
from mriseg.data.readers import list_cases, read_case
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import folder_in_place, refuse_output_over_inputs
from mriseg.labels import LABEL_NAMES, label_names_for, label_scheme, names_after_label_map, remap_labels
from mriseg.log import info, progress
from mriseg.options import number


def _slices(case: Case) -> Iterator[Case]:
    """A 3D case as 2D cases, one per slice along its slice axis, each a NIfTI of one slice."""
    axis = case.slice_axis if case.slice_axis is not None else 0
    names = case.header.get("slice_names") or [str(i + 1) for i in range(case.image.shape[axis + 1])]
    for index, name in enumerate(names):
        image = np.take(case.image, [index], axis=axis + 1)
        label = np.take(case.label, [index], axis=axis) if case.label is not None else None
        # the slice axis last, so every 2D case is an (H, W, 1) volume
        yield replace(case, case_id=f"{case.case_id}_{Path(str(name)).stem.split('_')[-1]}",
                      image=np.moveaxis(image, axis + 1, -1), label=None if label is None else np.moveaxis(label, axis, -1),
                      affine=None, header={k: v for k, v in case.header.items() if k == "label_names"}, slice_axis=2,
                      spacing=(*(s for i, s in enumerate(case.spacing) if i != axis), case.spacing[axis]))


def _units(source: Path, layout: str | None, modalities: str | None, dims: int) -> Iterator[Case]:
    refs = list_cases(source, layout=layout, modalities=modalities)
    for ref in progress(refs, description="convert"):
        case = read_case(ref)
        if case.spatial_dims == 2:
            case = replace(case, image=case.image[..., None], label=None if case.label is None else case.label[..., None],
                           spacing=(*case.spacing, 1.0))
        yield from (_slices(case) if dims == 2 else [case])


def _write_case(case: Case, folder: Path, label_map: dict[int, int]) -> set[int]:
    """The channel files (and label) of one case; returns its label values."""
    subset = "imagesTr" if case.label is not None else "imagesTs"
    for channel, image in enumerate(case.image):
        write_nifti(image.astype(np.float32), case, folder / subset / f"{case.case_id}_{channel:04d}.nii.gz")
    if case.label is None:
        return set()
    label = remap_labels(case.label, label_map).astype(np.uint8)
    write_nifti(label, case, folder / "labelsTr" / f"{case.case_id}.nii.gz")
    return set(np.unique(label).astype(int).tolist())


def _dataset_json(name: str, modalities: list[str], values: list[int], names: dict[int, str], training: int,
                  source: Path) -> dict[str, Any]:
    if values != list(range(len(values))):
        raise MrisegError(f"label values {values} are not consecutive from 0, which nnU-Net requires; map them "
                          f"with --label-map (e.g. {values[-1]}:{len(values) - 1})")
    labels = {"background": 0, **{names.get(v, f"class{v}"): v for v in values if v}}
    return {"name": name, "channel_names": {str(i): m for i, m in enumerate(modalities)}, "labels": labels,
            "numTraining": training, "file_ending": ".nii.gz",
            "description": f"converted by mriseg {__version__} from {source}"}


def convert_to_nnunet(source: str | Path, out: str | Path, dataset_id: int, name: str, layout: str | None = None,
                      modalities: str | None = None, label_map: dict[int, int] | None = None, dims: int = 3,
                      overwrite: bool = False) -> Path:
    """Write ``OUT/DatasetNNN_NAME`` from the dataset at ``source``; returns its folder.

    Labelled cases go to ``imagesTr``/``labelsTr``, unlabelled ones to ``imagesTs``; every channel
    file keeps the case's geometry. ``dims=2`` writes one case per slice (2D data for nnU-Net's
    2d configuration); ``label_map`` replaces label values as ``preprocess --label-map`` does.
    """
    number("dataset_id", dataset_id, integer=True, low=1, high=999)
    number("dims", dims, integer=True, low=2, high=3)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(name)):
        raise MrisegError(f"--name {name!r}: use letters, digits, '_' and '-' (nnU-Net's DatasetNNN_NAME)")
    source, target = Path(source), Path(out) / f"Dataset{int(dataset_id):03d}_{name}"
    refuse_output_over_inputs(target, [source])
    if Path(out).exists() and not Path(out).is_dir():
        raise BadInputError(Path(out), "OUT is a file; convert writes DatasetNNN_NAME/ inside a folder")
    taken = sorted(p.name for p in Path(out).glob(f"Dataset{int(dataset_id):03d}_*") if p != target) \
        if Path(out).is_dir() else []
    if taken:  # nnU-Net finds datasets by id: two with one id make it refuse both
        raise BadInputError(Path(out) / taken[0], f"--dataset-id {int(dataset_id)} is taken by this dataset; nnU-Net "
                                                  "needs one dataset per id: choose another --dataset-id")
    if target.exists() and not overwrite:
        raise BadInputError(target, "exists; pass --overwrite to replace it")
    created = not Path(out).exists()  # removed again if the conversion fails before writing anything
    try:
        with folder_in_place(target) as partial:  # written whole under a hidden name, then renamed
            for folder in ("imagesTr", "labelsTr", "imagesTs"):
                (partial / folder).mkdir()
            values, originals, names, channels, training, naming = set(), set(), {}, None, 0, ""
            for case in _units(source, layout, modalities, dims):
                if channels is not None and case.modalities != channels:
                    raise BadInputError(case.source_paths[0], f"channels {case.modalities} differ from {channels}")
                channels = case.modalities
                names.update({int(k): v for k, v in (case.header.get("label_names") or {}).items()})
                naming = case.header.get("naming", naming)
                values |= _write_case(case, partial, label_map or {})
                originals |= set(np.unique(case.label).astype(int).tolist()) if case.label is not None else set()
                training += case.label is not None
            ordered = sorted(values | {0})
            source_names = names or LABEL_NAMES.get(label_scheme(originals, naming), {})
            named = label_names_for(ordered, label_scheme(ordered),
                                    names_after_label_map(source_names, label_map or {}) or None)
            meta = _dataset_json(name, channels or [], ordered, named, training, source)
            (partial / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
            if not any((partial / "imagesTs").iterdir()):
                (partial / "imagesTs").rmdir()
    finally:
        if created and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()
    info(f"{target}: {training} training case(s), channels {', '.join(channels or [])}, labels {meta['labels']}")
    return target
