"""Preprocessing: nearest resize against the seeds' index formula, normalisation, crop and its inverse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mriseg.data.case import Case
from mriseg.data.preprocess import (PreprocessParams, background_values, normalise, parse_label_map,
                                    parse_size, preprocess_case, resize_nearest, restore_to_source,
                                    target_shape)
from mriseg.errors import MrisegError


def loop_resize(image: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """The seeds' per-voxel loop, the reference for the vectorised resize."""
    out = np.zeros(out_shape, dtype=image.dtype)
    for i in range(out_shape[0]):
        for j in range(out_shape[1]):
            for k in range(out_shape[2]):
                out[i, j, k] = image[i * image.shape[0] // out_shape[0], j * image.shape[1] // out_shape[1],
                                     k * image.shape[2] // out_shape[2]]
    return out


@settings(max_examples=40, deadline=None)
@given(in_shape=st.tuples(*[st.integers(1, 9)] * 3), out_shape=st.tuples(*[st.integers(1, 9)] * 3),
       seed=st.integers(0, 2**16))
def test_resize_matches_the_index_formula(in_shape, out_shape, seed):
    image = np.random.default_rng(seed).normal(size=in_shape).astype(np.float32)
    np.testing.assert_array_equal(resize_nearest(image, out_shape), loop_resize(image, out_shape))


def test_resize_keeps_leading_channel_axis_and_selected_axes():
    image = np.random.default_rng(0).normal(size=(2, 5, 7, 6))
    out = resize_nearest(image, (3, 4), axes=(1, 3))
    assert out.shape == (2, 3, 7, 4)
    np.testing.assert_array_equal(out[1], loop_resize(image[1], (3, 7, 4)))


def test_2d_size_applies_in_plane_and_keeps_the_slice_axis():
    assert target_shape((20, 64, 48), (32, 32), slice_axis=0) == (20, 32, 32)
    assert target_shape((240, 240, 155), (128, 128), slice_axis=2) == (128, 128, 155)
    assert target_shape((240, 240, 155), (128, 128, 96), slice_axis=2) == (128, 128, 96)
    with pytest.raises(MrisegError):
        target_shape((64, 64), (8, 8, 8), slice_axis=None)


@pytest.mark.parametrize("method", ["zscore", "minmax", "max", "percentile"])
@pytest.mark.parametrize("fill", [0.0, 5.0, -3.2])
def test_constant_or_empty_channels_never_give_nan(method, fill):
    image = np.full((2, 4, 5, 6), fill, dtype=np.float32)
    out = normalise(image, method, background_values(image))
    expected = np.sign(fill) if method == "max" else 0.0  # x / max|x| of a constant is its sign
    assert np.isfinite(out).all() and (out == expected).all()


def test_zscore_is_over_the_brain_and_zeroes_a_constant_nonzero_background():
    rng = np.random.default_rng(1)
    image = np.full((1, 20, 20, 20), -3.19, dtype=np.float32)  # like the real z-scored BraTS cases
    image[0, 5:15, 5:15, 5:15] = rng.normal(100, 7, (10, 10, 10))
    background = background_values(image)
    assert background[0] == pytest.approx(-3.19)
    out = normalise(image, "zscore", background)
    brain = out[0, 5:15, 5:15, 5:15]
    assert brain.mean() == pytest.approx(0, abs=1e-4) and brain.std() == pytest.approx(1, abs=1e-3)
    outside = out.copy()
    outside[0, 5:15, 5:15, 5:15] = 0
    assert not outside.any()


def test_minmax_max_and_percentile_ranges():
    image = np.random.default_rng(2).normal(50, 10, (1, 8, 8, 8)).astype(np.float32)
    background = np.zeros(1, dtype=np.float32)
    minmax = normalise(image, "minmax", background)
    assert minmax.min() == 0 and minmax.max() == pytest.approx(1)
    assert np.abs(normalise(image, "max", background)).max() == pytest.approx(1)
    percentile = normalise(image, "percentile", background)
    assert percentile.min() == 0 and percentile.max() == pytest.approx(1)


def _volume_case() -> Case:
    rng = np.random.default_rng(4)
    image = np.zeros((2, 16, 20, 12), dtype=np.float32)
    image[:, 3:13, 4:18, 2:10] = rng.normal(10, 2, (2, 10, 14, 8))
    label = np.zeros((16, 20, 12), dtype=np.uint8)
    label[6:9, 8:12, 4:7] = 3
    label[7:9, 9:11, 5:7] = 4
    return Case(case_id="v", image=image, label=label, spacing=(1.0, 1.0, 2.0), affine=np.eye(4),
                modalities=["a", "b"], layout="brats", slice_axis=2)


def test_preprocess_crops_resizes_remaps_and_records():
    params = PreprocessParams(size=(8, 8), crop=True, label_map={3: 1}, dtype="float32")
    image, label, record = preprocess_case(_volume_case(), params)
    assert record["crop_box"] == [[3, 13], [4, 18], [2, 10]]
    assert image.shape == (2, 8, 8, 8) and image.dtype == np.float32  # slice axis 2 kept at 8 after the crop
    assert label.dtype == np.uint8 and record["label_values"] == [0, 1, 4]
    assert record["label_values_original"] == [0, 3, 4]
    assert record["original_shape"] == [16, 20, 12] and record["shape"] == [8, 8, 8]


def test_restore_to_source_inverts_crop_and_resize():
    case = _volume_case()
    params = PreprocessParams(size=(10, 10, 8), crop=True)
    _, label, record = preprocess_case(case, params)
    restored = restore_to_source(label, record)
    assert restored.shape == case.label.shape
    # Upsampling a nearest-downsampled mask cannot recover every voxel, but it lands on the
    # same region: everything outside the crop box is background.
    assert restored[:3].sum() == 0 and restored[13:].sum() == 0
    same = PreprocessParams(crop=True)
    _, label_same, record_same = preprocess_case(case, same)
    np.testing.assert_array_equal(restore_to_source(label_same, record_same), case.label)
    probabilities = np.stack([label_same == 0, label_same > 0]).astype(np.float32)
    back = restore_to_source(probabilities, record_same, fill=(1.0, 0.0))
    assert back.shape == (2, 16, 20, 12)
    np.testing.assert_array_equal(back.argmax(0) > 0, case.label > 0)


def test_params_round_trip_and_parsing():
    params = PreprocessParams(size=parse_size("128,128"), crop=True, norm="percentile",
                              label_map=parse_label_map("3:1,5:0"), dtype="float32")
    assert PreprocessParams.from_dict(params.to_dict()) == params
    with pytest.raises(MrisegError):
        parse_label_map("3-1")
    with pytest.raises(MrisegError):
        PreprocessParams(norm="l2")
    with pytest.raises(MrisegError):
        parse_size("12,a")
