"""Cross-validated quality on real BraTS cases: mriseg recipes and a MONAI peer at one budget.

Five-fold cross-validation by patient over ``../shared/data/brats2018`` (21 four-modality cases), with
the committed fold file ``benchmarks/brats2018_folds.json`` (nnU-Net's ``splits_final.json`` form; the
four LGG cases each in another fold). Every arm trains each fold for the same wall-clock ``--budget``
(mriseg: ``train --time``, counted from its own start; the peer: its own clock from process start),
then the fold's held-out cases are predicted with the run's *final* model (``last.pt``: nothing is
chosen by a held-out case; training validates on them only to draw its curve) and scored on their
original 1 mm grid by ``mriseg evaluate --regions brats`` (WT / TC / ET Dice and HD95 per case).
Jobs (arm x fold) run ``--parallel`` at a time with ``--threads`` torch threads each, so every arm sees
the same machine. With ``--data ../shared/data/brats`` (the BraTS 2013 regression row) the folds are
leave-one-out over its four cases.

Arms are ``NAME;TRAIN ARGS;PREPROCESS ARGS`` (the last two optional), or ``monai`` for the peer::

    python benchmarks/quality.py --budget 5m --out /tmp/quality \\
        --arm "default" --arm "native;;--crop" --arm monai

Each mriseg fold is also scored with its masks kept to the largest tumour component and (``--no-tta``)
predicted without flip TTA. Prints one row per arm (mean over every held-out case, and per fold) and
adds it to ``results.json`` in ``--out``; folds run separately (``--folds 0,1``, then ``--folds 2,3,4``) join one row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "brats2018"
FOLD_FILE = REPO / "benchmarks" / "brats2018_folds.json"
MODALITIES_2013 = "flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass"
DEFAULT_PREPROCESS = "--crop --size 128,128"
REGIONS = ("WT", "TC", "ET")


@dataclass
class Arm:
    name: str
    train_args: str = ""
    preprocess_args: str = DEFAULT_PREPROCESS

    @property
    def is_peer(self) -> bool:
        return self.name == "monai"


def parse_arm(text: str) -> Arm:
    parts = [part.strip() for part in text.split(";")]
    return Arm(parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 and parts[2]
               else DEFAULT_PREPROCESS)


def run(command: list[str], log: Path, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("a") as stream:
        stream.write("$ " + shlex.join(command) + "\n")
        stream.flush()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stream, text=True, env=env)
        stream.write(done.stdout)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}); see {log}")
    return done.stdout


def mriseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "mriseg", *args]


def modality_options(data: Path, with_label: bool = True) -> list[str]:
    """``--modalities`` for the BraTS 2013 (DeepMedic) file names; BraTS 2018 names need none."""
    if any(data.glob("*/*_flair.nii.gz")):
        return []
    return ["--modalities", MODALITIES_2013 if with_label else MODALITIES_2013.rsplit(",", 1)[0]]


def prepare(out: Path, data: Path, arm: Arm, threads: int) -> Path:
    """The arm's cache of every case (preprocessing is per case: nothing leaks between folds)."""
    key = "".join(c if c.isalnum() else "_" for c in arm.preprocess_args) or "plain"
    cache = out / f"cache-{key}"
    run(mriseg("preprocess", str(data), str(cache), *modality_options(data), *shlex.split(arm.preprocess_args)),
        out / f"cache-{key}.log", threads)
    return cache


def folds_of(data: Path, cases: list[str], fold_file: Path | None) -> list[dict[str, list[str]]]:
    """The committed folds for brats2018 (or ``--fold-file``), else leave-one-out."""
    path = fold_file or (FOLD_FILE if data.resolve().name == "brats2018" else None)
    if path is None:
        return [{"train": [c for c in cases if c != test], "val": [test]} for test in cases]
    folds = json.loads(path.read_text())
    listed = sorted(c for fold in folds for c in fold["val"])
    if listed != sorted(cases):
        raise SystemExit(f"{path}: its held-out cases are not the cases of {data}")
    return folds


def held_out_folder(out: Path, data: Path, fold: int, cases: list[str]) -> Path:
    folder = out / "held-out" / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folder / case
        if not link.exists():
            link.symlink_to((data / case).resolve())
    return folder


def score(prediction: Path, truth: Path, data: Path, log: Path, threads: int) -> dict[str, dict[str, float]]:
    """Per case: WT / TC / ET Dice and HD95 of ``mriseg evaluate`` on the original grid."""
    evaluated = prediction.parent / (prediction.name + "-eval")
    run(mriseg("evaluate", str(prediction), str(truth), "--out", str(evaluated), "--regions", "brats",
               *modality_options(data), "--overwrite", "--json"), log, threads)
    return read_scores(evaluated)


def read_scores(evaluated: Path) -> dict[str, dict[str, float | None]]:
    """Per case: WT / TC / ET Dice and HD95 from an evaluate folder's metrics.csv."""
    scores: dict[str, dict[str, float | None]] = {}
    for row in csv.DictReader((evaluated / "metrics.csv").open()):
        if row["region"] in REGIONS:
            for metric in ("dice", "hd95"):
                scores.setdefault(row["case_id"], {})[f"{metric}_{row['region']}"] = \
                    float(row[metric]) if row[metric] else None
    return scores


def run_fold(arm: Arm, fold: int, split: dict, args: argparse.Namespace, cache: Path | None) -> dict:
    folder = args.out / arm.name / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "commands.log"
    truth = args.out / "held-out" / f"fold_{fold}"
    prediction = folder / "pred"
    started = time.perf_counter()
    finished = args.resume and (folder / "pred-eval" / "metrics.csv").is_file()  # by an earlier run
    if finished:
        trained, cases = None, read_scores(folder / "pred-eval")
    elif arm.is_peer:
        run([sys.executable, str(REPO / "benchmarks" / "monai_peer.py"), "--train",
             *(str(args.data / c) for c in split["train"]), "--test", *(str(args.data / c) for c in split["val"]),
             "--budget", str(args.budget_seconds), "--out", str(prediction)], log, args.threads)
        trained = time.perf_counter() - started
    else:
        (folder / "split.json").write_text(json.dumps(split))
        run(mriseg("train", str(cache), "--split", str(folder / "split.json"), "--time", args.budget,
                   "--out", str(folder / "run"), "--overwrite", *shlex.split(arm.train_args)), log, args.threads)
        trained = time.perf_counter() - started
        run(mriseg("predict", str(truth), "--model", str(folder / "run" / "last.pt"), "--out", str(prediction),
                   *modality_options(args.data, with_label=False), "--overwrite", *shlex.split(args.predict_args)),
            log, args.threads)
    if not finished:
        cases = score(prediction, truth, args.data, log, args.threads)
    variants = {} if arm.is_peer else score_variants(folder, prediction, truth, args, log)
    summary = json.loads((folder / "run" / "summary.json").read_text()) if not arm.is_peer else {}
    print(f"{arm.name} fold {fold}: " + " ".join(f"{r} {np.mean([c[f'dice_{r}'] for c in cases.values()]):.4f}"
                                                 for r in REGIONS)
          + (f"  (trained in {trained:.0f} s" if trained is not None else "  (an earlier run's fold")
          + f"{', ' + str(summary.get('steps')) + ' steps' if summary else ''})",
          flush=True)
    return {"fold": fold, "cases": cases, "variants": variants,
            "train_seconds": round(trained, 1) if trained is not None else None,
            "steps": summary.get("steps"), "time_used_s": summary.get("time_used_s")}


def score_variants(folder: Path, prediction: Path, truth: Path, args: argparse.Namespace, log: Path) -> dict:
    """The same model's held-out cases kept to their largest tumour component (the saved masks
    post-processed, as ``predict --largest-component`` does) and, with ``--no-tta``, predicted
    without flips."""
    from mriseg.inference import keep_largest_component
    import nibabel as nib

    largest = folder / "pred-largest"
    largest.mkdir(exist_ok=True)
    for mask in sorted(prediction.glob("*.nii.gz")):
        image = nib.load(str(mask))
        kept = keep_largest_component(np.asarray(image.dataobj))
        nib.save(nib.Nifti1Image(kept, image.affine, image.header), str(largest / mask.name))
    variants = {"largest_component": score(largest, truth, args.data, log, args.threads)}
    if args.no_tta:
        flipless = folder / "pred-no-tta"
        run(mriseg("predict", str(truth), "--model", str(folder / "run" / "last.pt"), "--out", str(flipless),
                   *modality_options(args.data, with_label=False), "--overwrite", "--no-tta",
                   *shlex.split(args.predict_args)), log, args.threads)
        variants["no_tta"] = score(flipless, truth, args.data, log, args.threads)
    return variants


def means(rows: list[dict]) -> dict[str, float]:
    """Means over every held-out case of the folds (NaN HD95, an empty prediction, left out)."""
    cases = [case for row in rows for case in row["cases"].values()]
    return {key: float(np.nanmean([float(c[key]) if c[key] is not None else np.nan for c in cases]))
            for key in cases[0]}


def record(path: Path, budget: str, arm: Arm, rows: list[dict], threads: int) -> dict:
    """Add an arm's folds to ``results.json``; folds of an earlier run of the same arm (same
    options) are kept unless run again, so ``--folds 0,1`` then ``--folds 2,3,4`` make one row."""
    everything = json.loads(path.read_text()) if path.exists() else {}
    earlier = everything.setdefault(budget, {}).get(arm.name, {})
    same = (earlier.get("train_args"), earlier.get("preprocess_args")) == (arm.train_args, arm.preprocess_args)
    by_fold = {row["fold"]: row for row in earlier.get("folds", [])} if same else {}
    by_fold.update({row["fold"]: row for row in rows})
    merged = [by_fold[fold] for fold in sorted(by_fold)]
    result = {"train_args": arm.train_args, "preprocess_args": arm.preprocess_args, "threads": threads,
              "folds": merged, "mean": means(merged),
              "fold_means": {row["fold"]: means([row]) for row in merged}}
    for variant in sorted({v for row in merged for v in row.get("variants", {})}):
        if all(variant in row.get("variants", {}) for row in merged):
            result[f"mean_{variant}"] = means([{"cases": row["variants"][variant]} for row in merged])
    everything[budget][arm.name] = result
    from mriseg.files import write_json_atomic  # the project's one atomic writer (REPO is on sys.path by now)

    write_json_atomic(path, everything, indent=2)
    return result


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(f"\nbudget {args.budget} per fold, {args.parallel} jobs at a time, {args.threads} thread(s) each")
    print("| arm | WT | TC | ET | HD95 WT / TC / ET (mm) | WT per fold | worst case WT | WT / TC / ET, largest "
          "component | WT / TC / ET, no flip TTA |")
    print("|---|---:|---:|---:|---|---|---:|---|---|")
    for name, result in results.items():
        mean = result["mean"]
        per_fold = " / ".join(f"{result['fold_means'][row['fold']]['dice_WT']:.3f}" for row in result["folds"])
        worst = min(c["dice_WT"] for row in result["folds"] for c in row["cases"].values())
        print(f"| {name} | " + " | ".join(f"{mean[f'dice_{r}']:.3f}" for r in REGIONS) + " | "
              + " / ".join(f"{mean[f'hd95_{r}']:.1f}" for r in REGIONS) + f" | {per_fold} | {worst:.3f} | "
              + " | ".join(" / ".join(f"{result[key][f'dice_{r}']:.3f}" for r in REGIONS) if key in result else "-"
                           for key in ("mean_largest_component", "mean_no_tta")) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5m", help="training wall-clock per fold, e.g. 5m, 15m")
    parser.add_argument("--arm", action="append", default=[], help="NAME;TRAIN ARGS;PREPROCESS ARGS, or monai")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--fold-file", type=Path, default=None, help="splits_final.json-style folds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", default=None, help="which folds to run (default: all)")
    parser.add_argument("--parallel", type=int, default=2, help="jobs (arm x fold) run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--predict-args", default="", help="extra options of mriseg predict")
    parser.add_argument("--no-tta", action="store_true", help="also score mriseg's folds predicted without flips")
    parser.add_argument("--resume", action="store_true",
                        help="read the scores of folds an earlier run in --out finished instead of running them")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from mriseg.train.budget import parse_duration

    args.budget_seconds = parse_duration(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    folds = folds_of(args.data, cases, args.fold_file)
    chosen = [int(f) for f in args.folds.split(",")] if args.folds else list(range(len(folds)))
    arms = [parse_arm(a) for a in (args.arm or ["default", "monai"])]
    caches = {arm.name: None if arm.is_peer else prepare(args.out, args.data, arm, args.threads) for arm in arms}
    for fold in chosen:  # before the jobs start: they share these folders
        held_out_folder(args.out, args.data, fold, folds[fold]["val"])
    jobs = [(arm, fold) for arm in arms for fold in chosen]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda job: run_fold(job[0], job[1], folds[job[1]], args, caches[job[0].name]), jobs))
    results = {arm.name: record(args.out / "results.json", args.budget, arm,
                                [row for (a, _), row in zip(jobs, rows) if a is arm], args.threads) for arm in arms}
    print_table(results, args)


if __name__ == "__main__":
    main()
