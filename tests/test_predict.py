"""mriseg predict: inference engines, post-processing, writers, overlays and the command itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mriseg import viz
from mriseg.predict import (gaussian_importance_map, keep_largest_component, probabilities_to_labels,
                            regions_to_labels, slicewise_predict, sliding_window_predict, window_starts,
                            with_flips)


def position_encoder(batch: torch.Tensor) -> torch.Tensor:
    """A 'model' whose output is its input plus a marker channel: any seam or misplaced
    window in an engine shows up as a difference from the input."""
    return torch.cat([batch, batch[:, :1] * 2 + 1], dim=1)


# --- engines -------------------------------------------------------------------

@pytest.mark.parametrize("size,patch,overlap", [(10, 4, 0.5), (9, 4, 0.5), (4, 4, 0.5), (3, 8, 0.25), (100, 32, 0.75)])
def test_windows_cover_every_voxel_and_stay_inside(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(max(size, patch), dtype=bool)
    for start in starts:
        assert 0 <= start and start + patch <= max(size, patch)
        covered[start:start + patch] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts))


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    weights = gaussian_importance_map((9, 7, 5))
    assert weights.shape == (9, 7, 5)
    assert weights.argmax().item() == np.ravel_multi_index((4, 3, 2), (9, 7, 5))
    assert weights.min() >= 1e-3


@pytest.mark.parametrize("shape,patch", [((2, 20, 17, 9), (8, 8, 8)), ((1, 5, 6, 3), (8, 8, 8))])
def test_sliding_window_reproduces_a_position_exact_model(shape, patch):
    image = torch.randn(shape)
    scores = sliding_window_predict(position_encoder, image, patch, overlap=0.5, batch_size=3)
    assert scores.shape == (shape[0] + 1, *shape[1:])
    torch.testing.assert_close(scores[:shape[0]], image)
    torch.testing.assert_close(scores[shape[0]], image[0] * 2 + 1)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_slicewise_keeps_axis_order_and_crops_padding(slice_axis):
    image = torch.randn(2, 7, 9, 11)
    seen_shapes = []

    def recording(batch):
        seen_shapes.append(tuple(batch.shape[-2:]))
        return position_encoder(batch)

    scores = slicewise_predict(recording, image, slice_axis, batch_size=4)
    torch.testing.assert_close(scores[:2], image)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in seen_shapes)


def test_slicewise_on_a_single_2d_image():
    image = torch.randn(3, 40, 33)
    torch.testing.assert_close(slicewise_predict(position_encoder, image, None)[:3], image)


def test_flip_averaging_undoes_each_flip():
    image = torch.randn(1, 2, 6, 5, 4)
    torch.testing.assert_close(with_flips(position_encoder, 3)(image), position_encoder(image))


# --- post-processing -------------------------------------------------------------

def test_binary_threshold_and_multiclass_argmax():
    probabilities = np.array([[[0.2, 0.5, 0.9]]])
    assert probabilities_to_labels(probabilities, {"kind": "binary"}).tolist() == [[0, 1, 1]]
    assert probabilities_to_labels(probabilities, {"kind": "binary"}, threshold=0.6).tolist() == [[0, 0, 1]]
    scores = np.array([[0.7, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.1, 0.7]])[..., None]
    labels = probabilities_to_labels(scores, {"kind": "multiclass", "labels": [0, 2, 4]})
    assert labels[:, 0].tolist() == [0, 2, 4]


def test_brats_regions_paint_back_to_labels_1_2_4():
    regions = [[1, 2, 4], [1, 4], [4]]  # whole tumour, tumour core, enhancing
    masks = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    assert regions_to_labels(masks, regions).tolist() == [0, 2, 1, 4]
    task = {"kind": "regions", "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}}
    assert probabilities_to_labels(masks.astype(float), task).tolist() == [0, 2, 1, 4]


def test_largest_component_keeps_one_face_connected_blob():
    labels = np.zeros((5, 8), dtype=np.uint8)
    labels[0:3, 0:3] = 1
    labels[3, 3] = 2          # touches the big blob only at a corner: a separate blob
    labels[4, 6:8] = 1
    kept = keep_largest_component(labels)
    assert kept[0:3, 0:3].all() and kept.sum() == 9


# --- overlays --------------------------------------------------------------------

def test_outline_is_the_inner_border():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    expected = mask.copy()
    expected[2:5, 2:5] = False
    assert np.array_equal(viz.outline(mask), expected)


def test_binary_overlay_paints_red_prediction_and_green_truth_exactly():
    grey = np.full((20, 30), 90, dtype=np.uint8)
    predicted = np.zeros((20, 30), dtype=bool)
    predicted[3:12, 4:15] = True
    truth = np.zeros((20, 30), dtype=bool)
    truth[8:17, 10:25] = True
    picture = viz.overlay_binary(grey, predicted, truth)
    red = np.all(picture == viz.PREDICTION_COLOUR, axis=-1)
    green = np.all(picture == viz.TRUTH_COLOUR, axis=-1)
    assert np.array_equal(green, viz.outline(truth))
    assert np.array_equal(red, viz.outline(predicted) & ~viz.outline(truth))
