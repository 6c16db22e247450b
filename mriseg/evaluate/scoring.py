"""Scoring one case: the empty-mask policy, per-mask metrics, regions and label schemes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mriseg.errors import BadInputError, MrisegError
from mriseg.labels import REGION_SCHEMES, Region
from mriseg.metrics import dice_from_counts, hd95_and_assd, iou_from_counts, missing_distance
from mriseg.evaluate.masks import MaskVolume



EMPTY_POLICIES = {
    "score": "both empty: Dice 1, IoU 1, HD95 0, ASSD 0; exactly one empty: Dice 0, IoU 0, "
             "HD95 and ASSD the image diagonal (BraTS: 373.13 mm)",
    "ignore": "as 'score', but a region whose truth is empty is left out of every mean "
              "(MONAI's ignore_empty): false positives on tumour-free cases are not scored",
    "nan": "nnU-Net's: both empty -> every metric undefined (NaN there), left out of the mean; exactly one "
           "empty: Dice 0, IoU 0, HD95 and ASSD the image diagonal; means equal nnU-Net's nanmean",
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
        hd95, assd = hd95_and_assd(pred_box, truth_box, spacing)
        return MaskScores(
            dice=dice_from_counts(*counts), iou=iou_from_counts(*counts), hd95=hd95, assd=assd,
            sensitivity=sensitivity, precision=precision, empty_rule=NOT_EMPTY, **volumes)
    if not pred_count and not true_count:
        rule, dice, distance = BOTH_EMPTY, 1.0, 0.0
    else:
        rule, dice = (PRED_EMPTY if true_count else TRUTH_EMPTY), 0.0
        distance = missing_distance(pred.shape, spacing)
    if (empty == "ignore" and not true_count) or (empty == "nan" and rule == BOTH_EMPTY):
        dice, distance = None, None
    return MaskScores(dice=dice, iou=dice, hd95=distance, assd=distance,
                      sensitivity=sensitivity, precision=precision, empty_rule=rule, **volumes)



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
        if any(not 0 < label <= 65535 for label in labels):
            raise MrisegError(f"--regions {spec!r}: region {name.strip()!r} takes label values 1 to 65535 "
                              f"(0 is background), got {list(labels)}")
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
