"""Scoring speed: mriseg's metrics of one case against MONAI's HD95 alone, side by side in one run.

For each case, three BraTS regions (WT, TC, ET) of a prediction made by shifting the truth
(``--shift`` voxels along the first axis and one voxel eroded off, so every surface distance
is non-trivial) are scored by:

* mriseg ``score_masks`` per region: Dice, IoU, HD95, ASSD, sensitivity, precision, volumes;
* MONAI ``compute_hausdorff_distance(percentile=95)`` per region: HD95 only;
* medpy ``hd95`` + ``assd`` per region on the whole volume (mriseg before this change called them
  on a cropped box, computing two transform pairs per region).

Runs alternate (mriseg, MONAI, medpy, mriseg, ...) and the median of ``--repeats`` is reported.
Needs MONAI: ``pip install -e ".[bench]"``.

    python benchmarks/scoring.py                           # the real cases in ../shared/data/brats
    python benchmarks/scoring.py --synthetic               # a 240x240x155 phantom, no data needed
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from mriseg.evaluate.scoring import score_masks
from mriseg.labels import REGION_SCHEMES

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats"


def cases(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    if args.synthetic or not REAL.exists():
        grid = np.indices((240, 240, 155)).astype(np.float32)
        radius = np.sqrt(((grid - np.array([120, 110, 80])[:, None, None, None]) ** 2).sum(0))
        return [("phantom", np.select([radius < 12, radius < 22, radius < 35], [4, 1, 2], 0).astype(np.int16))]
    import nibabel as nib
    return [(folder.name, np.asarray(nib.load(folder / "OTMultiClass.nii.gz").dataobj).astype(np.int16))
            for folder in sorted(REAL.iterdir()) if (folder / "OTMultiClass.nii.gz").exists()]


def prediction_from(truth: np.ndarray, shift: int) -> np.ndarray:
    shifted = np.roll(truth, shift, axis=0)
    return np.where(ndimage.binary_erosion(shifted > 0), shifted, 0)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="score a phantom instead of the real cases")
    parser.add_argument("--shift", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from medpy.metric.binary import assd, hd95
    from monai.metrics import compute_hausdorff_distance

    regions = REGION_SCHEMES["brats"]
    print("| case | mriseg all metrics (s) | MONAI HD95 only (s) | medpy HD95 + ASSD (s) | "
          "mriseg / MONAI | HD95 WT mriseg / MONAI (mm) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, truth in cases(args):
        pred = prediction_from(truth, args.shift)
        masks = [(region.mask(pred), region.mask(truth)) for region in regions]
        runs = {
            "mriseg": lambda: [score_masks(p, t, (1.0, 1.0, 1.0)) for p, t in masks],
            "monai": lambda: [compute_hausdorff_distance(torch.from_numpy(p)[None, None],
                                                         torch.from_numpy(t)[None, None], percentile=95)
                              for p, t in masks],
            "medpy": lambda: [(hd95(p, t), assd(p, t)) for p, t in masks],
        }
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, run in runs.items():
                times[key].append(timed(run))
        median = {key: statistics.median(values) for key, values in times.items()}
        ours = score_masks(*masks[0], (1.0, 1.0, 1.0)).hd95
        theirs = float(compute_hausdorff_distance(torch.from_numpy(masks[0][0])[None, None],
                                                  torch.from_numpy(masks[0][1])[None, None], percentile=95))
        print(f"| {name} | {median['mriseg']:.3f} | {median['monai']:.3f} | {median['medpy']:.3f} | "
              f"{median['mriseg'] / median['monai']:.2f} | {ours:.2f} / {theirs:.2f} |")


if __name__ == "__main__":
    main()
