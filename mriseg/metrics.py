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


def missing_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The surface distance given when one mask is empty: the image's diagonal in mm.

    This is the BraTS challenge's convention (373.13 mm on its 240 x 240 x 155 grid at 1 mm),
    so that a missed or invented tumour is penalised rather than left out of a mean.
    """
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))
