"""The model zoo: shapes, size errors, exact parameter counts, gradients, seeding, stages, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mriseg.errors import MrisegError
from mriseg.models import MODELS, build_model, count_parameters, count_running_stats

# name -> (spatial_dims, small options, a tiny input size the model accepts, one it refuses)
SMALL = {
    "unet": (2, {"features": 4}, (32, 32), (32, 24)),
    "unet-3d": (3, {"features": 2}, (16, 16, 16), (16, 16, 12)),
    "attention-unet": (2, {"features": 4}, (32, 32), (40, 32)),
    "attention-unet-3d": (3, {"features": 2}, (16, 16, 16), (16, 16, 8)),
    "resunet": (2, {"features": 8}, (32, 32), (48, 32)),
    "unetpp": (2, {"features": 4}, (32, 32), (32, 20)),
    "unetpp-3d": (3, {"features": 2}, (16, 16, 16), (16, 16, 24)),
    "unet3d": (3, {"features": 2}, (16, 16, 16), (16, 12, 16)),
    "gruunet": (2, {"features": 4}, (32, 32), (32, 16)),
    "gruunet-3d": (3, {"features": 1}, (32, 32, 32), (32, 32, 48)),
    "tiny3d": (3, {}, (16, 16, 7), (16, 16, 8)),
}


# the 3D runs of 2D-first models only check shapes and size errors (the code is the same)
MAIN_KEYS = [key for key in SMALL if not key.endswith("-3d")]


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
def test_size_rules_hold_axis_by_axis(key):
    """Training picks the largest patch a model takes axis by axis: each rule must say which sizes."""
    rule = small_model(key).size_rule
    rank = len(SMALL[key][2])
    rng = np.random.default_rng(0)
    for size in map(tuple, rng.integers(1, 300, size=(300, rank))):
        assert (rule(size) is None) == all(rule.axis_ok(axis, n) for axis, n in enumerate(size))


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
    with pytest.raises(MrisegError, match="variant"):
        build_model("unet", 1, 1, variant="nested")
    with pytest.raises(MrisegError, match="eval_output"):
        build_model("unetpp", 1, 1, eval_output="max")
    with pytest.raises(MrisegError, match="no option depth"):
        build_model("unet", 1, 1, depth=5)


def test_unet_has_exactly_the_buda_parameter_count():
    assert count_parameters(build_model("unet", 3, 1, features=32)) == 7_763_041


def test_unet3d_has_exactly_the_seed_parameter_count():
    assert count_parameters(build_model("unet3d", 3, 3, spatial_dims=3, features=32)) == 19_077_859


def test_resunet_encoder_is_resnet34_without_fc():
    model = build_model("resunet", 3, 1)
    encoder = [stage for name, stage in model.pipeline_stages() if not name.startswith("dec")]
    assert sum(count_parameters(stage) for stage in encoder) == 21_284_672


def torchvision_style_resnet34_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet-34 key names, built from our encoder plus an fc layer."""
    from mriseg.models.resunet import TORCHVISION_PREFIXES

    state = {}
    for key, value in model.state_dict().items():
        for torchvision_prefix, our_prefix in TORCHVISION_PREFIXES.items():
            if key.startswith(our_prefix):
                state[torchvision_prefix + key[len(our_prefix):]] = torch.randn_like(value.float()).to(value.dtype)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state


def test_resunet_loads_local_torchvision_weights_for_any_channel_count(tmp_path):
    torch.manual_seed(0)
    state = torchvision_style_resnet34_state(build_model("resunet", 3, 1))
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    rgb = build_model("resunet", 3, 1, encoder_weights=str(path))
    assert torch.equal(rgb.state_dict()["stages.enc3.block.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert torch.equal(rgb.state_dict()["stages.enc1.block.conv1.weight"], state["conv1.weight"])
    four = build_model("resunet", 4, 1, encoder_weights=str(path))
    stem = four.state_dict()["stages.enc1.block.conv1.weight"]
    assert stem.shape == (64, 4, 7, 7)
    # a grey image gives the same stem response as with the RGB filters
    assert torch.allclose(stem.sum(dim=1), state["conv1.weight"].sum(dim=1), atol=1e-5)


def test_resunet_refuses_a_file_that_is_not_resnet34(tmp_path):
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("hello")
    with pytest.raises(MrisegError, match="notes.pth"):
        build_model("resunet", 3, 1, encoder_weights=str(not_weights))
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, partial)
    with pytest.raises(MrisegError, match="weights missing"):
        build_model("resunet", 3, 1, encoder_weights=str(partial))
    with pytest.raises(MrisegError, match="no such file"):
        build_model("resunet", 3, 1, encoder_weights=str(tmp_path / "absent.pth"))


def test_attention_gate_coefficients_are_in_unit_interval_with_the_skip_shape():
    torch.manual_seed(0)
    model = small_model("attention-unet").eval()
    x = torch.randn(2, 2, 32, 32)
    decoder = dict(model.pipeline_stages())["dec2"].up_concat
    carry = (x,)
    with torch.no_grad():
        for name, stage in model.pipeline_stages():
            if name == "dec2":
                break
            carry = stage(carry)
        up = decoder.up(carry[0])
        skip = carry[-1]
        alpha = decoder.gate.coefficients(up, skip)
    assert alpha.shape == (2, 1, *skip.shape[2:])
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    assert float(alpha.std()) > 0  # a real map, not a constant


def test_unetpp_returns_every_head_in_training_and_mean_or_last_in_eval():
    torch.manual_seed(0)
    model = small_model("unetpp", out_channels=1)
    x = torch.randn(2, 2, 32, 32)
    heads = model.train()(x)
    assert isinstance(heads, list) and len(heads) == 4 and all(h.shape == (2, 1, 32, 32) for h in heads)
    last = build_model("unetpp", 2, 1, features=4, eval_output="last")
    last.load_state_dict(model.state_dict())
    model.eval()
    last.eval()
    with torch.no_grad():
        nodes = model_nodes(model, x)
        expected = [head(nodes[f"x0{j}"]) for j, head in enumerate(model.stages["dec4"].heads, start=1)]
        assert torch.allclose(model(x), torch.stack(expected).mean(dim=0), atol=1e-5)
        assert torch.allclose(last(x), expected[-1], atol=1e-5)
    single = build_model("unetpp", 2, 1, features=4, deep_supervision=False)
    assert single.train()(x).shape == (2, 1, 32, 32)


def model_nodes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every U-Net++ node by name, from the carry before the last stage."""
    carry = (x,)
    stages = model.pipeline_stages()
    for _, stage in stages[:-1]:
        carry = stage(carry)
    last = stages[-1][1]
    nodes = dict(zip(last.in_names, carry))
    nodes["x04"] = last.nodes["x04"]([nodes[f"x0{j}"] for j in range(4)], nodes["x13"])
    return nodes


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


@pytest.mark.parametrize("key", MAIN_KEYS)
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


@pytest.mark.parametrize("key", MAIN_KEYS)
def test_every_parameter_receives_a_gradient(key):
    torch.manual_seed(0)
    model = small_model(key).train()
    out = model(torch.randn(2, 2, *SMALL[key][2]))
    outputs = out if isinstance(out, list) else [out]  # unetpp: every deep-supervision head
    sum(o.square().mean() for o in outputs).backward()
    # connected to the loss; a value can be exactly 0 where a batch norm follows (gruunet's merge shift)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert missing == []
    nonzero = sum(p.numel() for p in model.parameters() if p.grad.abs().sum() > 0)
    assert nonzero > 0.95 * count_parameters(model)


@pytest.mark.parametrize("key", MAIN_KEYS)
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


@pytest.mark.parametrize("key", MAIN_KEYS)
def test_model_overfits_one_small_batch(key):
    torch.manual_seed(0)
    spatial_size = SMALL[key][2]
    image, target = synthetic_batch(spatial_size)
    model = small_model(key, out_channels=1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    best = 0.0
    for _ in range(150):
        optimizer.zero_grad()
        output = model(image)
        heads = output if isinstance(output, list) else [output]  # unetpp: every deep-supervision head
        (sum(soft_dice_bce(logits, target) for logits in heads) / len(heads)).backward()
        optimizer.step()
        best = max(best, dice_score(heads[-1].detach(), target))
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
