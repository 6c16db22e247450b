"""Synthetic data: deterministic, in the real formats, with plausible anatomy and tumour-free cases."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile

from mriseg.data.readers import read_case
from mriseg.data.synthetic import (CSF, ENHANCING, GREY, NECROSIS, OEDEMA, WHITE, make_phantom,
                                   write_synthetic)


def digest(folder: Path) -> str:
    hasher = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            hasher.update(file.name.encode() + file.read_bytes())
    return hasher.hexdigest()


def test_same_seed_same_bytes_and_more_cases_keep_the_first_ones(tmp_path):
    write_synthetic(tmp_path / "a", "lgg", cases=2, seed=5, size=(4, 24, 24))
    write_synthetic(tmp_path / "b", "lgg", cases=3, seed=5, size=(4, 24, 24))
    write_synthetic(tmp_path / "c", "lgg", cases=2, seed=6, size=(4, 24, 24))
    first = tmp_path / "a" / "TCGA_SY_0002_19990101"
    assert digest(first) == digest(tmp_path / "b" / "TCGA_SY_0002_19990101")
    assert digest(first) != digest(tmp_path / "c" / "TCGA_SY_0002_19990101")


def test_lgg_files_look_like_kaggle_3m(tmp_path):
    write_synthetic(tmp_path, "lgg", cases=1, seed=0, size=(5, 32, 32))
    folder = tmp_path / "TCGA_SY_0001_19990101"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 10 and "TCGA_SY_0001_19990101_5_mask.tif" in names
    image = tifffile.imread(folder / "TCGA_SY_0001_19990101_3.tif")
    mask = tifffile.imread(folder / "TCGA_SY_0001_19990101_3_mask.tif")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}


def test_brats_files_and_labels(tmp_path):
    write_synthetic(tmp_path, "brats", cases=1, seed=0, size=(32, 32, 20))
    folder = tmp_path / "BraTS2021_S0001"
    seg = nib.load(str(folder / "BraTS2021_S0001_seg.nii.gz"))
    assert seg.shape == (32, 32, 20) and nib.aff2axcodes(seg.affine) == ("L", "P", "S")
    assert set(np.unique(np.asanyarray(seg.dataobj))) == {0, 1, 2, 4}
    case = read_case(folder)
    assert case.modalities == ["t1", "t1ce", "t2", "flair"] and case.slice_axis == 2


def test_anatomy_contrasts_and_tumour_free_cases(tmp_path):
    phantom = make_phantom((24, 48, 48), np.random.default_rng(0), tumour=True)
    t1, t1ce, t2, flair = phantom.images
    mean = {t: [float(m[phantom.tissue == t].mean()) for m in phantom.images]
            for t in (CSF, GREY, WHITE, OEDEMA, NECROSIS, ENHANCING)}
    assert mean[WHITE][0] > mean[GREY][0] > mean[CSF][0]          # T1: white > grey > CSF
    assert mean[CSF][2] > mean[GREY][2] > mean[WHITE][2]          # T2: CSF brightest
    assert mean[OEDEMA][3] > mean[GREY][3] > mean[CSF][3]         # FLAIR: oedema bright, CSF dark
    assert mean[ENHANCING][1] > mean[ENHANCING][0] + 0.3          # the rim enhances with contrast
    assert np.isin(phantom.tissue, (NECROSIS, ENHANCING, OEDEMA)).sum() > 50
    write_synthetic(tmp_path, "lgg", cases=6, seed=0, size=(6, 24, 24))
    tumour_voxels = [int(read_case(tmp_path / f"TCGA_SY_{i:04d}_19990101").label.sum()) for i in range(1, 7)]
    assert tumour_voxels[5] == 0 and all(v > 0 for v in tumour_voxels[:5])
