"""Overlap counts and the scores made from them, shared by training's validation and ``evaluate``.

The formulas are nnU-Net's (``compute_tp_fp_fn_tn``, ``Dice = 2 TP / (2 TP + FP + FN)``,
``IoU = TP / (TP + FP + FN)``); a test checks them against an independent computation.
Both masks empty is a perfect score (nothing to find, nothing found).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BRATS_SHAPE_MM = (240.0, 240.0, 155.0)


def confusion(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> tuple[int, int, int]:
    """(TP, FP, FN) of two boolean masks, counting only ``valid`` voxels when given."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def dice(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    return dice_from_counts(*confusion(pred, truth, valid))


def surface_distances(pred: np.ndarray, truth: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the other's surface, both ways.

    A surface voxel is a mask voxel with a face neighbour outside the mask (erosion with the
    face-connected structure and a zero border, as medpy's ``__surface_distances``). Both masks
    must be non-empty. Returns ``(pred -> truth, truth -> pred)``; HD95 and ASSD are both read off
    this one pair of distance transforms.
    """
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_surface = pred & ~ndimage.binary_erosion(pred, structure=structure, border_value=0)
    truth_surface = truth & ~ndimage.binary_erosion(truth, structure=structure, border_value=0)
    sampling = tuple(float(s) for s in spacing)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_truth[pred_surface], to_pred[truth_surface]


def hd95_and_assd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """HD95 and ASSD of two non-empty boolean masks, in mm, both over the pooled distances of the
    two directions (medpy >= 0.5's definitions): the 95th percentile and the mean."""
    pooled = np.concatenate(surface_distances(pred, truth, spacing))
    return float(np.percentile(pooled, 95)), float(pooled.mean())


def missing_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The surface distance given when one mask is empty: the image's diagonal in mm.

    This is the BraTS challenge's convention (373.13 mm on its 240 x 240 x 155 grid at 1 mm),
    so that a missed or invented tumour is penalised rather than left out of a mean.
    """
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))
