"""Killing ``mriseg preprocess`` and ``mriseg train`` at random points (SIGKILL, SIGTERM, SIGINT), then
running them again (preprocess) or ``--resume`` (train).

Preprocess: after every interruption each case the manifest lists must be complete and equal to an
uninterrupted run's, and the cache must only call itself complete when it is; the final
re-run must give exactly the uninterrupted cache. Kill points are drawn from a seeded
generator as "after this run has written k cases" plus a small delay, so they land mid-run
whatever the machine's speed. Before each run the files of a random set of patients are
touched, so a run both resumes (cases left undone) and redoes (changed sources) work.

Train: interrupted by SIGINT, SIGKILL and SIGTERM a few seeded steps into each process's share,
resumed each time; every last.pt loads (none is ever half-written), a caught signal checkpoints
at the next step, SIGKILL falls back to the last complete checkpoint, and the final weights equal
an uninterrupted run's on CPU with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import make_lgg
from mriseg.data.cache import build_cache, open_cache
from mriseg.data.preprocess import PreprocessParams

CASES = 6
SIZE_OPTION = "24,24"
INTERRUPTIONS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT] * 2


def start_preprocess(source: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mriseg", "preprocess", str(source), str(cache),
                             "--size", SIZE_OPTION], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cases_written_since(cache: Path, start_ns: int) -> int:
    """Case folders renamed into place by the current run (made after ``start_ns``)."""
    try:
        return sum(1 for folder in (cache / "cases").iterdir()
                   if not folder.name.startswith(".") and folder.stat().st_mtime_ns >= start_ns)
    except OSError:
        return 0


def manifest_mtime(cache: Path) -> int:
    try:
        return (cache / "manifest.json").stat().st_mtime_ns
    except OSError:
        return 0


def assert_cases_match(cache: Path, reference: Path, case_ids) -> None:
    for case_id in case_ids:
        for name in ("image.npy", "label.npy"):
            got = np.load(cache / "cases" / case_id / name)
            expected = np.load(reference / "cases" / case_id / name)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (case_id, name)


def assert_consistent(cache: Path, reference: Path) -> None:
    """What an interrupted run leaves: listed cases are whole, and 'complete' only when it is."""
    if not (cache / "manifest.json").exists():
        return
    manifest = json.loads((cache / "manifest.json").read_text())
    assert_cases_match(cache, reference, manifest["cases"])
    if manifest["complete"]:
        assert len(manifest["cases"]) == CASES
    else:
        from mriseg.errors import BadInputError

        with pytest.raises(BadInputError, match="unfinished"):
            open_cache(cache)


def without_sources(manifest: dict) -> dict:
    """The manifest minus the source files' mtimes, which the test changes on purpose."""
    cases = {case_id: {k: v for k, v in record.items() if k != "sources"}
             for case_id, record in manifest["cases"].items()}
    return {**manifest, "cases": cases}


def test_preprocess_survives_random_interruptions(tmp_path):
    source = make_lgg(tmp_path / "src", cases=CASES, size=(6, 48, 48))
    reference, cache = tmp_path / "reference", tmp_path / "cache"
    build_cache(source, reference, PreprocessParams(size=(24, 24)))
    rng = random.Random(20261122)
    patients = sorted(p for p in source.iterdir() if p.is_dir())
    interrupted = 0
    for round_number, signal_number in enumerate(INTERRUPTIONS):
        # Change some sources so there is work to redo besides what the last interruption left undone.
        listed = set(json.loads((cache / "manifest.json").read_text())["cases"]) if cache.exists() else set()
        touched = rng.sample(patients, rng.randint(2, CASES))
        for patient in touched:
            for file in patient.iterdir():
                os.utime(file, ns=(time.time_ns(), time.time_ns() + round_number))
        todo = CASES - len(listed - {p.name for p in touched})
        target = rng.randrange(0, todo)
        start_ns = time.time_ns()
        process = start_preprocess(source, cache)
        deadline = time.monotonic() + 120
        # Wait until this run has rewritten the manifest (it is past start-up) and written `target` cases.
        while process.poll() is None and time.monotonic() < deadline and (
                manifest_mtime(cache) < start_ns or cases_written_since(cache, start_ns) < target):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is None:
            process.send_signal(signal_number)
            interrupted += 1
        _, stderr = process.communicate(timeout=120)
        expected_codes = {130 if signal_number == signal.SIGINT else -signal_number}
        finished = json.loads((cache / "manifest.json").read_text())["complete"]
        if finished:
            expected_codes |= {0, -signal_number}  # the signal came as the finished run was exiting
        assert process.returncode in expected_codes, stderr
        # a signal in the interpreter's own shutdown (torch's atexit finaliser), after the run had
        # finished its work, is Python's report, not the program's
        teardown = finished and "Exception ignored in atexit callback" in stderr
        assert "Traceback" not in stderr or teardown, stderr
        assert_consistent(cache, reference)
    assert interrupted == len(INTERRUPTIONS), "a run ended before its signal: kill points too late"

    final = start_preprocess(source, cache)
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr
    assert not list((cache / "cases").glob(".*")), "temporary folders left behind"
    opened = open_cache(cache)
    assert sorted(opened.case_ids) == sorted(open_cache(reference).case_ids)
    assert_cases_match(cache, reference, opened.case_ids)
    got = without_sources(json.loads((cache / "manifest.json").read_text()))
    expected = without_sources(json.loads((reference / "manifest.json").read_text()))
    assert got == expected


# --- training -----------------------------------------------------------------------------------

TRAIN_SETTINGS = ["--epochs", "3", "--steps-per-epoch", "6", "--model-options", "features=4", "--batch-size", "4",
                  "--lr", "3e-3", "--device", "cpu", "--seed", "5", "--log-every", "1"]
TOTAL_STEPS = 18
TRAIN_INTERRUPTIONS = [signal.SIGINT, signal.SIGKILL, signal.SIGTERM]


def logged_steps(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("kind") == "step":
            steps.append(record["step"])
    return steps


def runs_started(run_dir: Path) -> int:
    """How many processes have opened the run folder (each says "run folder: ..." in train.log)."""
    try:
        return (run_dir / "train.log").read_text().count("run folder:")
    except OSError:
        return 0


def test_training_killed_three_times_resumes_to_the_uninterrupted_weights(tmp_path):
    import torch

    from mriseg.checkpoint import load_checkpoint
    from mriseg.train import train

    source = make_lgg(tmp_path / "src", cases=6, size=(8, 32, 32))
    cache = tmp_path / "cache"
    build_cache(source, cache, PreprocessParams())
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in-process below: the same arithmetic
    rng = random.Random(7)
    for number, signal_number in enumerate(TRAIN_INTERRUPTIONS):
        resume_from = load_checkpoint(run_dir / "last.pt")["global_step"] if number else 0
        # A few steps into this process's share, leaving steps for the next ones.
        target = rng.randint(resume_from + 1, resume_from + 5)
        command = ["train", str(cache), "--out", str(run_dir), *TRAIN_SETTINGS] if number == 0 else \
            ["train", "--resume", "--out", str(run_dir)]
        process = subprocess.Popen([sys.executable, "-m", "mriseg", *command], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 300
        # Until this process has opened the run folder, metrics.jsonl still holds the killed run's lines.
        while process.poll() is None and time.monotonic() < deadline and (
                runs_started(run_dir) <= number or max(logged_steps(run_dir), default=0) < target):
            time.sleep(0.01)
        assert process.poll() is None, f"training ended before step {target}:\n{process.communicate()[1]}"
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        checkpoint = load_checkpoint(run_dir / "last.pt")  # never half-written, whatever the signal
        if signal_number == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
            # The last complete checkpoint: from a step the killed process had finished.
            assert checkpoint["global_step"] <= max(logged_steps(run_dir))
        else:  # caught: a checkpoint at the next step boundary, then exit 130
            assert process.returncode == 130, stderr
            assert "checkpoint written" in stderr
            assert checkpoint["global_step"] >= target

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(out=run_dir, resume=True)  # the last resume, and the straight run, in this process
        train(cache, out=tmp_path / "straight", epochs=3, steps_per_epoch=6, model_options={"features": 4},
              batch_size=4, lr=3e-3, device="cpu", seed=5, log_every=1)
    finally:
        torch.set_num_threads(threads)
    assert logged_steps(run_dir) == list(range(1, TOTAL_STEPS + 1))  # every step once across four processes
    resumed = load_checkpoint(run_dir / "last.pt")["state_dict"]
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
