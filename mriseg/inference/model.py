"""A checkpoint ready to predict: finding it, rebuilding its network, matching a case's channels.

Shared by ``predict`` and ``evaluate --model`` (neither command imports the other).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from skimage.measure import label as connected_components

from mriseg.checkpoint import fold_folders, fold_index, load_checkpoint, model_from_checkpoint
from mriseg.data.case import Case
from mriseg.data.preprocess import PreprocessParams
from mriseg.devices import choose_device
from mriseg.errors import BadInputError, MrisegError
from mriseg.inference.engine import CasePrediction, InferenceSettings, Member, predict_ensemble_case
from mriseg.labels import Task
from mriseg.log import info, warn

DEFAULT_RUN = Path("runs") / "latest"
# Different datasets name the same sequence differently (BraTS 2021 vs 2023, MSD, LGG).
MODALITY_ALIASES = {"t1c": "t1ce", "t1gd": "t1ce", "t1-gd": "t1ce", "t1n": "t1", "t1w": "t1",
                    "t2w": "t2", "t2f": "flair", "t2-flair": "flair"}
GENERIC_CHANNEL_NAME = re.compile(r"^(channel\d+|image)$")


@dataclass
class LoadedModel:
    """A checkpoint and its network, ready to predict; with ``others``, the first model of an
    ensemble (its records describe them all: :func:`check_ensemble`)."""

    path: Path
    checkpoint: dict
    network: torch.nn.Module
    device: torch.device
    others: tuple["LoadedModel", ...] = ()
    unnamed_channels_said: bool = False     # the channel-order assumption is said once per model
    largest_component: bool = False         # a folder of folds: the post-processing its CV chose

    @property
    def members(self) -> list["LoadedModel"]:
        return [self, *self.others]

    @property
    def spatial_dims(self) -> int:
        return int(self.checkpoint["model"]["spatial_dims"])

    @cached_property
    def params(self) -> PreprocessParams:
        try:
            return PreprocessParams.from_dict(self.checkpoint.get("preprocess") or {})
        except (MrisegError, TypeError, ValueError) as error:
            raise BadInputError(self.path, f"checkpoint preprocess record is malformed: {error}") from None

    @cached_property
    def task(self) -> Task:
        try:
            return Task.from_dict(self.checkpoint["task"], label_map=self.params.label_map)
        except MrisegError as error:
            raise BadInputError(self.path, f"checkpoint {error}") from None

    @property
    def modalities(self) -> list[str]:
        return list(self.checkpoint.get("modalities") or [])

    @property
    def in_channels(self) -> int:
        return int(self.checkpoint["model"]["in_channels"])

    @property
    def context(self) -> int:
        """Neighbouring slices on each side a 2.5D model sees (0: plain 2D or 3D)."""
        return int(self.checkpoint["model"].get("context", 0))

    @property
    def image_channels(self) -> int:
        """Channels of the image the model reads (its input channels without the 2.5D neighbours)."""
        return self.in_channels // (2 * self.context + 1)

    @property
    def patch_size(self) -> tuple[int, ...] | None:
        """The 3D training patch (None: training saw whole volumes, so inference does too)."""
        patch = self.checkpoint.get("patch_size")
        return tuple(int(p) for p in patch) if patch else None

    @property
    def label_names(self) -> dict[int, str]:
        """Names of the label values written (for overlay legends), background left out."""
        task = self.task
        if task.kind == "multiclass":
            names = dict(zip(task.labels, task.channel_names))
        else:
            names = (self.checkpoint.get("label_info") or {}).get("names") or {}
        return {int(value): str(name) for value, name in names.items() if int(value) != 0}

    def predict(self, case: Case, settings: InferenceSettings, threshold: float | None = None) -> CasePrediction:
        """The case's channels matched to the checkpoint's, then :func:`~mriseg.inference.predict_case`
        (with the training patch unless ``settings`` names one, and ``threshold`` if given)."""
        selected = select_modalities(case, self.modalities, self.image_channels)
        if self.modalities and not self.unnamed_channels_said and selected.modalities != list(case.modalities):
            if len(case.modalities) > 1 and all(GENERIC_CHANNEL_NAME.match(name) for name in case.modalities):
                self.unnamed_channels_said = True
                warn(f"{case.source_paths[0] if case.source_paths else case.case_id}: its channels have no "
                     f"names (no dataset.json or modality names), so they are taken in the model's order: "
                     f"{', '.join(self.modalities)}; name them (dataset.json, --modalities) if that is wrong")
        task = self.task if threshold is None else replace(self.task, threshold=threshold)
        members = [Member(m.network, m.spatial_dims, m.settings_for(settings)) for m in self.members]
        return predict_ensemble_case(selected, members, task, self.params, settings.interpolation)

    def settings_for(self, settings: InferenceSettings) -> InferenceSettings:
        """``settings`` with this model's training patch unless they name one."""
        if settings.patch_size is None and self.patch_size is not None:
            return replace(settings, patch_size=self.patch_size)
        return settings


def resolve_model_path(model: str | Path | None) -> Path:
    """The checkpoint to use: ``model`` (a .pt file or run folder), else ``$MRISEG_MODEL``,
    else ``runs/latest``. Prints which default was taken."""
    path = Path(model) if model is not None else default_model()
    if path.is_dir():
        if (path / "best.pt").is_file():
            return path / "best.pt"
        if (path / "last.pt").is_file() and trained_without_validation(path):
            info(f"model: {path / 'last.pt'} (the run trained on every case without validation)")
            return path / "last.pt"
        raise BadInputError(path, "run folder has no best.pt (did training finish an epoch?)")
    return path


def default_model() -> Path:
    """``$MRISEG_MODEL``, else ``runs/latest``; says which it took."""
    from_env = os.environ.get("MRISEG_MODEL")
    if from_env:
        info(f"model: {from_env} (from $MRISEG_MODEL)")
        return Path(from_env)
    if not DEFAULT_RUN.exists():
        raise MrisegError(f"no model given, $MRISEG_MODEL is not set and {DEFAULT_RUN}/ does not exist: "
                          "train one with `mriseg train`, or run `mriseg demo` for a small one, "
                          "then pass --model RUN_DIR_OR_CHECKPOINT")
    info(f"model: {DEFAULT_RUN} (default: the newest run)")
    return DEFAULT_RUN


def trained_without_validation(run_dir: Path) -> bool:
    """Whether the run's config.json lists no validation case (``train --val-fraction 0``)."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get("val_cases") == []
    except (OSError, ValueError, AttributeError):
        return False


def model_paths(model: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The checkpoints of ``model``: one (:func:`resolve_model_path`), or several for an ensemble:
    a list of run folders / .pt files, or a folder of folds (``train --folds``: ``fold_*/``)."""
    entries = [default_model()] if model is None else [model] if isinstance(model, (str, Path)) else list(model)
    if not entries:
        raise MrisegError("no model given")
    paths = []
    for entry in entries:
        folds = fold_runs(Path(entry))
        if folds:
            info(f"model: {entry}: {len(folds)} folds ({', '.join(f.name for f in folds)})")
        paths.extend(resolve_model_path(run) for run in (folds or [entry]))
    return paths


def fold_runs(folder: Path) -> list[Path]:
    """The fold runs of a cross-validation folder (it holds no checkpoint of its own), in fold order."""
    if not folder.is_dir() or (folder / "best.pt").exists() or (folder / "last.pt").exists():
        return []
    runs = fold_folders(folder)
    counts = {run.name: fold_total(run) for run in runs}
    known = {count for count in counts.values() if count is not None}
    stale = [run.name for run in runs if counts[run.name] is not None and fold_index(run) >= counts[run.name]]
    if len(known) > 1 or stale:
        described = ", ".join(f"{name}: {count}-fold" for name, count in counts.items())
        raise BadInputError(folder, f"holds folds of different cross-validations ({described}); remove the stale "
                                    "ones or name the runs with --model")
    missing = sorted(set(range(next(iter(known)))) - {fold_index(run) for run in runs}) if known else []
    if missing:  # an ensemble of the folds present is a smaller model than the user trained for
        warn(f"{folder}: a {next(iter(known))}-fold cross-validation with fold(s) {missing} missing; "
             f"predicting with the {len(runs)} present")
    return runs


def fold_total(run_dir: Path) -> int | None:
    """The K of the cross-validation a fold run belongs to (config.json), None when unknown."""
    try:
        folds = json.loads((run_dir / "config.json").read_text())["options"].get("folds")
        return int(folds) if folds else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def load_model(model: str | Path | Sequence[str | Path] | None, device: str = "auto") -> LoadedModel:
    """Find, read, check and rebuild the model, or the models of an ensemble (see :func:`model_paths`)."""
    target = choose_device(device)
    loaded = []
    for path in model_paths(model):
        checkpoint = load_checkpoint(path)
        network = model_from_checkpoint(checkpoint).to(target).eval()
        loaded.append(LoadedModel(path=path, checkpoint=checkpoint, network=network, device=target))
        check_records(loaded[-1])
    if len(loaded) > 1:
        check_ensemble(loaded)
        info(f"ensemble of {len(loaded)} models: {', '.join(str(m.path) for m in loaded)}")
    return replace(loaded[0], others=tuple(loaded[1:]), largest_component=chosen_postprocessing(model))


POSTPROCESSING_FILE = "postprocessing.json"
"""Written by ``train --folds K`` beside the folds: whether keeping the largest tumour component
raised the cross-validated Dice (:mod:`mriseg.train.postprocess`)."""


def chosen_postprocessing(model: str | Path | Sequence[str | Path] | None) -> bool:
    """Whether a folder of folds' cross-validation chose to keep the largest component (said once)."""
    if isinstance(model, Sequence) and not isinstance(model, str) and len(model) == 1:
        model = model[0]
    if model is None:  # runs/latest (or $MRISEG_MODEL) may be a folder of folds
        model = Path(os.environ.get("MRISEG_MODEL") or DEFAULT_RUN)
    if not isinstance(model, (str, Path)) or not (Path(model) / POSTPROCESSING_FILE).is_file():
        return False
    path = Path(model) / POSTPROCESSING_FILE
    try:
        keep = json.loads(path.read_text())["largest_component"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(path, f"not a post-processing decision with a largest_component field ({error})") from None
    if not isinstance(keep, bool):
        raise BadInputError(path, f"largest_component must be true or false, got {keep!r}")
    if keep:
        info(f"post-processing: keeping the largest tumour component, as the cross-validation chose ({path}; "
             "--no-largest-component to skip)")
    return keep


def check_ensemble(models: list[LoadedModel]) -> None:
    """Members must share what decides the input and the output: preprocessing, modalities, task."""
    first = models[0]
    for other in models[1:]:
        for name, mine, theirs in (("preprocessing", first.checkpoint.get("preprocess"),
                                    other.checkpoint.get("preprocess")),
                                   ("modalities", first.modalities, other.modalities),
                                   ("image channels", first.image_channels, other.image_channels),
                                   ("task", first.checkpoint.get("task"), other.checkpoint.get("task"))):
            if mine != theirs:
                raise BadInputError(other.path, f"cannot join an ensemble with {first.path}: its {name} differ "
                                                f"({theirs!r} vs {mine!r})")


def check_records(loaded: LoadedModel) -> None:
    """Validate the checkpoint's own records before any input is read (a damaged or hand-edited
    checkpoint is one line naming the file and the field, not a failure per case)."""
    path, checkpoint = loaded.path, loaded.checkpoint
    loaded.params, loaded.task  # noqa: B018 - each names its own malformed field
    modalities = checkpoint.get("modalities") or []
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise BadInputError(path, f"checkpoint modalities {modalities!r} are not a list of names")
    if loaded.in_channels % (2 * loaded.context + 1):
        raise BadInputError(path, f"checkpoint model has {loaded.in_channels} input channels, not a multiple of "
                                  f"{2 * loaded.context + 1} slices (context {loaded.context})")
    if modalities and len(modalities) != loaded.image_channels:
        raise BadInputError(path, f"checkpoint names {len(modalities)} modalities for {loaded.image_channels} "
                                  "image channels")
    patch = checkpoint.get("patch_size") or []
    if not isinstance(patch, list) or not all(isinstance(p, int) and p > 0 for p in patch) \
            or len(patch) not in (0, loaded.spatial_dims):
        raise BadInputError(path, f"checkpoint patch_size {patch!r} is not {loaded.spatial_dims} sizes")
    if loaded.task.out_channels != int(checkpoint["model"]["out_channels"]):
        raise BadInputError(path, f"checkpoint task has {loaded.task.out_channels} output channels, the model "
                                  f"{checkpoint['model']['out_channels']}")


def canonical_modality(name: str) -> str:
    name = name.strip().lower()
    return MODALITY_ALIASES.get(name, name)


def select_modalities(case: Case, expected: list[str], in_channels: int) -> Case:
    """Reorder (and pick) the case's channels to the checkpoint's modality order.

    Names are compared case-insensitively after mapping common aliases (t1c = t1ce, t2f = flair,
    ...). A file without modality names (a plain NIfTI or image) is used as is when its channel
    count fits.
    """
    source = case.source_paths[0] if case.source_paths else Path(case.case_id)
    names = [canonical_modality(name) for name in case.modalities]
    wanted = [canonical_modality(name) for name in expected]
    if wanted and all(name in names for name in wanted):
        image = case.image[[names.index(name) for name in wanted]]
    elif case.image.shape[0] == in_channels and (not wanted or all(GENERIC_CHANNEL_NAME.match(n) for n in names)):
        image = case.image
    else:
        missing = [name for name in wanted if name not in names]
        needed = f"modalities {', '.join(expected)}" if expected else f"{in_channels} channels"
        raise BadInputError(source, f"the model needs {needed}; this input has {', '.join(case.modalities)}"
                                    + (f" (missing {', '.join(missing)})" if missing else ""))
    return replace(case, image=image, modalities=list(expected) or list(case.modalities))


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest face-connected blob of tumour (all labels together).

    The reference program cleans each predicted volume this way: a brain tumour is one lesion,
    so small detached blobs are taken as false positives.
    """
    components, count = connected_components(labels > 0, connectivity=1, return_num=True)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == np.argmax(sizes), labels, 0).astype(labels.dtype)


def tumour_volume_ml(labels: np.ndarray, spacing) -> float:
    """Volume of all non-zero voxels in millilitres (voxel sizes in mm)."""
    return float(np.count_nonzero(labels) * np.prod(spacing) / 1000.0)
