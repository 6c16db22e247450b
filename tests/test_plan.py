"""The plan of a ``--time`` run: chosen from the cache and the device, given options win, runs that
cannot fit are planned down or refused before the first step, and ``mriseg plan`` prints it."""

from __future__ import annotations

import json
import sys

import pytest

from mriseg.data.cache import build_cache
from mriseg.data.preprocess import PreprocessParams
from mriseg.data.synthetic import write_synthetic
from mriseg.errors import MrisegError
from mriseg.models import build_model
from mriseg.models.memory import training_step_bytes
from mriseg.train import plan_training, train


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    write_synthetic(root / "raw", layout="brats", cases=4, seed=3, size=(41, 37, 23))
    build_cache(root / "raw", root / "cache", PreprocessParams(crop=True))
    return root / "cache"


def test_the_plan_pads_native_slices_and_fits_epochs_to_the_budget(native):
    plan = plan_training(str(native), "5m", device="cpu")
    assert plan.chosen["model"] == "unet" and plan.chosen["model_options"] == {"features": 16}
    assert plan.chosen["batch_size"] == 8 and all(n % 16 == 0 for n in plan.chosen["patch_size"])
    assert plan.measured["step_seconds"] > 0 and plan.measured["steps_in_budget"] > 0
    # the budget holds at least two validations
    steps = plan.chosen["steps_per_epoch"]
    assert 2 * steps * plan.measured["step_seconds"] <= 300


def test_given_options_win_over_the_plan(native):
    plan = plan_training(str(native), "5m", device="cpu", batch_size=3, patch_size=(48, 48))
    assert "batch_size" not in plan.chosen and "patch_size" not in plan.chosen
    assert "batch_size 3: given" in plan.reasons and "patch_size 48x48: given" in plan.reasons


def test_a_step_that_cannot_fit_is_planned_down_or_refused(native, monkeypatch):
    network = build_model("unet3d", 4, 3, spatial_dims=3, features=4)
    one = training_step_bytes(network, 4, (32, 32, 32), 1)
    assert training_step_bytes(network, 4, (32, 32, 32), 4) > 3 * one  # activations grow with the batch
    monkeypatch.setattr("mriseg.train.plan.free_memory", lambda device: int(1.5 * one / 0.8))
    plan = plan_training(str(native), "5m", model="unet3d", device="cpu", model_options={"features": 4},
                         patch_size=(32, 32, 32), amp=False)
    assert plan.chosen["batch_size"] == 1  # 2 patches do not fit, one does
    with pytest.raises(MrisegError, match="would need about .* GiB.*--batch-size"):
        plan_training(str(native), "5m", model="unet3d", device="cpu", model_options={"features": 4},
                      patch_size=(32, 32, 32), batch_size=2, amp=False)
    # without a given patch the plan halves the largest axis to a size the network takes
    monkeypatch.setattr("mriseg.train.plan.free_memory", lambda device: int(0.6 * one / 0.8))
    plan = plan_training(str(native), "5m", model="unet3d", device="cpu", model_options={"features": 4},
                         amp=False, batch_size=1)
    assert all(n % 8 == 0 for n in plan.chosen["patch_size"])  # unet3d takes multiples of 8


def test_slices_past_128_are_cropped_on_a_cpu_to_a_size_the_network_takes(tmp_path):
    write_synthetic(tmp_path / "raw", layout="brats", cases=3, seed=4, size=(24, 24, 6))
    build_cache(tmp_path / "raw", tmp_path / "cache", PreprocessParams(size=(160, 144)))
    plan = plan_training(str(tmp_path / "cache"), "5m", device="cpu")
    assert plan.chosen["patch_size"] == (128, 128)  # a uniform cache of 160x144 slices, cut to crops
    # the 2015 U-Net takes 124 + 16k >= 188 only: its crops are the smallest size it takes
    valid = plan_training(str(tmp_path / "cache"), "5m", device="cpu", model_options={"features": 2,
                                                                                       "variant": "original"})
    assert valid.chosen["patch_size"] == (188, 188)


def test_a_run_without_a_plan_that_cannot_fit_is_refused_before_its_first_step(native, tmp_path, monkeypatch):
    monkeypatch.setattr("mriseg.train.plan.free_memory", lambda device: 1000)
    with pytest.raises(MrisegError, match="would need about .* GiB; 0.0 GiB of cpu memory is free"):
        train(native, model="unet3d", out=tmp_path / "run", epochs=1, device="cpu")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_timed_run_writes_its_plan_into_config_and_log(native, tmp_path):
    train(native, out=tmp_path / "run", time_limit="15s", device="cpu")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["plan"]["chosen"]["patch_size"] == config["options"]["patch_size"]
    assert config["options"]["given"] == ["device", "time_limit"]
    assert "plan for the time budget" in (tmp_path / "run" / "train.log").read_text()


def test_mriseg_plan_prints_the_plan(native, capsys, monkeypatch):
    from mriseg.cli import main

    monkeypatch.setattr(sys, "argv", ["mriseg", "plan", str(native), "--time", "10m", "--device", "cpu", "--json"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert not stop.value.code
    printed = json.loads(capsys.readouterr().out)
    assert printed["chosen"]["steps_per_epoch"] >= 1 and printed["reasons"]
    monkeypatch.setattr(sys, "argv", ["mriseg", "plan", str(native.parent / "raw"), "--time", "10m"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2 and "not a cache" in capsys.readouterr().err


def test_meta_estimate_bounds_the_real_step(tmp_path):
    """The estimate is not below what a float32 step of the 2D U-Net allocates (CPU peak RSS rise)."""
    import subprocess

    code = ("import resource, torch; from mriseg.models import build_model; torch.set_num_threads(1);"
            "n = build_model('unet', 4, 3, spatial_dims=2, features=8); o = torch.optim.Adam(n.parameters());"
            "b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; x = torch.randn(4, 4, 128, 128);"
            "n(x).mean().backward(); o.step();"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) * 1024)")
    rise = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    estimate = training_step_bytes(build_model("unet", 4, 3, spatial_dims=2, features=8), 4, (128, 128), 4)
    assert rise <= estimate, (rise, estimate)
