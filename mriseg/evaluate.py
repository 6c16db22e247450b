"""Score predicted masks against the truth: per-volume Dice, IoU, HD95, ASSD and volumes.

Overlap metrics come from voxel counts (the same formulas as ``medpy.metric``); the
surface distances come from ``medpy.metric.binary.hd95`` and ``assd``, called on a box
cropped around both masks (the distances are unchanged, the distance transform is much
cheaper) and only when both masks are non-empty: medpy raises on an empty mask and its
``dc`` returns NaN for two empty masks under NumPy 2, so empty masks follow an explicit
policy instead (see :data:`EMPTY_POLICIES`).

A case is scored over its whole volume (all slices of a patient stacked), not as a
mean over slices: a slice without tumour would otherwise weigh as much as the slice
through the tumour's centre.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mriseg.data.readers import case_id_from_name
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import refuse_output_over_inputs, write_text_atomic
from mriseg.labels import REGION_SCHEMES, Region, Task
from mriseg.metrics import dice_from_counts, iou_from_counts, missing_distance
from mriseg.log import info, progress, warn

# --- empty-mask policy ---------------------------------------------------------

EMPTY_POLICIES = {
    "score": "both empty: Dice 1, IoU 1, HD95 0, ASSD 0; exactly one empty: Dice 0, IoU 0, "
             "HD95 and ASSD the image diagonal (BraTS: 373.13 mm)",
    "ignore": "as 'score', but a region whose truth is empty is left out of every mean "
              "(MONAI's ignore_empty): false positives on tumour-free cases are not scored",
}
"""``--empty`` choices. Undefined values are written as empty CSV cells / JSON null and
are left out of means, so no ``inf`` or NaN ever reaches a summary."""

# Which rule a (case, region) fell under; the summary counts each.
NOT_EMPTY = "none"
BOTH_EMPTY = "both_empty"
PRED_EMPTY = "pred_empty"      # truth has tumour, prediction has none
TRUTH_EMPTY = "truth_empty"    # prediction has tumour, truth has none
EMPTY_RULES = (BOTH_EMPTY, PRED_EMPTY, TRUTH_EMPTY)

METRICS = ("dice", "iou", "hd95", "assd", "sensitivity", "precision", "pred_ml", "true_ml")
"""Per-region metrics, in the order of the CSV columns. Distances are in mm, volumes in mL."""


@dataclass
class MaskScores:
    """Metrics of one binary prediction against one binary truth; None means not defined."""

    dice: float | None
    iou: float | None
    hd95: float | None
    assd: float | None
    sensitivity: float | None
    precision: float | None
    pred_ml: float
    true_ml: float
    empty_rule: str


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one voxel.

    The margin keeps medpy's border extraction (an erosion with a zero border) identical,
    and every surface voxel stays inside the box, so all surface distances are unchanged.
    """
    occupied = np.nonzero(pred | truth)
    box = tuple(slice(max(int(axis.min()) - 1, 0), int(axis.max()) + 2) for axis in occupied)
    return pred[box], truth[box]


def score_masks(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                empty: str = "score") -> MaskScores:
    """Score one binary mask against another of the same shape.

    Args:
        pred, truth: boolean (or 0/non-zero) arrays of the same shape, any dimension.
        spacing: voxel size in mm per axis, so HD95 and ASSD are in mm and volumes in mL.
        empty: the empty-mask policy, a key of :data:`EMPTY_POLICIES`.
    """
    from medpy.metric.binary import assd, hd95

    if empty not in EMPTY_POLICIES:
        raise MrisegError(f"unknown empty-mask policy {empty!r}; choose one of {', '.join(EMPTY_POLICIES)}")
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"{len(spacing)} spacings given for a {pred.ndim}-D mask")

    pred_count = int(np.count_nonzero(pred))
    true_count = int(np.count_nonzero(truth))
    overlap = int(np.count_nonzero(pred & truth))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {"pred_ml": pred_count * voxel_ml, "true_ml": true_count * voxel_ml}
    sensitivity = overlap / true_count if true_count else None
    precision = overlap / pred_count if pred_count else None

    counts = (overlap, pred_count - overlap, true_count - overlap)
    if pred_count and true_count:
        pred_box, truth_box = _crop_to_union(pred, truth)
        spacing = tuple(float(s) for s in spacing)
        return MaskScores(
            dice=dice_from_counts(*counts), iou=iou_from_counts(*counts),
            hd95=float(hd95(pred_box, truth_box, voxelspacing=spacing)),
            assd=float(assd(pred_box, truth_box, voxelspacing=spacing)),
            sensitivity=sensitivity, precision=precision, empty_rule=NOT_EMPTY, **volumes)
    if not pred_count and not true_count:
        rule, dice, distance = BOTH_EMPTY, 1.0, 0.0
    else:
        rule, dice = (PRED_EMPTY if true_count else TRUTH_EMPTY), 0.0
        distance = missing_distance(pred.shape, spacing)
    if empty == "ignore" and not true_count:
        dice, distance = None, None
    return MaskScores(dice=dice, iou=dice, hd95=distance, assd=distance,
                      sensitivity=sensitivity, precision=precision, empty_rule=rule, **volumes)


# --- label schemes and regions -------------------------------------------------

REGION_CHOICES = ("auto", "binary", "labels", "brats", "brats2023", "msd")
"""``--regions`` values; a custom scheme is also accepted as ``NAME=1,2;NAME=4``."""


def parse_regions(spec: str) -> str | tuple[Region, ...]:
    """Turn a ``--regions`` value into a scheme name or a tuple of custom regions."""
    if spec in REGION_CHOICES:
        return spec
    regions = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, values = part.partition("=")
        try:
            labels = tuple(int(v) for v in values.split(",") if v.strip())
        except ValueError:
            labels = ()
        if not sep or not name.strip() or not labels:
            raise MrisegError(f"--regions {spec!r}: expected one of {', '.join(REGION_CHOICES)} "
                              "or regions like 'WT=1,2,3,4;TC=1,3,4;ET=4'")
        if name.strip() in {region.name for region in regions}:
            raise MrisegError(f"--regions {spec!r} names region {name.strip()!r} twice")
        regions.append(Region(name.strip(), labels))
    if not regions:
        raise MrisegError(f"--regions {spec!r} names no region")
    return tuple(regions)


def _require_binary(values: np.ndarray, path: Path) -> None:
    nonzero = values[values != 0]
    if nonzero.size > 1:
        listed = ", ".join(str(v) for v in nonzero[:8])
        raise BadInputError(path, f"non-binary mask: values 0, {listed} where a binary mask was "
                                  "expected; pass --regions labels, brats, msd or NAME=1,2;... to score labels")


def regions_for_case(scheme: str | tuple[Region, ...], pred: "MaskVolume",
                     truth: "MaskVolume") -> tuple[Region, ...]:
    """The regions one case is scored on under a resolved scheme (never ``auto``)."""
    if isinstance(scheme, tuple):
        return scheme
    if scheme == "labels":
        values = np.union1d(pred.values, truth.values)
        return tuple(Region(f"label_{int(v)}", (int(v),)) for v in values if v != 0)
    if scheme == "binary":
        _require_binary(truth.values, truth.path)
        _require_binary(pred.values, pred.path)
    return REGION_SCHEMES[scheme]


# --- reading masks ---------------------------------------------------------------

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_SUFFIXES = (".tif", ".tiff", ".png")


@dataclass
class MaskVolume:
    """One case's label volume as read for scoring."""

    case_id: str
    labels: np.ndarray                 # integer label values, spatial shape only
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    path: Path                         # what to name in error messages
    spacing_known: bool = True
    values: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.labels.dtype.kind == "u" and self.labels.itemsize <= 2:
            # A histogram avoids np.unique's sort of the whole volume.
            self.values = np.flatnonzero(np.bincount(self.labels.ravel()))
        else:
            self.values = np.unique(self.labels)


def _visible(folder: Path) -> list[Path]:
    """Entries not starting with a dot: temporary files of an unfinished write are hidden."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_side_output(path: Path) -> bool:
    """What ``mriseg predict`` writes beside its masks: soft maps and overlay pictures."""
    stem = case_id_from_name(path.name)
    return (path.is_dir() and path.name == "overlays") or stem.endswith("_probabilities")


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels from a stored array; floats must hold whole numbers (BraTS stores float32)."""
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind != "f":
        raise BadInputError(path, f"mask has unsupported data type {data.dtype}")
    if not np.isfinite(data).all():
        raise BadInputError(path, "mask contains NaN or infinite values")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise BadInputError(path, "mask holds non-integer values (probabilities?); threshold it first")
    if rounded.min() < 0 or rounded.max() > 65535:
        raise BadInputError(path, f"mask values outside 0..65535 ({rounded.min():g}..{rounded.max():g})")
    return rounded.astype(np.uint16)


def read_nifti_mask(path: Path, case_id: str | None = None) -> MaskVolume:
    """A NIfTI mask through the readers' one NIfTI reader (readable, voxel sizes and affine checked)."""
    from mriseg.data.readers import read_nifti

    data, affine, geometry = read_nifti(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise BadInputError(path, f"mask must be 2D or 3D, got shape {data.shape}")
    zooms = tuple(abs(float(z)) for z in geometry["zooms"][: data.ndim])
    return MaskVolume(case_id or case_id_from_name(path.name), _as_labels(data, path), zooms, affine, path)


def _read_slice(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            data = np.asarray(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError for broken files
        raise BadInputError(path, f"cannot read mask image ({error.__class__.__name__}: {error})") from error
    if data.ndim == 3:
        # RGB(A) masks saved by image editors: grey when all colour channels agree.
        if not all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, min(3, data.shape[-1]))):
            raise BadInputError(path, f"mask is a colour image of shape {data.shape}; expected a grey mask")
        data = data[..., 0]
    return _as_labels(data, path)


def _slice_number(path: Path) -> tuple[int, str]:
    """Sort key: the last integer in the name (``..._10_mask.tif`` -> 10), not the lexical order."""
    numbers = re.findall(r"\d+", path.name)
    return (int(numbers[-1]) if numbers else -1, path.name)


def read_slice_folder(folder: Path) -> MaskVolume:
    """Stack a folder of TIF/PNG mask slices along axis 0, in slice-number order."""
    files = [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES]
    masks = [p for p in files if case_id_from_name(p.name) != p.name.rsplit(".", 1)[0]]
    files = sorted(masks or files, key=_slice_number)
    if not files:
        raise BadInputError(folder, "no NIfTI, TIF or PNG mask files in this folder")
    slices = [_read_slice(p) for p in files]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise BadInputError(folder, f"mask slices have different shapes: {sorted(shapes)}")
    stacked = np.stack(slices)
    return MaskVolume(folder.name, stacked, (1.0,) * stacked.ndim, None, folder, spacing_known=False)


def read_mask(path: Path) -> MaskVolume:
    """One case's mask from a NIfTI file, a single TIF/PNG image, or a folder per case."""
    name = path.name.lower()
    if path.is_file():
        if name.endswith(NIFTI_SUFFIXES):
            return read_nifti_mask(path)
        if name.endswith(SLICE_SUFFIXES):
            labels = _read_slice(path)
            return MaskVolume(case_id_from_name(path.name), labels, (1.0,) * labels.ndim, None, path,
                              spacing_known=False)
        raise BadInputError(path, "not a mask file (expected .nii.gz, .nii, .tif, .tiff or .png)")
    niftis = [p for p in _visible(path) if p.name.lower().endswith(NIFTI_SUFFIXES) and not _is_side_output(p)]
    if len(niftis) == 1:
        return read_nifti_mask(niftis[0], case_id=path.name)
    if len(niftis) > 1:
        raise BadInputError(path, f"{len(niftis)} NIfTI files in one case folder; expected one mask (for a "
                                  "BraTS dataset named otherwise pass --modalities flair=...,seg=LABEL_NAME)")
    return read_slice_folder(path)


def find_mask_cases(root: Path) -> dict[str, Path]:
    """Case id -> mask path for a mask file or a folder of mask files / case folders."""
    if not root.exists():
        raise BadInputError(root, "no such file or folder")
    if root.is_file():
        return {case_id_from_name(root.name): root}
    cases: dict[str, Path] = {}
    for entry in _visible(root):
        if _is_side_output(entry):
            continue
        lower = entry.name.lower()
        if entry.is_dir() or lower.endswith(NIFTI_SUFFIXES + SLICE_SUFFIXES):
            case_id = case_id_from_name(entry.name) if entry.is_file() else entry.name
            if case_id in cases:
                raise BadInputError(entry, f"case id {case_id!r} also given by {cases[case_id].name}")
            cases[case_id] = entry
    if not cases:
        raise BadInputError(root, "no masks found (expected <case_id>.nii.gz files, TIF/PNG masks "
                                  "or one folder per case)")
    return cases


# --- scoring cases -----------------------------------------------------------------

@dataclass
class RegionRow:
    """One line of ``metrics.csv``: one case, one label or region."""

    case_id: str
    region: str
    scores: MaskScores

    def as_record(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "region": self.region, **asdict(self.scores)}


def _describe_affine(affine: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:g}" for v in row) for row in np.round(affine[:3], 3)) + "]"


def check_same_grid(pred: MaskVolume, truth: MaskVolume) -> None:
    """Refuse a prediction that does not lie on the truth's voxel grid."""
    if pred.labels.shape != truth.labels.shape:
        raise BadInputError(pred.path, f"case {truth.case_id}: prediction shape {pred.labels.shape} "
                                       f"differs from truth shape {truth.labels.shape} ({truth.path})")
    if pred.affine is not None and truth.affine is not None \
            and not np.allclose(pred.affine, truth.affine, atol=1e-3):
        raise BadInputError(pred.path, f"case {truth.case_id}: affine {_describe_affine(pred.affine)} differs "
                                       f"from the truth's {_describe_affine(truth.affine)} ({truth.path}); "
                                       f"both shapes {truth.labels.shape}")


def score_case(pred: MaskVolume, truth: MaskVolume, scheme: str | tuple[Region, ...],
               empty: str = "score") -> list[RegionRow]:
    """Score one case on every region of ``scheme`` (already resolved, never ``auto``).

    The spacing is the truth's; a TIF/PNG truth has none, so a NIfTI prediction's is used,
    else 1 mm per axis.
    """
    check_same_grid(pred, truth)
    spacing = truth.spacing if truth.spacing_known or not pred.spacing_known else pred.spacing
    return [RegionRow(truth.case_id, region.name,
                      score_masks(region.mask(pred.labels), region.mask(truth.labels), spacing, empty))
            for region in regions_for_case(scheme, pred, truth)]


def labels_outside(regions: Sequence[Region], pred: MaskVolume, truth: MaskVolume) -> list[int]:
    """Non-zero label values of either side that no region scores (they count as background)."""
    if any(region.labels is None for region in regions):
        return []
    covered = {value for region in regions for value in region.labels or ()}
    present = set(np.union1d(pred.values, truth.values).tolist())
    return sorted(int(v) for v in present - covered - {0})


# --- summary -------------------------------------------------------------------------

def _statistics(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "mean": float(array.mean()), "median": float(np.median(array)),
            "std": float(array.std()), "min": float(array.min()), "max": float(array.max())}


def summarise(rows: Sequence[RegionRow], empty: str, scheme: str | tuple[Region, ...],
              pred_only: Sequence[str] = (), truth_only: Sequence[str] = ()) -> dict[str, Any]:
    """``summary.json``: statistics per region and metric over defined values, and the empty-mask counts.

    ``std`` is the population standard deviation (ddof=0); ``n`` is how many cases had a defined
    value, so a reader sees at once how many were left out.
    """
    region_names = list(dict.fromkeys(row.region for row in rows))
    per_region: dict[str, Any] = {}
    for name in region_names:
        region_rows = [row for row in rows if row.region == name]
        rules = [row.scores.empty_rule for row in region_rows]
        per_region[name] = {
            "cases": len(region_rows),
            "empty": {rule: rules.count(rule) for rule in EMPTY_RULES},
            "metrics": {metric: _statistics([value for row in region_rows
                                             if (value := getattr(row.scores, metric)) is not None])
                        for metric in METRICS},
        }
    scheme_description = scheme if isinstance(scheme, str) else \
        {region.name: list(region.labels or ()) for region in scheme}
    return {
        "cases": len(dict.fromkeys(row.case_id for row in rows)),
        "regions": per_region,
        "scheme": scheme_description,
        "empty_policy": {"name": empty, "rule": EMPTY_POLICIES[empty]},
        "unmatched": {"pred_only": list(pred_only), "truth_only": list(truth_only)},
        "units": {"hd95": "mm", "assd": "mm", "pred_ml": "mL", "true_ml": "mL"},
    }


# --- writing outputs ---------------------------------------------------------------

OUTPUT_FILES = ("metrics.csv", "summary.json", "dsc.png")


def prepare_output_folder(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse, before any work is done, to replace earlier results silently."""
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise BadInputError(out, f"already holds {', '.join(existing)}; pass --overwrite to replace them")
    if out.exists() and not out.is_dir():
        raise BadInputError(out, "exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(out, f"cannot create output folder ({error.strerror})") from error


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def metrics_csv_text(rows: Sequence[RegionRow]) -> str:
    """``metrics.csv``: a row per case and region; undefined values are empty cells."""
    columns = ["case_id", "region", *METRICS, "empty_rule"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = row.as_record()
        writer.writerow({column: _csv_cell(record[column]) for column in columns})
    return buffer.getvalue()


# --- the truth side ------------------------------------------------------------------

@dataclass
class TruthSource:
    """The true label volumes, by case id, and the label scheme they imply."""

    case_ids: list[str]
    read: Callable[[str], MaskVolume]
    default_scheme: str


def scheme_for_dataset(ref: Any) -> str:
    """The ``--regions auto`` scheme of a dataset, from a reader's :class:`CaseRef`."""
    if ref.layout == "brats":
        return "brats2023" if ref.naming == "brats2023" else "brats"
    if ref.layout == "msd":
        names = " ".join(name.lower() for value, name in ref.label_names if value)
        if "enhanc" in names:
            return "msd"
        return "binary" if len([value for value, _ in ref.label_names if value]) <= 1 else "labels"
    return "binary"


def read_reference_labels(ref: Any) -> MaskVolume:
    """Only the label files of a reader's case: no need to decode four modalities to score."""
    if ref.layout == "lgg":
        slices = [_read_slice(path) for path in ref.label_paths]
        stacked = np.stack(slices)
        return MaskVolume(ref.case_id, stacked, (1.0,) * stacked.ndim, None, ref.label_paths[0].parent,
                          spacing_known=False)
    mask = read_mask(ref.label_paths[0])
    mask.case_id = ref.case_id
    return mask


def open_truth(root: Path, modalities: str | None = None) -> TruthSource:
    """The truth at ``root``: a labelled dataset the readers know, else mask files.

    ``modalities`` is the readers' BraTS file-name map (``seg=OTMultiClass,...``) for datasets
    whose files are not named like BraTS's.

    A folder of bare masks (``<case_id>.nii.gz``, TIF/PNG masks, a folder per case holding
    one mask) is not a dataset to the readers, so their refusal sends us to the mask files.
    """
    from mriseg.data.readers import list_cases

    try:
        refs = list_cases(root, modalities=modalities)
    except MrisegError as dataset_error:
        try:
            cases = find_mask_cases(root)
        except MrisegError as masks_error:
            raise MrisegError(f"{root}: neither a labelled dataset ({dataset_error}) nor a folder of masks "
                              f"({masks_error})") from masks_error
        return TruthSource(sorted(cases), lambda case_id: read_mask(cases[case_id]), "binary")
    labelled = {ref.case_id: ref for ref in refs if ref.has_label}
    if not labelled:
        raise BadInputError(root, f"a {refs[0].layout} dataset without labels: nothing to score against")
    if len(labelled) < len(refs):
        warn(f"{len(refs) - len(labelled)} case(s) in {root} have no label and are not scored")
    return TruthSource(sorted(labelled), lambda case_id: read_reference_labels(labelled[case_id]),
                       scheme_for_dataset(next(iter(labelled.values()))))


# --- the command ---------------------------------------------------------------------

@dataclass
class EvaluationResult:
    """What ``evaluate`` computed and wrote."""

    rows: list[RegionRow]
    summary: dict[str, Any]
    plot: dict[str, Any]          # region -> viz.DiceBars, the data the bar plot drew
    out: Path


def match_case_ids(pred_ids: Iterable[str], truth_ids: Iterable[str],
                   strict: bool) -> tuple[list[str], list[str], list[str]]:
    """(matched, only in predictions, only in truth); unmatched ids are listed, or an error if ``strict``."""
    pred_set, truth_set = set(pred_ids), set(truth_ids)
    matched = sorted(pred_set & truth_set)
    pred_only, truth_only = sorted(pred_set - truth_set), sorted(truth_set - pred_set)
    for side, ids in (("predictions without truth", pred_only), ("truth without prediction", truth_only)):
        if ids:
            message = f"{len(ids)} {side}: {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}"
            if strict:
                raise MrisegError(f"--strict: {message}")
            warn(message)
    if not matched:
        raise MrisegError(f"no case id in common; predictions: {', '.join(sorted(pred_set)[:5]) or 'none'}; "
                          f"truth: {', '.join(sorted(truth_set)[:5]) or 'none'}")
    return matched, pred_only, truth_only


def score_and_report(pairs: Iterable[tuple[MaskVolume, MaskVolume]], total: int,
                     scheme: str | tuple[Region, ...], empty: str, out: Path,
                     pred_only: Sequence[str] = (), truth_only: Sequence[str] = ()) -> EvaluationResult:
    """Score (prediction, truth) pairs and write metrics.csv, summary.json and dsc.png into ``out``."""
    from mriseg.viz import plot_dice_bars

    rows: list[RegionRow] = []
    assumed_spacing: list[str] = []
    unscored: dict[int, list[str]] = {}
    for pred, truth in progress(pairs, total=total, description="scoring"):
        if not truth.spacing_known and not pred.spacing_known:
            assumed_spacing.append(truth.case_id)
        rows.extend(score_case(pred, truth, scheme, empty))
        for value in labels_outside(regions_for_case(scheme, pred, truth), pred, truth):
            unscored.setdefault(value, []).append(truth.case_id)
    for value, cases in sorted(unscored.items()):
        warn(f"label {value} is in no scored region ({len(cases)} case(s), e.g. {cases[0]}): it counts as "
             "background; pass --regions to score it")
    if assumed_spacing:
        warn(f"no voxel spacing in the TIF/PNG masks of {len(assumed_spacing)} case(s); 1 mm per axis "
             "assumed, so HD95/ASSD are in voxels and volumes in 1 mm^3 units")
    summary = summarise(rows, empty, scheme, pred_only, truth_only)
    dice_by_region: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.scores.dice is not None:
            dice_by_region.setdefault(row.region, {})[row.case_id] = row.scores.dice
    write_text_atomic(out / "metrics.csv", metrics_csv_text(rows))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot = plot_dice_bars(dice_by_region, out / "dsc.png") if dice_by_region else {}
    if not plot:
        warn("no case has a defined Dice, so dsc.png was not drawn")
    return EvaluationResult(rows=rows, summary=summary, plot=plot, out=out)


def evaluate(pred: Path, truth: Path, out: Path, regions: str = "auto", empty: str = "score",
             strict: bool = False, overwrite: bool = False, modalities: str | None = None) -> EvaluationResult:
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
    """
    if empty not in EMPTY_POLICIES:
        raise MrisegError(f"--empty {empty!r}: choose one of {', '.join(EMPTY_POLICIES)}")
    scheme = parse_regions(regions)
    pred_cases = find_mask_cases(pred)
    truth_source = open_truth(truth, modalities)
    refuse_output_over_inputs(out, [pred, truth], nested=False)
    matched, pred_only, truth_only = match_case_ids(pred_cases, truth_source.case_ids, strict)
    if scheme == "auto":
        scheme = truth_source.default_scheme
        info(f"label scheme: {scheme} (from the truth; change with --regions)")
    prepare_output_folder(out, overwrite)
    pairs = ((read_mask(pred_cases[case_id]), truth_source.read(case_id)) for case_id in matched)
    return score_and_report(pairs, len(matched), scheme, empty, out, pred_only, truth_only)


def results_table(result: EvaluationResult) -> Any:
    """A rich table for the terminal: a line per case and region, then mean and median per region."""
    from rich import box
    from rich.table import Table

    def cell(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    table = Table(title=f"per-volume metrics ({result.summary['cases']} cases)", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False)
    # IoU, sensitivity and precision stay in metrics.csv: the table must fit an 80-column log.
    longest_id = max((len(row.case_id) for row in result.rows), default=4)
    table.add_column("case", no_wrap=True, min_width=min(longest_id, 40))
    table.add_column("region", no_wrap=True)
    for heading in ("Dice", "HD95mm", "ASSDmm", "pred mL", "true mL"):
        table.add_column(heading, justify="right", no_wrap=True)
    any_empty = any(row.scores.empty_rule != NOT_EMPTY for row in result.rows)
    if any_empty:
        table.add_column("empty", overflow="fold")
    for row in result.rows:
        s = row.scores
        note = ["" if s.empty_rule == NOT_EMPTY else s.empty_rule] if any_empty else []
        table.add_row(row.case_id, row.region, cell(s.dice), cell(s.hd95, 2), cell(s.assd, 2),
                      cell(s.pred_ml, 2), cell(s.true_ml, 2), *note)
    table.add_section()
    for region, report in result.summary["regions"].items():
        counts = ", ".join(f"{n} {rule}" for rule, n in report["empty"].items() if n)
        for statistic in ("mean", "median"):
            values = {metric: report["metrics"][metric][statistic] for metric in METRICS}
            note = [counts if statistic == "mean" else ""] if any_empty else []
            table.add_row(statistic, region, cell(values["dice"]), cell(values["hd95"], 2),
                          cell(values["assd"], 2), cell(values["pred_ml"], 2), cell(values["true_ml"], 2),
                          *note, style="bold")
    return table


# --- predicting in memory (--model) ------------------------------------------------------

def scheme_from_task(task: Task) -> tuple[Region, ...] | None:
    """The regions a model's outputs mean: a ``regions`` task's regions, or any task's own regions
    when its labels were remapped (the dataset's scheme no longer describes them); else None."""
    if task.kind == "regions":
        return task.regions
    return task.scored_regions() if task.label_map else None


def evaluate_model(model: Path, data: Path, out: Path, regions: str = "auto", empty: str = "score",
                   overwrite: bool = False, modalities: str | None = None, device: str = "auto",
                   batch_size: int = 8, tta: bool = False, largest_component: bool = False,
                   interpolation: str = "linear") -> EvaluationResult:
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
    settings = InferenceSettings(batch_size=batch_size, tta=tta, interpolation=interpolation)
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
            if largest_component:
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

    return score_and_report(pairs(), len(labelled), scheme, empty, out)
