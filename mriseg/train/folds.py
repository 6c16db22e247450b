"""Cross-validation: ``--folds K`` (or a ``--split`` file listing folds) trains one run per fold.

The run folder ``--out`` then holds ``fold_0`` ... ``fold_{K-1}``, one complete run each, and a
``summary.json`` over them; ``predict`` and ``evaluate --model`` take that folder as an ensemble
of its folds. ``--fold k`` trains fold ``k`` only (one task of a Slurm array or one torchrun job
per fold, all writing into the same ``--out``); without it the folds train one after another,
with ``--time`` shared out evenly among the folds still to train.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from mriseg.checkpoint import fold_folder, fold_folders
from mriseg.errors import BadInputError, MrisegError
from mriseg.files import write_json_atomic
from mriseg.log import info
from mriseg.train.postprocess import decide_postprocessing
from mriseg.train.run_folder import point_latest_at, read_run_config, resolve_run_dir

def folds_folder(out: str | Path | None, model: str, resume: bool) -> Path:
    """The folder of folds: ``--out``, else ``runs/latest`` (resuming) or ``runs/<model>-<timestamp>``."""
    if out is not None:
        return Path(out)
    return resolve_run_dir(None, model, resume, overwrite=False)


def fold_count(settings: dict[str, Any], out: str | Path | None = None, resume: bool = False) -> int | None:
    """K when the run is a cross-validation (``folds``, a split file holding a list of folds, or
    ``--resume`` of a folder of folds), else None."""
    count, listed = None, None
    if settings.get("split"):
        try:
            document = json.loads(Path(settings["split"]).read_text())
        except (OSError, ValueError) as error:
            raise BadInputError(settings["split"], f"not a readable split file ({error})") from error
        listed = count = len(document) if isinstance(document, list) and document else None
        if settings.get("folds") and listed is None:
            raise MrisegError("--folds K splits the cases itself; it cannot be combined with a --split file "
                              "of one train/val split")
    resumed = Path(out) if out is not None else Path("runs") / "latest"
    if settings.get("folds"):
        count = int(settings["folds"])
    elif resume and listed is None and (fold_folder(resumed, 0) / "config.json").is_file():
        saved = json.loads((fold_folder(resumed, 0) / "config.json").read_text()).get("options", {})
        count = int(saved.get("folds") or len(fold_folders(resumed)))
    if "fold" in settings and count is None:
        raise MrisegError(f"--fold {settings['fold']} needs --folds K (K-fold cross-validation by patient) or a "
                          "--split file with a list of folds (nnU-Net's splits_final.json)")
    if "fold" in settings and out is None and not resume:
        raise MrisegError(f"--fold {settings['fold']} needs --out: the folder every fold of the cross-validation "
                          "writes into")
    return count


def train_all_folds(single_run: Callable[..., dict[str, Any]], count: int, data: Any, model: str | None,
                    out: Path, resume: bool, overwrite: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """Train folds 0..K-1 in turn with ``single_run`` (:func:`mriseg.train.loop.train`); a summary of all.

    ``--resume`` continues the folds that have a last.pt and starts the others.
    """
    started = time.monotonic()
    budget = settings.get("time_limit")
    if resume and data is None:  # a fold that starts afresh must train on the folds' data, not the default
        data = saved_fold_data(out, count)
    point_latest_at(out)  # before the first fold: an interrupted cross-validation resumes from runs/latest
    summaries = []
    for fold in range(count):
        folder = fold_folder(out, fold)
        if resume and (folder / "summary.json").is_file():  # finished: keep it as it is
            info(f"cross-validation: fold {fold + 1} of {count} is done ({folder})")
            summaries.append({"fold": fold, "run": str(folder), **json.loads((folder / "summary.json").read_text())})
            continue
        fold_settings = {**settings, "fold": fold}
        if budget is not None:
            fold_settings["time_limit"] = max((budget - (time.monotonic() - started)) / (count - fold), 1.0)
        resume_this = resume and (folder / "last.pt").is_file()
        info(f"cross-validation: fold {fold + 1} of {count}")
        # resuming, a fold that never wrote last.pt starts again in its folder
        summary = single_run(data, model=model, out=out, resume=resume_this,
                             overwrite=overwrite or (resume and not resume_this), **fold_settings)
        summaries.append({"fold": fold, "run": str(folder), **summary})
    scores = [s["best_val_dice_mean"] for s in summaries if s.get("best_val_dice_mean") is not None]
    summary = {"folds": count, "runs": summaries, "mean_best_val_dice": sum(scores) / len(scores) if scores else None,
               "seconds": round(time.monotonic() - started, 1)}
    write_json_atomic(out / "summary.json", summary)  # before the decision, which may fail
    summary["postprocessing"] = decide_postprocessing(out, count, settings.get("device", "auto"))
    write_json_atomic(out / "summary.json", summary)
    info(f"cross-validation done: {count} folds in {out}; mean best val Dice "
         + (f"{summary['mean_best_val_dice']:.4f}" if scores else "n/a"))
    return summary


def saved_fold_data(out: Path, count: int) -> str | None:
    """The DATA the folds of ``out`` were started on (from the first fold's config.json that has one)."""
    for fold in range(count):
        config = fold_folder(out, fold) / "config.json"
        if config.is_file():
            return read_run_config(config).get("data")
    return None
