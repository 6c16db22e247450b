"""``mriseg evaluate``: score predicted masks against the truth: per-volume Dice, IoU, HD95, ASSD and volumes.

Overlap metrics come from voxel counts (the same formulas as ``medpy.metric``); HD95 and ASSD
come from one pair of distance transforms per region (:func:`mriseg.metrics.hd95_and_assd`,
medpy's definitions; the tests compare it with medpy), computed on a box cropped around both
masks (the distances are unchanged, the transform is much cheaper) and only when both masks are
non-empty (one empty mask gets the image diagonal, the BraTS convention). Empty masks follow an
explicit policy (see :data:`EMPTY_POLICIES`). ``--workers N`` reads and scores N cases at once.

A case is scored over its whole volume (all slices of a patient stacked), not as a
mean over slices: a slice without tumour would otherwise weigh as much as the slice
through the tumour's centre.

Modules: ``scoring.py`` (one case: metrics, empty-mask policy, regions), ``masks.py`` (reading
masks and a dataset's truth), ``report.py`` (summary, CSV, JSON, plot, table), ``run.py`` (the
command as functions: :func:`evaluate`, :func:`evaluate_model`).
"""

from mriseg.evaluate.masks import MaskVolume, find_mask_cases, open_truth, read_mask, scheme_for_dataset
from mriseg.evaluate.report import EvaluationResult, results_table, score_and_report, summarise
from mriseg.evaluate.run import evaluate, evaluate_model, scheme_from_task
from mriseg.evaluate.scoring import (BOTH_EMPTY, EMPTY_POLICIES, METRICS, NOT_EMPTY, PRED_EMPTY, TRUTH_EMPTY,
                                     MaskScores, parse_regions, score_case, score_masks)
from mriseg.labels import REGION_SCHEMES

__all__ = ["BOTH_EMPTY", "EMPTY_POLICIES", "METRICS", "NOT_EMPTY", "PRED_EMPTY", "REGION_SCHEMES", "TRUTH_EMPTY",
           "EvaluationResult", "MaskScores", "MaskVolume", "evaluate", "evaluate_model", "find_mask_cases",
           "open_truth", "parse_regions", "read_mask", "results_table", "scheme_for_dataset", "scheme_from_task",
           "score_and_report", "score_case", "score_masks", "summarise"]
