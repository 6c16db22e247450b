#!/usr/bin/env python3
"""mriseg from Python, end to end: synthetic data -> cache -> train -> predict -> evaluate.

    python examples/python_api.py [OUT]     # OUT defaults to a new temporary folder

Everything is tiny (10 synthetic BraTS-layout cases of 64x64x24 voxels, a 2D U-Net of width 4,
6 epochs of 20 steps) so that it finishes in well under a minute on a laptop CPU; the Dice it
prints is correspondingly modest. Each call below is the library function behind the command
of the same name (`mriseg synth`, `preprocess`, `train`, `predict`, `evaluate`); for real data,
point `build_cache` at your dataset and raise the sizes in TRAINING.

OUT receives:
    data/         8 training cases (one NIfTI per modality, and the labels)
    test/         2 held-out cases, never seen in training
    cache/        the preprocessed training cache
    run/          the training run: best.pt, last.pt, metrics.jsonl, curves.png, train.log, ...
    predictions/  <case>_seg.nii.gz for each held-out case
    evaluation/   metrics.csv, summary.json, dsc.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from mriseg.data.cache import build_cache
from mriseg.data.preprocess import PreprocessParams
from mriseg.data.synthetic import write_synthetic
from mriseg.evaluate import evaluate
from mriseg.predict import PredictOptions, predict
from mriseg.train import train

CASES, HELD_OUT = 10, 2
TRAINING = {
    "model": "unet", "model_options": {"features": 4}, "loss": "bce-dice", "lr": 3e-3, "batch_size": 8,
    "epochs": 6, "steps_per_epoch": 20, "patience": 0, "seed": 0, "device": "cpu",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder (default: a new temporary folder)")
    out = parser.parse_args().out or Path(tempfile.mkdtemp(prefix="mriseg-api-"))

    # 1. Synthetic cases in the BraTS 2021 layout; the last ones are moved aside for testing.
    data, test = out / "data", out / "test"
    cases = write_synthetic(data, layout="brats", cases=CASES, seed=0, size=(64, 64, 24))
    test.mkdir()
    for case in cases[-HELD_OUT:]:
        os.replace(case, test / case.name)

    # 2. The training cache: z-scored .npy files (what `mriseg preprocess data cache` writes).
    build_cache(data, out / "cache", PreprocessParams())

    # 3. Train; the task (BraTS regions WT/TC/ET here) comes from the cache's labels.
    summary = train(out / "cache", out=out / "run", **TRAINING)
    print(f"best mean validation Dice {summary['best_val_dice_mean']:.3f} (epoch {summary['best_epoch']})")

    # 4. Predict the held-out cases with the run's best.pt; each case gives a CaseResult.
    results = predict([str(test)], model=out / "run", options=PredictOptions(out=out / "predictions", device="cpu"))
    for result in results:
        volume = f"tumour {result.volume_ml:.1f} mL" if result.status == "ok" else result.error
        print(f"{result.case_id}: {result.status}, {volume}")
    if any(result.status != "ok" for result in results):
        raise SystemExit("some predictions failed")

    # 5. Score the masks against the held-out labels (BraTS regions, from the dataset's naming).
    evaluation = evaluate(out / "predictions", test, out / "evaluation")
    for region, stats in evaluation.summary["regions"].items():
        print(f"held-out {region} Dice: mean {stats['metrics']['dice']['mean']:.3f} "
              f"over {stats['metrics']['dice']['n']} case(s)")
    print(f"everything is in {out}")


if __name__ == "__main__":
    main()
