"""Cross-validated quality on the real BraTS cases: mriseg recipes and a MONAI peer at one budget.

4-fold cross-validation by patient over the cases in ``../shared/data/brats`` (train on 3, hold 1
out). Every arm trains each fold for the same wall-clock ``--budget`` (mriseg: ``train --time``,
the peer: its own clock from process start), then the held-out case is predicted with the run's
*final* model (``last.pt``: nothing is chosen by the held-out case) and scored on its original
1 mm grid by ``mriseg evaluate`` (WT / TC / ET Dice). Folds run ``--parallel`` at a time with
``--threads`` torch threads each, so every arm sees the same machine.

Arms are ``NAME;TRAIN ARGS;PREPROCESS ARGS`` (the last two optional), or ``monai`` for the peer::

    python benchmarks/quality.py --budget 3m --out /tmp/quality \\
        --arm "default" --arm "wide;--model-options features=16" --arm monai

With ``--ensemble K`` a mriseg arm trains a K-fold cross-validation of the three training cases
within the same budget and predicts the held-out case with the fold ensemble.

Prints one row per arm (mean and per-fold Dice) and adds it to ``results.json`` in ``--out``, where
folds run separately (``--folds 0,1``, then ``--folds 2,3``) join one row per arm and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "brats"
MODALITIES = "flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass"
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


def prepare(out: Path, data: Path, cases: list[str], arm: Arm, threads: int) -> Path:
    """The arm's cache of every case (preprocessing is per case: nothing leaks between folds)."""
    key = "".join(c if c.isalnum() else "_" for c in arm.preprocess_args) or "plain"
    cache = out / f"cache-{key}"
    run(mriseg("preprocess", str(data), str(cache), "--modalities", MODALITIES,
               *shlex.split(arm.preprocess_args)), out / f"cache-{key}.log", threads)
    return cache


def held_out_folder(out: Path, data: Path, case: str) -> Path:
    folder = out / "held-out" / case
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / case
    if not link.exists():
        link.symlink_to((data / case).resolve())
    return folder


def score(prediction: Path, truth: Path, log: Path, threads: int) -> dict[str, float]:
    """WT / TC / ET Dice of ``mriseg evaluate`` on the original grid."""
    evaluated = prediction.parent / (prediction.name + "-eval")
    summary = json.loads(run(mriseg("evaluate", str(prediction), str(truth), "--out", str(evaluated),
                                    "--modalities", MODALITIES, "--overwrite", "--json"),
                             log, threads))
    return {region: summary["regions"][region]["metrics"]["dice"]["mean"] for region in REGIONS}


def run_fold(arm: Arm, fold: int, cases: list[str], args: argparse.Namespace, cache: Path | None) -> dict:
    test = cases[fold]
    train_cases = [c for c in cases if c != test]
    folder = args.out / arm.name / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "commands.log"
    truth = held_out_folder(args.out, args.data, test)
    started = time.perf_counter()
    if arm.is_peer:
        prediction = folder / "pred"
        run([sys.executable, str(REPO / "benchmarks" / "monai_peer.py"), "--train",
             *(str(args.data / c) for c in train_cases), "--test", str(args.data / test),
             "--budget", str(args.budget_seconds), "--out", str(prediction / f"{test}.nii.gz")], log, args.threads)
        trained = time.perf_counter() - started
    else:
        split = folder / "split.json"
        split.write_text(json.dumps(inner_folds(train_cases, args.ensemble) if args.ensemble
                                    else {"train": train_cases, "val": [test]}))
        run(mriseg("train", str(cache), "--split", str(split), "--time", args.budget, "--out", str(folder / "run"),
                   "--overwrite", *shlex.split(arm.train_args)), log, args.threads)
        trained = time.perf_counter() - started
        prediction = folder / "pred-dice"
        model = folder / "run" if args.ensemble else folder / "run" / "last.pt"
        for key, extra in variants(args.no_tta).items():
            run(mriseg("predict", str(truth), "--model", str(model), "--out",
                       str(folder / f"pred-{key}"), "--modalities", MODALITIES.rsplit(",", 1)[0], "--overwrite",
                       *extra), log, args.threads)
    keys = ["dice"] if arm.is_peer else list(variants(args.no_tta))
    scores = {key: score(prediction if key == "dice" else folder / f"pred-{key}", truth, log, args.threads)
              for key in keys}
    dice = scores["dice"]
    print(f"{arm.name} fold {fold} ({test}): " + " ".join(f"{r} {dice[r]:.4f}" for r in REGIONS)
          + f"  (trained in {trained:.0f} s)", flush=True)
    return {"fold": fold, "case": test, **scores, "train_seconds": round(trained, 1)}


def inner_folds(cases: list[str], count: int) -> list[dict[str, list[str]]]:
    """``count`` folds over the training cases only (the held-out case is in none of them)."""
    return [{"train": [c for i, c in enumerate(cases) if i % count != k],
             "val": [c for i, c in enumerate(cases) if i % count == k]} for k in range(count)]


def variants(no_tta: bool) -> dict[str, list[str]]:
    """The predictions scored per mriseg fold: predict's default (flip TTA for 2D models), with the
    largest component, and (``--no-tta``) without flips."""
    chosen = {"dice": [], "dice_largest_component": ["--largest-component"]}
    if no_tta:
        chosen["dice_no_tta"] = ["--no-tta"]
    return chosen


def mean_dice(rows: list[dict], key: str) -> dict[str, float]:
    return {r: sum(row[key][r] for row in rows) / len(rows) for r in REGIONS}


def record(path: Path, budget: str, arm: Arm, rows: list[dict]) -> dict:
    """Add an arm's folds to ``results.json``; folds of an earlier run of the same arm (same
    options) are kept unless run again, so ``--folds 0,1`` then ``--folds 2,3`` make one table."""
    everything = json.loads(path.read_text()) if path.exists() else {}
    earlier = everything.setdefault(budget, {}).get(arm.name, {})
    same = (earlier.get("train_args"), earlier.get("preprocess_args")) == (arm.train_args, arm.preprocess_args)
    by_fold = {row["fold"]: row for row in earlier.get("folds", [])} if same else {}
    by_fold.update({row["fold"]: row for row in rows})
    merged = [by_fold[fold] for fold in sorted(by_fold)]
    result = {"train_args": arm.train_args, "preprocess_args": arm.preprocess_args, "folds": merged}
    for key in [k for k in merged[0] if k.startswith("dice") and all(k in row for row in merged)]:
        result["mean" + key[len("dice"):]] = mean_dice(merged, key)
    everything[budget][arm.name] = result
    from mriseg.files import write_json_atomic  # the project's one atomic writer (REPO is on sys.path by now)

    write_json_atomic(path, everything, indent=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="3m", help="training wall-clock per fold, e.g. 3m, 15m")
    parser.add_argument("--arm", action="append", default=[], help="NAME;TRAIN ARGS;PREPROCESS ARGS, or monai")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", default="0,1,2,3", help="which folds to run")
    parser.add_argument("--parallel", type=int, default=2, help="folds trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per fold")
    parser.add_argument("--no-tta", action="store_true",
                        help="also score mriseg's folds with predict --no-tta (no flips)")
    parser.add_argument("--ensemble", type=int, default=0, metavar="K",
                        help="mriseg arms train K folds of the training cases within the budget (train shares "
                             "it out) and predict the held-out case with their ensemble (each fold's best.pt, "
                             "chosen by its own validation case)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from mriseg.train.budget import parse_duration

    args.budget_seconds = parse_duration(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    folds = [int(f) for f in args.folds.split(",")]
    arms = [parse_arm(a) for a in (args.arm or ["default", "monai"])]
    results = {}
    for arm in arms:
        cache = None if arm.is_peer else prepare(args.out, args.data, cases, arm, args.threads)
        with ThreadPoolExecutor(args.parallel) as pool:
            rows = list(pool.map(lambda f: run_fold(arm, f, cases, args, cache), folds))
        results[arm.name] = record(args.out / "results.json", args.budget, arm, rows)
    print(f"\nbudget {args.budget} per fold, {args.parallel} folds at a time, {args.threads} thread(s) each")
    extra = [key[len("dice_"):] for key in list(variants(args.no_tta))[1:]]
    print("| arm | mean WT | mean TC | mean ET | WT per fold | " + " | ".join(f"mean WT, {e}" for e in extra) + " |")
    print("|---|---:|---:|---:|---|" + "---:|" * len(extra))
    for name, result in results.items():
        per_fold = " / ".join(f"{row['dice']['WT']:.3f}" for row in result["folds"])
        others = [result.get("mean_" + e) for e in extra]
        print(f"| {name} | " + " | ".join(f"{result['mean'][r]:.3f}" for r in REGIONS) + f" | {per_fold} | "
              + " | ".join(f"{o['WT']:.3f}" if o else "-" for o in others) + " |")


if __name__ == "__main__":
    main()
