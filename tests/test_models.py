"""The model zoo: shapes, size errors, exact parameter counts, gradients, seeding, stages, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mriseg.errors import MrisegError
from mriseg.models import MODELS, build_model, count_parameters, count_running_stats

# name -> (spatial_dims, small options, a tiny input size the model accepts, one it refuses)
SMALL = {
    "unet": (2, {"features": 4}, (32, 32), (32, 24)),
    "unet-3d": (3, {"features": 2}, (16, 16, 16), (16, 16, 12)),
    "unet3d": (3, {"features": 2}, (16, 16, 16), (16, 12, 16)),
    "tiny3d": (3, {}, (16, 16, 7), (16, 16, 8)),
}


def model_name(key: str) -> str:
    return key.removesuffix("-3d")


def small_model(key: str, in_channels: int = 2, out_channels: int = 3) -> torch.nn.Module:
    spatial_dims, options, _, _ = SMALL[key]
    return build_model(model_name(key), in_channels, out_channels, spatial_dims=spatial_dims, **options)


def test_every_registered_model_has_a_small_configuration():
    assert {model_name(key) for key in SMALL} == set(MODELS)


@pytest.mark.parametrize("key", SMALL)
def test_output_has_input_size_and_out_channels(key):
    torch.manual_seed(0)
    model = small_model(key).eval()
    size = SMALL[key][2]
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


@pytest.mark.parametrize("key", SMALL)
def test_a_size_the_model_cannot_take_is_a_clear_error(key):
    model = small_model(key)
    with pytest.raises(MrisegError, match=model_name(key)) as error:
        model(torch.randn(1, 2, *SMALL[key][3]))
    assert "would work" in str(error.value)


def test_wrong_channel_count_and_rank_are_clear_errors():
    model = small_model("unet")
    with pytest.raises(MrisegError, match="expected 2 input channels, got 3"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(MrisegError, match="4-D input"):
        model(torch.randn(1, 2, 16, 32, 32))


def test_unknown_model_dims_or_option_are_clear_errors():
    with pytest.raises(MrisegError, match="unknown model 'vnet'"):
        build_model("vnet", 1, 1)
    with pytest.raises(MrisegError, match="3D only"):
        build_model("unet3d", 1, 1, spatial_dims=2)
    with pytest.raises(MrisegError, match="no option depth"):
        build_model("unet", 1, 1, depth=5)


def test_unet_has_exactly_the_buda_parameter_count():
    assert count_parameters(build_model("unet", 3, 1, features=32)) == 7_763_041


def test_unet3d_has_exactly_the_seed_parameter_count():
    assert count_parameters(build_model("unet3d", 3, 3, spatial_dims=3, features=32)) == 19_077_859


def test_tiny3d_counts_match_the_seed_table():
    model = build_model("tiny3d", 4, 1, spatial_dims=3)
    assert count_parameters(model) == 153_149
    assert count_running_stats(model) == 888

    def keras_count(prefix: str) -> int:  # Keras counts BN running statistics as parameters
        stages = [stage for name, stage in model.pipeline_stages() if name.startswith(prefix)]
        return sum(count_parameters(stage) + count_running_stats(stage) for stage in stages)

    assert keras_count("enc") == 32_664
    assert keras_count("dec") == 121_373


def test_tiny3d_reproduces_the_seed_shapes_on_a_reduced_volume():
    # 240x240x155 scaled down keeping the size rule: every seed layer's arithmetic still applies
    model = build_model("tiny3d", 4, 1, spatial_dims=3).eval()
    carry = (torch.randn(1, 4, 24, 24, 11),)
    shapes = []
    with torch.no_grad():
        for _, stage in model.pipeline_stages():
            carry = stage(carry)
            shapes.append(tuple(carry[0].shape[1:]))
    # enc1: 16 x (H-2, W-2, D-1); enc2: stride 2; enc3: pooled (2, 2, 1); dec: back to the input
    assert shapes[:3] == [(16, 22, 22, 10), (32, 10, 10, 5), (64, 2, 2, 3)]
    assert shapes[-1] == (1, 24, 24, 11)


def test_unet_original_variant_maps_572_to_388():
    model = build_model("unet", 1, 2, variant="original", features=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize("key", SMALL)
def test_stages_chain_to_the_model_output(key):
    torch.manual_seed(0)
    model = small_model(key).eval()
    x = torch.randn(1, 2, *SMALL[key][2])
    stages = model.pipeline_stages()
    names = [name for name, _ in stages]
    assert all(name.startswith(("enc", "bottleneck", "dec")) for name in names)
    assert names[0].startswith("enc") and names[-1].startswith("dec")
    with torch.no_grad():
        carry = (x,)
        for _, stage in stages:
            carry = stage(carry)
            assert isinstance(carry, tuple) and all(isinstance(t, torch.Tensor) for t in carry)
        assert len(carry) == 1
        assert torch.equal(carry[0], model(x))


@pytest.mark.parametrize("key", SMALL)
def test_every_parameter_receives_a_gradient(key):
    torch.manual_seed(0)
    model = small_model(key).train()
    out = model(torch.randn(2, 2, *SMALL[key][2]))
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("key", SMALL)
def test_same_seed_gives_same_initial_weights(key):
    torch.manual_seed(7)
    first = small_model(key).state_dict()
    torch.manual_seed(7)
    second = small_model(key).state_dict()
    torch.manual_seed(8)
    third = small_model(key).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def synthetic_batch(spatial_size: tuple[int, ...], channels: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images with a bright blob (the target) in different places, plus noise."""
    generator = torch.Generator().manual_seed(0)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial_size], indexing="ij")
    targets = []
    for centre_fraction in (0.35, 0.6):
        distance = sum(((g - centre_fraction * s) / (0.22 * s)) ** 2 for g, s in zip(grids, spatial_size))
        targets.append((distance < 1).float())
    target = torch.stack(targets)[:, None]
    image = target.repeat(1, channels, *[1] * len(spatial_size))
    image = image + 0.3 * torch.randn(image.shape, generator=generator)
    return image, target


def dice_score(logits: torch.Tensor, target: torch.Tensor) -> float:
    predicted = (logits > 0).float()
    return float(2 * (predicted * target).sum() / (predicted.sum() + target.sum()))


def soft_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits)
    dice = 2 * (probability * target).sum() / (probability.sum() + target.sum() + 1e-6)
    return F.binary_cross_entropy_with_logits(logits, target) + 1 - dice


@pytest.mark.parametrize("key", [key for key in SMALL if not key.endswith("-3d")])
def test_model_overfits_one_small_batch(key):
    torch.manual_seed(0)
    spatial_size = SMALL[key][2]
    image, target = synthetic_batch(spatial_size)
    model = small_model(key, out_channels=1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    best = 0.0
    for _ in range(150):
        optimizer.zero_grad()
        logits = model(image)
        soft_dice_bce(logits, target).backward()
        optimizer.step()
        best = max(best, dice_score(logits.detach(), target))
        if best > 0.9:
            break
    assert best > 0.9


def test_models_command_lists_the_registry_with_computed_counts():
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mriseg", "models", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert set(entries) == set(MODELS)
    assert entries["unet"]["parameters"] == 7_763_041
    assert entries["unet"]["dims"] == [2, 3]
    assert "features" in entries["unet"]["options"] and "variant" in entries["unet"]["options"]
    table = subprocess.run([sys.executable, "-m", "mriseg", "models"], capture_output=True, text=True)
    assert table.returncode == 0 and "7,763,041" in table.stdout
