"""Property tests (hypothesis) for the arithmetic everything else trusts, beyond those beside each module:
the preprocessing round trip predict relies on, normalisation, metric identities, and how training
shards batches across processes and splits patients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mriseg.data.case import Case
from mriseg.data.preprocess import (PreprocessParams, background_values, normalise, preprocess_case,
                                    restore_to_source)
from mriseg.evaluate import score_masks
from mriseg.train import StepBatches, TrainOptions, split_cases

shapes_3d = st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9))


# --- resize and crop, forth and back --------------------------------------------------------


@st.composite
def labelled_case(draw) -> Case:
    """A 3D case whose label sits inside a box of brain (non-zero image) voxels."""
    shape = draw(shapes_3d)
    start = [draw(st.integers(0, n - 1)) for n in shape]
    stop = [draw(st.integers(s + 1, n)) for s, n in zip(start, shape)]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    image = np.zeros((1, *shape), dtype=np.float32)
    image[(0, *box)] = rng.uniform(1, 2, size=[b - a for a, b in zip(start, stop)])
    label = np.zeros(shape, dtype=np.uint8)
    label[box] = rng.integers(0, 3, size=[b - a for a, b in zip(start, stop)])
    return Case(case_id="c", image=image, label=label, spacing=(1.0, 1.0, 1.0), slice_axis=2)


@settings(max_examples=40, deadline=None)
@given(case=labelled_case(), factors=st.tuples(*[st.integers(1, 3)] * 3), crop=st.booleans())
def test_upsampling_then_restoring_gives_the_label_back(case, factors, crop):
    """With integer zoom factors the nearest-neighbour round trip (and the crop undone) is exact."""
    cropped = preprocess_case(case, PreprocessParams(crop=crop))[2]["cropped_shape"]
    size = tuple(n * f for n, f in zip(cropped, factors))
    _, label, record = preprocess_case(case, PreprocessParams(size=size, crop=crop))
    assert label.shape == size
    np.testing.assert_array_equal(restore_to_source(label, record), case.label)


@settings(max_examples=40, deadline=None)
@given(case=labelled_case(), size=shapes_3d, crop=st.booleans(), channels=st.integers(1, 3))
def test_restoring_always_lands_on_the_source_grid(case, size, crop, channels):
    _, label, record = preprocess_case(case, PreprocessParams(size=size, crop=crop))
    assert restore_to_source(label, record).shape == case.spatial_shape
    probabilities = np.random.default_rng(0).random((channels, *size)).astype(np.float32)
    restored = restore_to_source(probabilities, record, fill=[1.0] + [0.0] * (channels - 1))
    assert restored.shape == (channels, *case.spatial_shape)
    # Every restored value is one of the values predicted, or the fill outside the crop.
    assert set(np.unique(restored[0])) <= set(np.unique(probabilities[0])) | {1.0}


# --- normalisation ----------------------------------------------------------------------------

finite_images = arrays(np.float32, st.tuples(st.integers(1, 2), st.integers(2, 6), st.integers(2, 6),
                                             st.integers(1, 4)),
                       elements=st.floats(-1e4, 1e4, width=32, allow_nan=False))


@settings(max_examples=50, deadline=None)
@given(image=finite_images, method=st.sampled_from(["zscore", "minmax", "max", "percentile"]))
def test_normalisation_is_finite_and_in_range(image, method):
    background = background_values(image)
    out = normalise(image, method, background)
    assert out.shape == image.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    if method in ("minmax", "percentile"):
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    if method == "max":
        assert np.abs(out).max() <= 1 + 1e-6
    if method in ("zscore", "percentile"):  # the background stays exactly 0
        for c in range(image.shape[0]):
            assert (out[c][image[c] == background[c]] == 0).all()


@st.composite
def varied_images(draw) -> np.ndarray:
    """Images whose every channel has spread (drawing arbitrary arrays and filtering the flat ones
    out rejected so many that hypothesis's filter health check failed at random)."""
    shape = draw(st.tuples(st.integers(1, 2), st.integers(2, 6), st.integers(2, 6), st.integers(1, 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    centre = draw(st.floats(-1e3, 1e3))
    spread = draw(st.floats(0.1, 10)) * max(1.0, abs(centre))
    return rng.normal(centre, spread, size=shape).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(image=varied_images(), scale=st.floats(0.01, 100), shift=st.floats(-100, 100))
def test_zscore_of_the_brain_is_standard_and_ignores_scale_and_shift(image, scale, shift):
    """z-score over the non-background voxels: mean 0, std 1, and the same after a*x + b (a > 0)."""
    brain = image != background_values(image).reshape(-1, 1, 1, 1)
    for c in range(image.shape[0]):
        values = image[c][brain[c]].astype(np.float64)
        assume(values.size >= 2 and values.std() > 1e-2 * max(1.0, np.abs(values).max()))
    out = normalise(image, "zscore", background_values(image))
    for c in range(image.shape[0]):
        values = out[c][brain[c]].astype(np.float64)
        assert values.mean() == pytest.approx(0, abs=1e-3) and values.std() == pytest.approx(1, abs=1e-3)
    moved = (image.astype(np.float64) * scale + shift).astype(np.float32)
    assume((moved != background_values(moved).reshape(-1, 1, 1, 1)).sum() == brain.sum())
    np.testing.assert_allclose(normalise(moved, "zscore", background_values(moved)), out, atol=2e-2)


# --- metrics --------------------------------------------------------------------------------

mask_pairs = shapes_3d.flatmap(lambda shape: st.tuples(arrays(np.bool_, shape), arrays(np.bool_, shape)))


@settings(max_examples=40, deadline=None)
@given(masks=mask_pairs, spacing=st.floats(0.2, 5.0))
def test_metric_identities(masks, spacing):
    pred, truth = masks
    unit = score_masks(pred, truth, (1.0, 1.0, 1.0))
    scaled = score_masks(pred, truth, (spacing,) * 3)
    # Overlap does not depend on the voxel size; distances scale with it, volumes with its cube.
    assert scaled.dice == unit.dice and scaled.iou == unit.iou
    if unit.hd95 is not None:
        assert scaled.hd95 == pytest.approx(unit.hd95 * spacing, rel=1e-6)
        assert scaled.assd == pytest.approx(unit.assd * spacing, rel=1e-6)
        assert 0 <= unit.assd and 0 <= unit.hd95
    assert scaled.pred_ml == pytest.approx(pred.sum() * spacing**3 / 1000)
    assert scaled.true_ml == pytest.approx(truth.sum() * spacing**3 / 1000)
    # Dice is the harmonic mean of sensitivity and precision when both are defined and non-zero.
    if unit.sensitivity and unit.precision:
        harmonic = 2 * unit.sensitivity * unit.precision / (unit.sensitivity + unit.precision)
        assert unit.dice == pytest.approx(harmonic)


# --- shards of training batches and patient splits ------------------------------------------


@settings(max_examples=50, deadline=None)
@given(steps=st.integers(0, 12), batch=st.integers(1, 6), world=st.integers(1, 5), data=st.data())
def test_step_batches_partition_the_samples_across_ranks_and_resume_exactly(steps, batch, world, data):
    per_rank = [list(StepBatches(steps, batch, rank, world)) for rank in range(world)]
    indices = [i for batches in per_rank for b in batches for i in b]
    assert sorted(indices) == list(range(steps * world * batch))  # every sample once, none twice
    assert all(len(b) == batch for batches in per_rank for b in batches)
    first = data.draw(st.integers(0, steps))
    rank = data.draw(st.integers(0, world - 1))
    resumed = StepBatches(steps, batch, rank, world, first_step=first)
    assert list(resumed) == per_rank[rank][first:] and len(resumed) == steps - first


@settings(max_examples=40, deadline=None)
@given(cases=st.integers(2, 30), seed=st.integers(0, 1000), fraction=st.floats(0.05, 0.6))
def test_validation_split_is_a_partition_by_patient(cases, seed, fraction):
    ids = [f"patient{i:02d}" for i in range(cases)]
    train_ids, val_ids = split_cases(ids, TrainOptions(seed=seed, val_fraction=fraction))
    assert set(train_ids).isdisjoint(val_ids) and sorted(train_ids + val_ids) == ids
    assert val_ids and train_ids
    assert (train_ids, val_ids) == split_cases(ids, TrainOptions(seed=seed, val_fraction=fraction))


@settings(max_examples=40, deadline=None)
@given(cases=st.integers(2, 25), folds=st.integers(2, 6), seed=st.integers(0, 1000))
def test_folds_validate_every_patient_exactly_once(cases, folds, seed):
    assume(cases >= folds)
    ids = [f"p{i}" for i in range(cases)]
    validated = [v for fold in range(folds) for v in split_cases(ids, TrainOptions(seed=seed, folds=folds,
                                                                                     fold=fold))[1]]
    assert sorted(validated) == sorted(ids)


# --- checkpoints from anywhere ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from corrupt.corpus import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "best.pt").read_bytes()


@pytest.mark.parametrize("content", [b"q\x00", b"\x80\x02q\x00.", b"PK\x03\x04" + bytes(40)],
                         ids=["memo-put-on-empty-stack", "protocol-2-memo-put", "zip-header-only"])
def test_garbage_that_makes_the_unpickler_raise_odd_errors(content, tmp_path):
    """Bytes that make torch's unpickler raise IndexError (about 6% of random 300-byte files)."""
    from mriseg.checkpoint import load_checkpoint
    from mriseg.errors import BadInputError

    (tmp_path / "best.pt").write_bytes(content)
    with pytest.raises(BadInputError, match="best.pt"):
        load_checkpoint(tmp_path / "best.pt")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_damaged_checkpoint_is_a_one_line_error(data, checkpoint_bytes, tmp_path_factory):
    """Random bytes, a cut, or flipped bytes in a real checkpoint: BadInputError, never another exception."""
    from mriseg.checkpoint import load_checkpoint
    from mriseg.errors import BadInputError

    kind = data.draw(st.sampled_from(["random", "cut", "flipped"]))
    if kind == "random":
        content = data.draw(st.binary(max_size=2000))
    elif kind == "cut":
        content = checkpoint_bytes[: data.draw(st.integers(0, len(checkpoint_bytes) - 1))]
    else:
        content = bytearray(checkpoint_bytes)
        for position in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=8)):
            content[position] ^= 0xFF
        content = bytes(content)
    path = tmp_path_factory.mktemp("damaged") / "best.pt"
    path.write_bytes(content)
    try:
        load_checkpoint(path)
    except BadInputError as error:
        assert "best.pt" in str(error) and "\n" not in str(error)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_flipped_bits_in_the_weights_are_refused_not_loaded(data, checkpoint_bytes, tmp_path_factory):
    """torch.load does not check the archive's CRC-32s: a bit flipped inside a stored tensor would
    load and predict with damaged weights. Every such flip must be refused."""
    import io
    import zipfile

    from mriseg.checkpoint import load_checkpoint
    from mriseg.errors import BadInputError

    with zipfile.ZipFile(io.BytesIO(checkpoint_bytes)) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename and info.file_size]
    member = data.draw(st.sampled_from(tensors))
    # a stored member's bytes follow its 30-byte local header, its name and its extra field
    header = checkpoint_bytes[member.header_offset:member.header_offset + 30]
    start = member.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    position = start + data.draw(st.integers(0, member.file_size - 1))
    content = bytearray(checkpoint_bytes)
    content[position] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path_factory.mktemp("flipped") / "best.pt"
    path.write_bytes(bytes(content))
    with pytest.raises(BadInputError, match="best.pt.*checksum"):
        load_checkpoint(path)
