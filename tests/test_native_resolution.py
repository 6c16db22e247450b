"""A crop-only cache (native resolution: every case its own odd size) trains, validates and predicts
with every model in every dimensionality it has, and masks come back on each case's source grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mriseg.data.cache import build_cache
from mriseg.data.preprocess import PreprocessParams
from mriseg.data.synthetic import write_synthetic
from mriseg.models.registry import MODELS
from mriseg.predict import PredictOptions, predict
from mriseg.train import train

CASES = [(name, dims) for name, spec in MODELS.items() for dims in spec.dims]


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    write_synthetic(root / "raw", layout="brats", cases=3, seed=2, size=(41, 37, 23))
    build_cache(root / "raw", root / "cache", PreprocessParams(crop=True))
    shapes = {tuple(r["shape"]) for r in json.loads((root / "cache" / "manifest.json").read_text())["cases"].values()}
    assert len(shapes) == 3 and all(n % 16 for shape in shapes for n in shape)  # odd sizes, each case its own
    return root


@pytest.mark.parametrize("model,dims", CASES, ids=[f"{m}-{d}d" for m, d in CASES])
def test_every_model_trains_and_predicts_on_a_crop_only_cache(native_cache, tmp_path, model, dims):
    options = {"features": 4} if model not in ("tiny3d",) else {}
    summary = train(native_cache / "cache", model=model, out=tmp_path / "run", spatial_dims=dims, epochs=1,
                    steps_per_epoch=2, batch_size=2, device="cpu", model_options=options, amp=False)
    assert summary["validated"] and np.isfinite(summary["best_val_dice_mean"])
    case = sorted((native_cache / "raw").iterdir())[0]
    results = predict([str(case)], tmp_path / "run", PredictOptions(out=tmp_path / "pred", device="cpu", tta=False))
    assert [r.error for r in results] == [None]
    written = nib.load(str(next((tmp_path / "pred").glob("*.nii.gz"))))
    assert written.shape == nib.load(str(next(case.glob("*_flair.nii.gz")))).shape


def test_a_valid_convolution_unet_trains_on_native_slices_with_inference_padding(native_cache, tmp_path):
    """The 2015 U-Net's output is 184 px smaller than its input: training windows cover the largest
    slice plus that margin, padded half before the data as inference pads (tumour at the slice's
    edge is learned, not cut off)."""
    summary = train(native_cache / "cache", model="unet", out=tmp_path / "run", epochs=1, steps_per_epoch=1,
                    batch_size=1, device="cpu", model_options={"features": 2, "variant": "original"}, amp=False)
    assert summary["validated"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert all(n >= 30 + 184 for n in config["options"]["patch_size"])


def test_the_front_pad_keeps_the_data_where_the_centred_output_sees_it():
    from mriseg.train.sampling import cut_patch

    label = np.arange(1, 26, dtype=np.uint8).reshape(5, 5)
    image = label[None].astype(np.float32)
    rng = np.random.default_rng(0)
    _, cut, _ = cut_patch(image, label, None, (9, 9), np.zeros((0, 2), int), 0.0, rng, front=2)
    np.testing.assert_array_equal(cut[2:7, 2:7], label)  # a 4-voxel margin: the output's 5x5 centre
    assert cut[:2].sum() == 0 and cut[:, :2].sum() == 0
