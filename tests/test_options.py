"""Every option is checked at the door: random values give exit 2 with one line, or a run.

The long work (training, prediction, benchmarking) is replaced by a recorder, so a value that
passes the checks reaches it and a value that does not is refused before any data is read.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corrupt.harness import run_main

ANY_NUMBER = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from(["", "abc", "1e400", "-0", "nan", "inf", ",", "1,2"]))

TRAIN_RULES = {  # option: (integer, low, high, low_open, high_open)
    "--epochs": (True, 1, 100_000, False, False), "--batch-size": (True, 1, 65_536, False, False),
    "--steps-per-epoch": (True, 1, 10_000_000, False, False), "--lr": (False, 0, 10, True, False),
    "--weight-decay": (False, 0, 10, False, False), "--momentum": (False, 0, 1, False, True),
    "--warmup-epochs": (False, 0, 100_000, False, False), "--lr-patience": (True, 0, 100_000, False, False),
    "--lr-factor": (False, 0, 1, True, False), "--clip-grad": (False, 0, math.inf, True, False),
    "--patience": (True, 0, 100_000, False, False), "--val-fraction": (False, 0, 1, False, True),
    "--workers": (True, 0, 256, False, False), "--seed": (True, 0, 2**32 - 1, False, False),
    "--log-every": (True, 1, 10_000_000, False, False), "--bce-weight": (False, 0, 1, False, False),
    "--uniform-share": (False, 0, 1, False, False), "--foreground-share": (False, 0, 1, False, False),
    "--ignore-index": (True, 0, 255, False, False),
}


def acceptable(value, integer, low, high, low_open, high_open) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    if isinstance(value, str) and integer:
        try:
            int(value)
        except ValueError:
            return False
    if not math.isfinite(number) or (integer and not number.is_integer()):
        return False
    return (number > low if low_open else number >= low) and (number < high if high_open else number <= high)


def assert_refused_in_one_line(result, option):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and (option in result.stderr or "Invalid value" in result.stderr), result.stderr


@pytest.fixture
def recorded_training(monkeypatch):
    import mriseg.train as train_module

    calls = []
    monkeypatch.setattr(train_module.loop, "run_training", lambda *args, **kwargs: calls.append(args) or {})
    return calls


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(sorted(TRAIN_RULES)), value=ANY_NUMBER)
def test_train_options_are_range_checked_before_any_work(option, value, tmp_path, monkeypatch, capsys,
                                                         recorded_training):
    recorded_training.clear()
    result = run_main(["train", "--out", str(tmp_path / "run"), "--overwrite", "--device", "cpu", option, str(value)],
                      cwd=tmp_path, home=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    if acceptable(value, *TRAIN_RULES[option]):
        assert result.returncode == 0, result.stderr
        assert len(recorded_training) == 1
    else:
        assert_refused_in_one_line(result, option)
        assert not recorded_training


@pytest.mark.parametrize("args,fragment", [
    (["--fold", "1"], "--folds"),
    (["--fold", "0"], "--folds"),
    (["--val-fraction", "0", "--folds", "3"], "--val-fraction"),
    (["--time", "soon"], "--time"),
    (["--time", "-5m"], "--time"),
    (["--folds", "3", "--fold", "3"], "--fold"),
    (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], "--nesterov"),
    (["--optimizer", "adam", "--nesterov"], "--nesterov"),
    (["--model-options", "features=0"], "--features"),
    (["--model-options", "features=wide"], "--features"),
    (["--dims", "3", "--patch-size", "64,64"], "--patch-size"),
    (["--dims", "3", "--patch-size", "999999,64,64"], "--patch-size"),
])
def test_train_option_combinations_are_checked(args, fragment, tmp_path, monkeypatch, capsys, recorded_training):
    result = run_main(["train", "--out", str(tmp_path / "run"), "--device", "cpu", *args], cwd=tmp_path,
                      home=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_refused_in_one_line(result, fragment)
    assert not recorded_training


@pytest.mark.parametrize("args,fragment", [
    (["--threshold", "0"], "--threshold"), (["--threshold", "1"], "--threshold"),
    (["--threshold", "nan"], "--threshold"), (["--batch-size", "0"], "--batch-size"),
    (["--patch-size", "0,8,8"], "--patch-size"), (["--patch-size", "8,8"], "--patch-size"),
    (["--interpolation", "cubic"], "--interpolation"), (["--device", "mps"], "mps"),
    (["--device", "tpu"], "--device"), (["--shard", "2/2"], "--shard"),
])
def test_predict_options_are_checked_before_the_model_is_read(args, fragment, tmp_path, monkeypatch, capsys):
    result = run_main(["predict", str(tmp_path / "in"), "--model", str(tmp_path / "missing.pt"), "--out",
                       str(tmp_path / "out"), *args], cwd=tmp_path, home=tmp_path, monkeypatch=monkeypatch,
                      capsys=capsys)
    assert_refused_in_one_line(result, fragment)
    assert "missing.pt" not in result.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--micro-batches", ","], "--micro-batches"), (["--micro-batches", "0"], "--micro-batches"),
    (["--input-size", "128"], "--input-size"), (["--steps", "0"], "--steps"),
    (["--timeline", "blocker/t.png"], "blocker"), (["--timeline", "t.txt"], "--timeline"),
])
def test_benchmark_options_are_checked_before_measuring(args, fragment, tmp_path, monkeypatch, capsys):
    import mriseg.benchmark.report as benchmark

    monkeypatch.setattr(benchmark, "_launch", lambda job: pytest.fail("the benchmark started"))
    (tmp_path / "blocker").write_text("a file where a folder would be")
    result = run_main(["benchmark", "--devices", "cpu,cpu", *args], cwd=tmp_path, home=tmp_path,
                      monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert fragment in result.stderr or "folder" in result.stderr, result.stderr


def test_synth_into_an_existing_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").write_text("not a folder")
    result = run_main(["synth", str(tmp_path / "data")], cwd=tmp_path, home=tmp_path, monkeypatch=monkeypatch,
                      capsys=capsys)
    assert_refused_in_one_line(result, "not a folder")


def test_options_that_would_be_ignored_are_refused(tmp_path):
    """Each of these used to be accepted and silently do nothing."""
    import subprocess
    import sys

    from data_fixtures import make_lgg

    from mriseg.data.cache import build_cache
    from mriseg.data.preprocess import PreprocessParams

    source = make_lgg(tmp_path / "lgg", cases=3, size=(4, 24, 24))
    build_cache(source, tmp_path / "cache", PreprocessParams(size=(16, 16)))
    checks = [
        (["preprocess", str(source), str(tmp_path / "c2"), "--size", ""], "--size is empty"),
        (["train", str(tmp_path / "cache"), "--size", "32,32", "--epochs", "1", "--out", str(tmp_path / "r")],
         "--size preprocess raw DATA"),
        (["train", str(tmp_path / "cache"), "--modalities", "flair=FLAIR", "--epochs", "1", "--out",
          str(tmp_path / "r")], "--modalities preprocess raw DATA"),
        (["evaluate", str(source), str(source), "--regions", "a=-1", "--out", str(tmp_path / "e")],
         "label values 1 to 65535"),
    ]
    for args, expected in checks:
        result = subprocess.run([sys.executable, "-m", "mriseg", *args], capture_output=True, text=True)
        assert result.returncode == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "c2").exists()
