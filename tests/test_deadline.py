"""Training to a deadline (--time), training on every case (--val-fraction 0), nnU-Net's split
file, and the precision chosen by default."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from mriseg.data.cache import build_cache
from mriseg.data.preprocess import PreprocessParams
from mriseg.data.synthetic import write_synthetic
from mriseg.devices import choose_precision
from mriseg.errors import BadInputError, MrisegError
from mriseg.train import train
from mriseg.train.budget import Budget, parse_duration

TINY = {"model_options": {"features": 4}, "batch_size": 4, "device": "cpu", "seed": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deadline")
    write_synthetic(root / "raw", layout="lgg", cases=5, seed=2, size=(8, 32, 32))
    build_cache(root / "raw", root / "cache", PreprocessParams())
    return root / "cache"


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("4h", 14400), ("1h30m", 5400),
                                          ("3:50:00", 13800), ("50:00", 3000), ("0.5m", 30), (120, 120)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "90", "1.5", "-5m", "15 minutes", "1:2:3:4", "m", "nan", "1e3s", True])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(MrisegError, match="--time"):
        parse_duration(text)


def test_the_budget_keeps_time_for_the_end_of_the_epoch():
    budget = Budget(seconds=60.0, started=time.monotonic() - 50.0)  # 10 s left
    budget.step_times = [5.0, 1.0, 1.0, 1.0]
    budget.validations, budget.checkpoint_writes = [4.0], [0.5]
    assert budget.reserve() == pytest.approx(1.25 * 4 + 2 * 0.5 + 2 * 1.0 + 1.0)  # 9 s
    assert not budget.out_of_time()
    budget.validations = [5.0]
    assert budget.out_of_time()  # 10.25 s needed, 10 s left
    # the plan spends what is left: 10.5 s less 1 s, an epoch end costs 6 s (1.25 x 4 s + 2 x 0.5 s),
    # so 3 steps of 1 s fit, as a whole epoch of 3 or the partial last epoch of a longer one
    budget.started, budget.validations = time.monotonic() - 49.5, [4.0]
    assert budget.plan(0, 3) == (1, 3) and budget.plan(0, 10) == (1, 3)
    assert budget.plan(8, 10) == (1, 2)  # the running epoch has 2 steps left, and no second epoch fits
    budget.started = time.monotonic() - 29.5  # 30.5 s left: 29.5 s hold 10 steps + 6 s, then 7 steps + 6 s
    assert budget.plan(0, 10) == (2, 17)


def test_a_timed_run_ends_before_its_deadline_with_a_validated_best(cache, tmp_path):
    limit = 25.0
    started = time.monotonic()
    summary = train(cache, out=tmp_path / "run", time_limit="25s", **TINY)  # --time: poly by default
    elapsed = time.monotonic() - started
    # a generous margin: a step can stall for seconds on a loaded machine, which no plan foresees
    assert elapsed < limit + 5.0, f"ran {elapsed - limit:.1f} s past the budget"
    assert summary["time_limit_s"] == limit
    assert (tmp_path / "run" / "best.pt").is_file() and summary["best_val_dice_mean"] is not None
    log = (tmp_path / "run" / "train.log").read_text()
    assert "planning" in log and "time budget 25.0 s:" in log and "the deadline" in log
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == summary["epochs_run"] >= 1
    # poly runs to the planned end: the last step's lr is far below the base
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]
    base = json.loads((tmp_path / "run" / "config.json").read_text())["options"]["lr"]
    assert steps[-1]["lr"] < 0.5 * base


def test_resuming_a_timed_run_continues_with_the_time_left(cache, tmp_path):
    from mriseg.checkpoint import load_checkpoint

    train(cache, out=tmp_path / "run", time_limit=12, epochs=1, **TINY)
    spent = load_checkpoint(tmp_path / "run" / "last.pt")["time_spent"]
    assert 0 < spent < 12
    with pytest.raises(MrisegError, match="already used"):
        train(out=tmp_path / "run", resume=True, epochs=5, time_limit=spent * 0.9)
    summary = train(out=tmp_path / "run", resume=True, epochs=50, time_limit=20)
    assert summary["epochs_run"] >= 2 and summary["time_limit_s"] == 20
    assert "earlier sessions" in (tmp_path / "run" / "train.log").read_text()


def test_val_fraction_zero_trains_on_every_case_and_predict_takes_last_pt(cache, tmp_path):
    from mriseg.inference import resolve_model_path

    summary = train(cache, out=tmp_path / "all", val_fraction=0, epochs=2, steps_per_epoch=3, **TINY)
    config = json.loads((tmp_path / "all" / "config.json").read_text())
    assert config["val_cases"] == [] and len(config["train_cases"]) == 5
    assert summary["validated"] is False and summary["best_val_dice_mean"] is None
    assert not (tmp_path / "all" / "best.pt").exists()
    assert resolve_model_path(tmp_path / "all") == tmp_path / "all" / "last.pt"
    assert "no validation was run" in (tmp_path / "all" / "train.log").read_text()
    with pytest.raises(MrisegError, match="--val-fraction 0"):
        train(cache, out=tmp_path / "bad", val_fraction=0, folds=3, **TINY)


def test_nnunet_splits_final_json_takes_the_fold(cache, tmp_path):
    ids = sorted(json.loads((cache / "manifest.json").read_text())["cases"])
    folds = [{"train": ids[1:], "val": ids[:1]}, {"train": ids[:-1], "val": ids[-1:]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    train(cache, out=tmp_path / "f1", split=str(tmp_path / "splits_final.json"), fold=1, epochs=1,
          steps_per_epoch=1, **TINY)
    config = json.loads((tmp_path / "f1" / "fold_1" / "config.json").read_text())  # a folder per fold
    assert config["val_cases"] == ids[-1:] and config["train_cases"] == ids[:-1]
    with pytest.raises(BadInputError, match="folds 0..1"):
        train(cache, out=tmp_path / "f5", split=str(tmp_path / "splits_final.json"), fold=5, **TINY)


def test_precision_defaults_follow_the_cpu(monkeypatch):
    import mriseg.devices as devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    chosen = choose_precision(cpu)
    assert chosen.dtype == torch.bfloat16 and chosen.channels_last and "native bfloat16" in chosen.describe()
    assert choose_precision(cpu, amp=False).dtype is None and not choose_precision(cpu, amp=False).channels_last
    assert choose_precision(cpu, channels_last=False).channels_last is False
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert choose_precision(cpu).dtype is None and not choose_precision(cpu).channels_last
    assert "emulated" in choose_precision(cpu, amp=True).reason


def test_bf16_inference_agrees_with_float32():
    """The default precision must not change a prediction beyond a few border voxels."""
    from mriseg.inference import InferenceSettings, predict_logits
    from mriseg.models import build_model

    torch.manual_seed(0)
    network = build_model("unet", 2, 1, spatial_dims=2, features=8).eval()
    image = torch.randn(2, 6, 64, 64).numpy()
    exact = predict_logits(network, image, 2, 1, InferenceSettings(amp=False, channels_last=False))
    fast = predict_logits(network, image, 2, 1, InferenceSettings(amp=True, channels_last=True))
    assert ((exact > 0) != (fast > 0)).float().mean() < 0.01
    assert torch.allclose(exact, fast, atol=0.1 * float(exact.abs().max()))
