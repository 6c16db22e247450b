"""Augmentation: exact flips, label values preserved, reproducible, 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from mriseg.augment import NO_AUGMENTATION, AugmentConfig, augment_batch, parse_augment
from mriseg.errors import MrisegError


def batch(spatial=(16, 20), count=6):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 2, *spatial, generator=generator)
    labels = torch.randint(0, 3, (count, *spatial), generator=generator)
    labels[:, 0] = 255  # an ignore value must survive resampling too
    return images, labels


def test_flip_only_is_an_exact_mirror_or_identity():
    images, labels = batch()
    config = AugmentConfig(flip=True, rotate_degrees=0, scale=0, intensity_shift=0, intensity_scale=0)
    out_images, out_labels, _ = augment_batch(images, labels, config, torch.Generator().manual_seed(1))
    flipped = 0
    for index in range(len(images)):
        if torch.equal(out_labels[index], labels[index].flip(-1)):
            torch.testing.assert_close(out_images[index], images[index].flip(-1))
            flipped += 1
        else:
            assert torch.equal(out_labels[index], labels[index])
            torch.testing.assert_close(out_images[index], images[index])
    assert 0 < flipped < len(images)


@pytest.mark.parametrize("spatial", [(16, 20), (8, 12, 10)])
def test_labels_keep_their_values_and_shapes(spatial):
    images, labels = batch(spatial)
    weights = torch.rand(labels.shape)
    config = AugmentConfig(elastic=3.0, elastic_spacing=4)
    out_images, out_labels, out_weights = augment_batch(images, labels, config, torch.Generator().manual_seed(2),
                                                        weights=weights)
    assert out_images.shape == images.shape and out_images.dtype == images.dtype
    assert out_labels.shape == labels.shape and out_labels.dtype == labels.dtype
    assert out_weights.shape == weights.shape
    assert set(out_labels.unique().tolist()) <= {0, 1, 2, 255}
    assert not torch.equal(out_labels, labels)


def test_same_seed_same_transform():
    images, labels = batch()
    first = augment_batch(images, labels, AugmentConfig(), torch.Generator().manual_seed(3))
    second = augment_batch(images, labels, AugmentConfig(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_rotation_of_a_centred_disc_keeps_its_area():
    size = 33
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - 16) ** 2 + (xx - 16) ** 2) <= 64).long().unsqueeze(0)
    config = AugmentConfig(flip=False, rotate_degrees=15, scale=0, intensity_shift=0, intensity_scale=0)
    _, rotated, _ = augment_batch(disc.unsqueeze(1).float(), disc, config, torch.Generator().manual_seed(4))
    assert abs(rotated.sum().item() - disc.sum().item()) <= 8


def test_intensity_changes_only_the_image():
    images, labels = batch()
    config = AugmentConfig(flip=False, rotate_degrees=0, scale=0)
    out_images, out_labels, _ = augment_batch(images, labels, config, torch.Generator().manual_seed(5))
    assert torch.equal(out_labels, labels)
    assert not torch.allclose(out_images, images)


def test_parse_augment():
    assert parse_augment("default") == AugmentConfig()
    assert parse_augment("none") == NO_AUGMENTATION
    parsed = parse_augment("flip,rotate=10,elastic")
    assert parsed.flip and parsed.rotate_degrees == 10 and parsed.elastic == 4.0
    assert parsed.scale == 0 and parsed.intensity_shift == 0
    with pytest.raises(MrisegError, match="unknown transform"):
        parse_augment("mixup")
    with pytest.raises(MrisegError, match="not a number"):
        parse_augment("rotate=lots")


@pytest.mark.parametrize("spec", ["rotate=-5", "scale=2", "gain=1", "shift=nan", "elastic=inf", "dropout=1.5",
                                  "spacing=0", "default,scale=0.9"])
def test_every_range_out_of_bounds_is_one_clear_error(spec):
    name = spec.split(",")[-1].split("=")[0]
    with pytest.raises(MrisegError, match=f"--augment: {name}=.* out of range"):
        parse_augment(spec)


def test_every_value_given_is_used_or_refused_never_ignored():
    assert not parse_augment("default,flip=0").flip and not parse_augment("flip=off,rotate=5").flip
    assert parse_augment("flip=on").flip and parse_augment("flip").flip
    intensity = parse_augment("intensity=0.5")
    assert (intensity.intensity_shift, intensity.intensity_scale) == (0.5, 0.5)
    assert parse_augment("intensity") == parse_augment("shift,gain")
    for spec, match in (("flip=2", "flip takes no value"), ("intensity=much", "not a number"),
                        ("spacing=2.5", "not a whole number")):
        with pytest.raises(MrisegError, match=match):
            parse_augment(spec)


def test_default_in_a_list_adds_to_the_defaults():
    parsed = parse_augment("default,dropout")
    assert parsed == AugmentConfig(modality_dropout=0.25)
    assert parse_augment("default,dropout=0.5,rotate=0").rotate_degrees == 0


@pytest.mark.parametrize("slices", [1, 3])
def test_modality_dropout_zeroes_one_whole_modality_and_never_all(slices):
    """Drawn per sample: about p of the samples lose exactly one modality, with every one of its
    2.5D context slices (channels are blocks of the same modalities); the others are untouched."""
    count, modalities = 2000, 2
    images = torch.rand(count, modalities * slices, 4, 4) + 1.0  # never 0 before dropout
    labels = torch.zeros(count, 4, 4, dtype=torch.long)
    config = AugmentConfig(flip=False, rotate_degrees=0, scale=0, intensity_shift=0, intensity_scale=0,
                           modality_dropout=0.3)
    out, out_labels, _ = augment_batch(images, labels, config, torch.Generator().manual_seed(1), slices=slices)
    assert torch.equal(out_labels, labels)
    zero = (out == 0).all(dim=(2, 3)).view(count, slices, modalities)  # (sample, slice, modality)
    assert (zero == zero[:, :1]).all()                 # a modality goes with all its slices
    lost = zero[:, 0].sum(dim=1)
    assert lost.max() == 1                             # never more than one modality
    assert abs(lost.float().mean().item() - 0.3) < 0.04
    kept = lost == 0
    assert torch.equal(out[kept], images[kept])


def test_modality_dropout_leaves_a_single_modality_alone():
    images = torch.rand(50, 1, 4, 4) + 1.0
    config = AugmentConfig(flip=False, rotate_degrees=0, scale=0, intensity_shift=0, intensity_scale=0,
                           modality_dropout=1.0)
    out, _, _ = augment_batch(images, torch.zeros(50, 4, 4, dtype=torch.long), config, torch.Generator())
    assert torch.equal(out, images)
