"""Small synthetic datasets in every layout, shared by the data-layer tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from mriseg.data.synthetic import write_synthetic

BRATS_2013_MAP = "flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass"


def make_lgg(root: Path, cases: int = 3, size: tuple[int, int, int] = (12, 32, 32)) -> Path:
    write_synthetic(root, layout="lgg", cases=cases, seed=1, size=size)
    return root


def make_brats(root: Path, cases: int = 2, size: tuple[int, int, int] = (24, 24, 16)) -> Path:
    write_synthetic(root, layout="brats", cases=cases, seed=2, size=size)
    return root


def make_brats2023(root: Path, brats: Path) -> Path:
    """Rename a 2021-named dataset to 2023 naming (-t1n -t1c -t2w -t2f -seg)."""
    renames = {"_t1.": "-t1n.", "_t1ce.": "-t1c.", "_t2.": "-t2w.", "_flair.": "-t2f.", "_seg.": "-seg."}
    for folder in sorted(p for p in brats.iterdir() if p.is_dir()):
        target = root / folder.name.replace("BraTS2021_S", "BraTS-GLI-0")
        target.mkdir(parents=True)
        for file in folder.iterdir():
            name = file.name
            for old, new in renames.items():
                name = name.replace(old, new)
            name = name.replace(folder.name, target.name)
            (target / name).write_bytes(file.read_bytes())
    return root


def make_msd(root: Path, brats: Path, channel_files: bool) -> Path:
    """MSD (4D channels-last images) or nnU-Net raw (_0000 files) from a BraTS-layout dataset."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index, folder in enumerate(sorted(p for p in brats.iterdir() if p.is_dir())):
        case = f"BRATS_{index + 1:03d}"
        volumes = [nib.load(str(folder / f"{folder.name}_{m}.nii.gz")) for m in ("flair", "t1", "t1ce", "t2")]
        affine = volumes[0].affine
        if channel_files:
            for c, volume in enumerate(volumes):
                nib.save(volume, str(root / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
        else:
            stacked = np.stack([np.asanyarray(v.dataobj) for v in volumes], axis=-1)
            nib.save(nib.Nifti1Image(stacked, affine), str(root / "imagesTr" / f"{case}.nii.gz"))
        nib.save(nib.load(str(folder / f"{folder.name}_seg.nii.gz")), str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")  # must be ignored
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "necrosis", "2": "edema", "4": "enhancing"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_pairs(root: Path, count: int = 3, flat: bool = False) -> Path:
    """2D grey images with 0/255 masks: images/ + masks/ folders, or <stem> + <stem>_mask in one folder."""
    rng = np.random.default_rng(3)
    image_dir = root if flat else root / "images"
    mask_dir = root if flat else root / "masks"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = rng.integers(0, 255, (20, 24), dtype=np.uint8)
        mask = np.zeros((20, 24), dtype=np.uint8)
        mask[5:10, 6:12] = 255
        Image.fromarray(image).save(image_dir / f"shape{i}.png")
        Image.fromarray(mask).save(mask_dir / (f"shape{i}_mask.png" if flat else f"shape{i}.png"))
    return root


def make_class_index_pairs(root: Path, image_folder: str, mask_folder: str, count: int = 2) -> Path:
    """The seeds' style: RGB images, masks holding a class index (0-3) in every channel of an RGB PNG."""
    rng = np.random.default_rng(4)
    (root / image_folder).mkdir(parents=True, exist_ok=True)
    (root / mask_folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / image_folder / f"{i}.png")
        classes = np.zeros((16, 16), dtype=np.uint8)
        classes[2:6, 2:6], classes[8:12, 3:9], classes[10:14, 10:14] = 1, 2, 3
        Image.fromarray(np.repeat(classes[..., None], 3, axis=-1)).save(root / mask_folder / f"{i}.png")
    return root
