"""Each loss against values worked out by hand on tiny tensors.

Sigmoid case: logits 0 everywhere (p = 0.5), target [[1, 0], [1, 0]].
Softmax case: two voxels with logits [0, ln 3] (p = [1/4, 3/4]), targets [1, 0].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mriseg.errors import MrisegError
from mriseg.losses import LOSS_NAMES, border_weight_map, build_loss, deep_supervision_loss

LN2 = math.log(2)
CE_RIGHT = -math.log(0.75)  # voxel whose target is class 1, p = 3/4
CE_WRONG = math.log(4)      # voxel whose target is class 0, p = 1/4


@pytest.fixture
def sigmoid_case():
    return torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])


@pytest.fixture
def softmax_case():
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3), math.log(3)]]]])  # (1, 2, 1, 2)
    return logits, torch.tensor([[[1, 0]]])


def value(name, logits, target, activation, **kwargs):
    pixel_weights = kwargs.pop("pixel_weights", None)
    return build_loss(name, activation, **kwargs)(logits, target, pixel_weights).item()


# sigmoid: intersection 1, |P| 2, |Y| 2
@pytest.mark.parametrize("name, expected", [
    ("dice", 1 - 3 / 5),                          # (2*1 + 1) / (2 + 2 + 1)
    ("soft-iou", 1 - 2 / 4),                      # (1 + 1) / (2 + 2 - 1 + 1)
    ("bce", LN2),
    ("ce", LN2),
    ("bce-dice", 0.5 * LN2 + 0.5 * 0.4),
    ("dice-ce", LN2 + 0.4),
    ("focal", 0.25 * LN2),                        # (1 - 0.5)^2 * ln 2
])
def test_sigmoid_losses(sigmoid_case, name, expected):
    assert value(name, *sigmoid_case, "sigmoid") == pytest.approx(expected, abs=1e-6)


def test_bce_dice_weight(sigmoid_case):
    assert value("bce-dice", *sigmoid_case, "sigmoid", bce_weight=0.2) == pytest.approx(0.2 * LN2 + 0.8 * 0.4)


# softmax foreground channel: p1 = [3/4, 3/4], y1 = [1, 0]: intersection 3/4, |P| 3/2, |Y| 1
@pytest.mark.parametrize("name, expected", [
    ("ce", (CE_RIGHT + CE_WRONG) / 2),
    ("dice", 1 - 2.5 / 3.5),
    ("soft-iou", 1 - 1.75 / 2.75),                # (3/4 + 1) / (3/2 + 1 - 3/4 + 1)
    ("dice-ce", (CE_RIGHT + CE_WRONG) / 2 + 1 - 2.5 / 3.5),
    ("focal", (0.25 ** 2 * CE_RIGHT + 0.75 ** 2 * CE_WRONG) / 2),
])
def test_softmax_losses(softmax_case, name, expected):
    assert value(name, *softmax_case, "softmax") == pytest.approx(expected, abs=1e-6)


def test_ignore_index_drops_voxels(softmax_case):
    logits, _ = softmax_case
    target = torch.tensor([[[1, 255]]])
    assert value("ce", logits, target, "softmax", ignore_index=255) == pytest.approx(CE_RIGHT)
    # only the first voxel counts: intersection 3/4, |P| 3/4, |Y| 1
    assert value("dice", logits, target, "softmax", ignore_index=255) == pytest.approx(1 - 2.5 / 2.75)


def test_border_ce_weights_each_voxel(softmax_case):
    weights = torch.tensor([[[2.0, 1.0]]])
    got = value("border-ce", *softmax_case, "softmax", pixel_weights=weights)
    assert got == pytest.approx((2 * CE_RIGHT + CE_WRONG) / 2)


def test_border_weight_map_matches_the_paper_formula():
    label = np.array([[1, 0, 0, 0, 0, 0, 1]])
    weights = border_weight_map(label, w0=10, sigma=5)
    class_background, class_tumour = 7 / (2 * 5), 7 / (2 * 2)
    assert weights[0, 0] == pytest.approx(class_tumour)
    # background voxel 1: d1 = 1, d2 = 5; voxel 3: d1 = d2 = 3; both (d1 + d2)^2 = 36
    border = 10 * math.exp(-36 / 50)
    assert weights[0, 1] == pytest.approx(class_background + border, rel=1e-5)
    assert weights[0, 3] == pytest.approx(class_background + border, rel=1e-5)
    # voxel 2: d1 = 2, d2 = 4, the same sum
    assert weights[0, 2] == pytest.approx(class_background + border, rel=1e-5)


def test_border_weight_map_single_component_has_class_weights_only():
    label = np.array([[0, 1, 1, 0]])
    assert border_weight_map(label).tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_deep_supervision_averages_full_resolution_heads_and_halves_lower_ones(sigmoid_case):
    logits, target = sigmoid_case
    loss = build_loss("dice", "sigmoid")
    confident = torch.where(target > 0, 10.0, -10.0)
    # U-Net++'s heads are all full resolution: the paper averages them (X0,4, the whole network,
    # must not get 1/15 of the loss)
    expected = 0.5 * loss(logits, target).item() + 0.5 * loss(confident, target).item()
    assert deep_supervision_loss(loss, [logits, confident], target).item() == pytest.approx(expected, abs=1e-6)
    # heads of falling resolution get 2/3 and 1/3 (nnU-Net's halving), the half-resolution head upsampled
    low_res = torch.zeros(1, 1, 1, 1)
    expected = (2 / 3) * loss(logits, target).item() + (1 / 3) * loss(torch.zeros_like(logits), target).item()
    assert deep_supervision_loss(loss, [logits, low_res], target).item() == pytest.approx(expected, abs=1e-6)


def test_unetpp_heads_get_equal_weight_in_training():
    from mriseg.models import build_model

    torch.manual_seed(0)
    model = build_model("unetpp", 1, 1, spatial_dims=2, features=2).train()
    image, target = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    heads = model(image)
    loss = build_loss("bce", "sigmoid")
    expected = sum(loss(head, target) for head in heads) / len(heads)
    torch.testing.assert_close(deep_supervision_loss(loss, heads, target), expected)


def test_perfect_prediction_gives_near_zero_loss(sigmoid_case):
    _, target = sigmoid_case
    confident = torch.where(target > 0, 20.0, -20.0)
    for name in ("dice", "bce", "bce-dice", "soft-iou", "focal"):
        assert value(name, confident, target, "sigmoid") < 1e-6


def test_every_loss_has_a_gradient(softmax_case):
    logits, target = softmax_case
    for name in LOSS_NAMES:
        if name == "bce":
            continue
        leaf = logits.clone().requires_grad_(True)
        weights = torch.ones(1, 1, 2) if name == "border-ce" else None
        build_loss(name, "softmax")(leaf, target, weights).backward()
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_bad_names_are_user_errors():
    with pytest.raises(MrisegError, match="unknown loss"):
        build_loss("hinge", "sigmoid")
    with pytest.raises(MrisegError, match="sigmoid task"):
        build_loss("bce", "softmax")
