"""The report: summary statistics, metrics.csv, summary.json, the Dice bar plot and the terminal table."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mriseg.errors import BadInputError, MrisegError
from mriseg.files import write_text_atomic
from mriseg.labels import Region
from mriseg.log import progress, warn
from mriseg.evaluate.masks import MaskVolume, without_ignored
from mriseg.evaluate.scoring import (EMPTY_POLICIES, EMPTY_RULES, METRICS, NOT_EMPTY, RegionRow, check_same_grid,
                                     labels_outside, regions_for_case, score_case)



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


PairLoader = Callable[[], tuple[MaskVolume, MaskVolume]]
"""Reads (or predicts) one case's (prediction, truth) when called, so workers can load in parallel."""


@dataclass
class _CaseResult:
    case_id: str
    rows: list[RegionRow]
    unscored: list[int]          # non-zero labels no region covers
    spacing_assumed: bool
    pred_values: set[int]
    truth_values: set[int]


def _score_one(load: PairLoader, scheme: str | tuple[Region, ...], empty: str) -> _CaseResult:
    pred, truth = load()
    check_same_grid(pred, truth)
    pred, truth = without_ignored(pred, truth)
    return _CaseResult(truth.case_id, score_case(pred, truth, scheme, empty),
                       labels_outside(regions_for_case(scheme, pred, truth), pred, truth),
                       not truth.spacing_known and not pred.spacing_known,
                       set(np.asarray(pred.values).tolist()), set(np.asarray(truth.values).tolist()))


def _scored_cases(loaders: Iterable[PairLoader], scheme: str | tuple[Region, ...], empty: str,
                  workers: int) -> Iterator[_CaseResult]:
    """Each case's result in input order; with workers > 1, cases are read and scored in threads
    (NIfTI decoding and the distance transforms release the GIL). Only the small results are kept."""
    if workers <= 1:
        yield from (_score_one(load, scheme, empty) for load in loaders)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda load: _score_one(load, scheme, empty), loaders)


def score_and_report(loaders: Iterable[PairLoader], total: int,
                     scheme: str | tuple[Region, ...], empty: str, out: Path,
                     pred_only: Sequence[str] = (), truth_only: Sequence[str] = (),
                     workers: int = 1) -> EvaluationResult:
    """Score (prediction, truth) pairs and write metrics.csv, summary.json and dsc.png into ``out``."""
    from mriseg.viz import plot_dice_bars

    rows: list[RegionRow] = []
    assumed_spacing: list[str] = []
    unscored: dict[int, list[str]] = {}
    pred_values: set[int] = set()
    truth_values: set[int] = set()
    for result in progress(_scored_cases(loaders, scheme, empty, workers), total=total,
                           description="scoring"):
        case_id = result.case_id
        if result.spacing_assumed:
            assumed_spacing.append(case_id)
        rows.extend(result.rows)
        pred_values |= result.pred_values
        truth_values |= result.truth_values
        for value in result.unscored:
            unscored.setdefault(value, []).append(case_id)
    for value, cases in sorted(unscored.items()):
        warn(f"label {value} is in no scored region ({len(cases)} case(s), e.g. {cases[0]}): it counts as "
             "background; pass --regions to score it")
    warn_other_convention(pred_values, truth_values)
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


def warn_other_convention(pred_values: set[int], truth_values: set[int]) -> None:
    """Labels only the predictions use beside labels only the truth uses, over all cases, are the
    mark of two label conventions (BraTS 2023 numbers enhancing tumour 3, BraTS 2021 4): the
    scores are then of mismatched regions, which no single number shows."""
    only_pred, only_truth = sorted(pred_values - truth_values - {0}), sorted(truth_values - pred_values - {0})
    if only_pred and only_truth:
        warn(f"the predictions use labels {only_pred} that no truth case has, and the truth {only_truth} that "
             "no prediction has: different label conventions? (BraTS 2023 numbers enhancing tumour 3, BraTS "
             "2013-2021 4); map the labels or pass --regions")


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
