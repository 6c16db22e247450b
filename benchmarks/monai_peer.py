"""A tutorial-style MONAI 2D peer for ``benchmarks/quality.py``: what a user would write from MONAI's
BraTS and 2D tutorials instead of using mriseg.

It trains MONAI's ``BasicUNet`` (2D) on axial slices of the training cases for a wall-clock budget
and writes the held-out case's labels as NIfTI in the case's own geometry, to be scored by the
same ``mriseg evaluate`` as mriseg's predictions. Its choices, all MONAI's or the tutorials':

* BraTS 2018 naming (``CASE_flair/t1/t1ce/t2.nii.gz``): the four modalities as channels, each
  z-scored over its non-zero (brain) voxels, as MONAI's BraTS tutorial's
  ``NormalizeIntensity(nonzero=True, channel_wise=True)``; the BraTS 2013 cases of ``shared/data/brats``
  (FLAIR + T1c, already z-scored) as two channels, intensities as given;
  slices cropped to the brain's bounding box over all cases and padded to a multiple of 16;
* three sigmoid region outputs WT / TC / ET (WT = every tumour label, TC = 1,3,4, ET = 4: BraTS 2013
  and 2018 labels alike)
  and ``DiceLoss(sigmoid=True)`` plus binary cross-entropy per region (MONAI's ``DiceCELoss`` would
  take softmax cross-entropy across the three overlapping regions, which is wrong for them: the
  first version of this script did, see docs/results.md); Adam, lr 1e-3, cosine decay to the end
  of the budget;
* slices drawn with probability proportional to tumour area plus a 10 % uniform share,
  random flips on both axes; batch 8; ``BasicUNet`` features (16, 16, 32, 64, 128, 16) for a CPU;
* the final model (no checkpoint selection on the held-out case), ``sliding_window_inference``
  over whole slices, thresholds 0.5, labels ET -> 4, TC -> 1, WT -> 2.

Usage: python benchmarks/monai_peer.py --train DIR... --test DIR... --budget 180 --out FOLDER
(writes FOLDER/CASE.nii.gz for each test case)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet

FILES_2013 = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1ce": "T1c_subtrMeanDivStd.nii.gz",
              "seg": "OTMultiClass.nii.gz"}
MODALITIES_2018 = ("flair", "t1", "t1ce", "t2")


def case_files(folder: Path) -> tuple[list[Path], Path]:
    """The modality files and the label file of a BraTS 2018 or a BraTS 2013 (DeepMedic) case."""
    if (folder / f"{folder.name}_flair.nii.gz").exists():
        return [folder / f"{folder.name}_{m}.nii.gz" for m in MODALITIES_2018], folder / f"{folder.name}_seg.nii.gz"
    return [folder / FILES_2013["flair"], folder / FILES_2013["t1ce"]], folder / FILES_2013["seg"]


def read_case(folder: Path) -> tuple[np.ndarray, np.ndarray | None, nib.Nifti1Image]:
    """Image (C, X, Y, Z) float32 and labels (X, Y, Z) int (None when absent), and the first header."""
    paths, seg_path = case_files(folder)
    first = nib.load(paths[0])
    image = np.stack([np.asarray(nib.load(path).dataobj, dtype=np.float32) for path in paths])
    if len(paths) == len(MODALITIES_2018):  # raw scanner intensities: z-score each channel over the brain
        for channel in image:
            brain = channel != 0
            if brain.any():
                channel[brain] = (channel[brain] - channel[brain].mean()) / max(float(channel[brain].std()), 1e-8)
    labels = np.rint(np.asarray(nib.load(seg_path).dataobj)).astype(np.int64) if seg_path.exists() else None
    return image, labels, first


def regions(labels: np.ndarray) -> np.ndarray:
    """WT / TC / ET masks (3, ...) of BraTS 2013 labels."""
    return np.stack([labels > 0, np.isin(labels, (1, 3, 4)), labels == 4]).astype(np.float32)


def brain_box(images: list[np.ndarray]) -> tuple[slice, slice]:
    """In-plane bounding box (multiple of 16) of the non-background voxels of every case."""
    lows, highs = [], []
    for image in images:
        inside = np.argwhere((image != image.min(axis=(1, 2, 3), keepdims=True)).any(0).any(-1))
        lows.append(inside.min(0))
        highs.append(inside.max(0) + 1)
    low, high = np.min(lows, 0), np.max(highs, 0)
    box = []
    for axis, (a, b) in enumerate(zip(low, high)):
        size = -(-(b - a) // 16) * 16
        start = int(max(0, min(a - (size - (b - a)) // 2, images[0].shape[1 + axis] - size)))
        box.append(slice(start, start + size))
    return box[0], box[1]


def train(cases: list[tuple[np.ndarray, np.ndarray]], budget: float, started: float, seed: int,
          channels: int) -> BasicUNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = BasicUNet(spatial_dims=2, in_channels=channels, out_channels=3, features=(16, 16, 32, 64, 128, 16))
    dice_loss, bce_loss = DiceLoss(sigmoid=True), torch.nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target) + bce_loss(logits, target)

    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    weights = []
    for _, labels in cases:
        area = (labels > 0).sum(axis=(0, 1)).astype(np.float64)
        uniform = np.full(len(area), 1 / len(area))
        weights.append(0.9 * area / area.sum() + 0.1 * uniform if area.sum() else uniform)
    step = 0
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= budget:
            break
        for group in optimiser.param_groups:  # cosine to zero at the end of the budget
            group["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * min(elapsed / budget, 1.0)))
        images, targets = [], []
        for _ in range(8):
            index = rng.integers(len(cases))
            image, labels = cases[index]
            z = rng.choice(labels.shape[-1], p=weights[index])
            x, y = image[..., z], regions(labels[..., z])
            for axis in (1, 2):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            images.append(np.ascontiguousarray(x))
            targets.append(np.ascontiguousarray(y))
        optimiser.zero_grad()
        loss = loss_fn(net(torch.from_numpy(np.stack(images))), torch.from_numpy(np.stack(targets)))
        loss.backward()
        optimiser.step()
        step += 1
        if step % 50 == 0:
            print(f"peer: step {step} loss {loss.item():.4f}", flush=True)
    print(f"peer: {step} steps of 8 slices in {time.perf_counter() - started:.1f} s", flush=True)
    return net


def predict(net: BasicUNet, image: np.ndarray) -> np.ndarray:
    """BraTS labels (X, Y, Z) of a cropped image (C, X, Y, Z)."""
    net.eval()
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))  # (Z, C, X, Y)
    with torch.inference_mode():
        probs = torch.sigmoid(sliding_window_inference(slices, image.shape[1:3], 16, net))
    wt, tc, et = (probs[:, i].numpy() > 0.5 for i in range(3))
    labels = np.where(et, 4, np.where(tc, 1, np.where(wt, 2, 0))).astype(np.uint8)
    return np.moveaxis(labels, 0, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", type=Path, required=True)
    parser.add_argument("--test", nargs="+", type=Path, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds of training, from the start")
    parser.add_argument("--out", type=Path, required=True, help="folder for CASE.nii.gz per test case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = [read_case(folder) for folder in args.train]
    tests = [read_case(folder) for folder in args.test]
    box = brain_box([image for image, _, _ in loaded + tests])
    cases = [(image[:, box[0], box[1]], labels[box[0], box[1]]) for image, labels, _ in loaded]
    net = train(cases, args.budget, started, args.seed, loaded[0][0].shape[0])
    args.out.mkdir(parents=True, exist_ok=True)
    for folder, (image, _, header) in zip(args.test, tests):
        labels = np.zeros(image.shape[1:], np.uint8)
        labels[box[0], box[1]] = predict(net, image[:, box[0], box[1]])
        written = nib.Nifti1Image(labels, header.affine, header.header)
        written.set_data_dtype(np.uint8)
        nib.save(written, args.out / f"{folder.name}.nii.gz")


if __name__ == "__main__":
    main()
