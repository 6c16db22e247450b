"""Post-processing chosen by cross-validation, as nnU-Net's ``determine_postprocessing``: after
``--folds K``, every fold's model predicts its own validation cases (on the cached grid, one pass,
no flips), and keeping only the largest tumour component is adopted when it raises the mean Dice
over those cases and the scored regions. The decision and both scores go into
``postprocessing.json`` beside the folds; ``predict`` and ``evaluate --model`` apply it to that
folder (``--largest-component/--no-largest-component`` override it). It runs after the folds, outside
a ``--time`` budget (one pass over each fold's validation cases), and any fold that trains again
removes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mriseg.checkpoint import fold_folder
from mriseg.data.cache import open_cache
from mriseg.files import write_json_atomic
from mriseg.inference import InferenceSettings, keep_largest_component, load_model, predict_logits
from mriseg.inference.model import POSTPROCESSING_FILE
from mriseg.errors import MrisegError
from mriseg.log import info, warn
from mriseg.metrics import dice
from mriseg.train.run_folder import read_run_config


def fold_scores(folder: Path, device: str) -> dict[str, list[list[float]]]:
    """Per validation case of one fold: the scored regions' Dice as predicted and with the largest
    tumour component kept."""
    config = read_run_config(folder / "config.json")
    loaded = load_model(folder, device)
    cache, task = open_cache(config["cache"]), loaded.task
    settings = InferenceSettings(patch_size=loaded.patch_size, tta=False)
    scores: dict[str, list[list[float]]] = {"as_predicted": [], "largest_component": []}
    for case_id in config.get("val_cases") or []:
        truth = np.asarray(cache.label(case_id))
        valid = truth != task.ignore_label if task.ignore_label is not None else None  # as validation scores
        logits = predict_logits(loaded.network, np.asarray(cache.image(case_id), dtype=np.float32),
                                loaded.spatial_dims, cache.record(case_id).get("slice_axis"), settings)
        labels = task.decode(task.probabilities(logits[None])[0].numpy())
        for name, candidate in (("as_predicted", labels), ("largest_component", keep_largest_component(labels))):
            scores[name].append([dice(p, t, valid) for p, t in zip(task.scored_masks(candidate),
                                                                   task.scored_masks(truth))])
    return scores


def forget_postprocessing(out: Path) -> None:
    """A fold trains again: the decision made over the earlier folds no longer holds."""
    (out / POSTPROCESSING_FILE).unlink(missing_ok=True)


def decide_postprocessing(out: Path, count: int, device: str = "auto") -> dict[str, Any] | None:
    """Score both candidates on every fold's validation cases; write and return the decision (None,
    and a warning, where it cannot be made: nothing is applied then)."""
    try:
        return make_decision(out, count, device)
    except MrisegError as error:
        warn(f"post-processing: not decided ({error}); predict applies none for {out}")
        return None


def make_decision(out: Path, count: int, device: str) -> dict[str, Any] | None:
    collected: dict[str, list[list[float]]] = {"as_predicted": [], "largest_component": []}
    for fold in range(count):
        for name, rows in fold_scores(fold_folder(out, fold), device).items():
            collected[name].extend(rows)
    if not collected["as_predicted"]:
        return None
    means = {name: float(np.mean(rows)) for name, rows in collected.items()}
    regions = {name: np.mean(rows, axis=0).round(4).tolist() for name, rows in collected.items()}
    keep = means["largest_component"] > means["as_predicted"]
    decision = {"largest_component": bool(keep), "cases": len(collected["as_predicted"]),
                "mean_dice": means, "region_dice": regions}
    write_json_atomic(out / POSTPROCESSING_FILE, decision)
    info(f"post-processing: keeping the largest tumour component {'raises' if keep else 'does not raise'} the "
         f"cross-validated Dice ({means['as_predicted']:.4f} -> {means['largest_component']:.4f} over "
         f"{decision['cases']} cases): predict {'applies' if keep else 'skips'} it for {out}")
    return decision
