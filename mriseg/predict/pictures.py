"""Overlay PNGs (prediction red, truth green) and GIFs of a predicted case."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from mriseg import viz
from mriseg.data.case import Case
from mriseg.data.readers import case_id_from_name, read_case
from mriseg.errors import BadInputError
from mriseg.files import folder_in_place
from mriseg.inference import LoadedModel, canonical_modality
from mriseg.predict.options import PredictOptions



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
        slice_names = case.header.get("slice_names")
        with folder_in_place(planned["overlays"]) as folder:  # no overlay of an earlier run stays beside
            for index in shown:
                name = (f"{Path(slice_names[index]).stem}.png" if slice_names and len(slice_names) == count
                        else f"{case.case_id}_{index:03d}.png")
                save_picture(viz.save_png, picture(index), folder / name)
        written["overlays"] = planned["overlays"]
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
