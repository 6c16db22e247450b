"""``mriseg demo``: the whole job on synthetic data, end to end through the real command."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mriseg import demo as demo_module
from mriseg.errors import MrisegError


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mriseg", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MRISEG_HOME": str(cwd / "home")})


@pytest.fixture(scope="module")
def brats_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The BraTS-layout demo exactly as a user runs it (its full plan: about 20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("demo")
    return root, run_cli("demo", "--layout", "brats", "--out", "brats-demo", "--json", cwd=root)


def test_brats_demo_learns_and_reports_on_stdout(brats_demo):
    root, result = brats_demo
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON alone; logs went to stderr
    assert report["layout"] == "brats"
    assert set(report["test_dice"]) == {"WT", "TC", "ET"}
    # Synthetic tumours are easy: a network that learned anything scores far above chance.
    assert report["val_dice"] > 0.7 and min(report["test_dice"].values()) > 0.6
    assert json.loads((root / "brats-demo" / "demo.json").read_text()) == report
    assert "[5/5] evaluate" in result.stderr


def test_brats_demo_writes_every_file_it_lists(brats_demo):
    root, result = brats_demo
    files = json.loads(result.stdout)["files"]
    for path in files.values():
        assert (root / path).exists(), path
    overlay = np.asarray(Image.open(root / next(p for k, p in files.items() if k.startswith("overlay"))))
    assert overlay.ndim == 3 and (overlay.std(axis=-1) > 50).any()  # coloured outlines on the grey slice
    gif = Image.open(root / files["GIF through one volume"])
    assert gif.n_frames > 1
    out = root / "brats-demo"
    held_out = sorted(p.name for p in (out / "test").iterdir())
    assert held_out and not set(held_out) & {p.name for p in (out / "data").iterdir()}
    assert sorted(p.name.removesuffix("_seg.nii.gz") for p in (out / "predictions").glob("*_seg.nii.gz")) == held_out


def test_demo_refuses_to_replace_an_earlier_demo(brats_demo):
    root, _ = brats_demo
    before = (root / "brats-demo" / "demo.json").stat().st_mtime_ns
    result = run_cli("demo", "--layout", "brats", "--out", "brats-demo", cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert (root / "brats-demo" / "demo.json").stat().st_mtime_ns == before


@pytest.fixture
def quick_lgg_plan(monkeypatch):
    """The LGG plan cut to a few steps: the pipeline's plumbing, not its learning, is under test here."""
    plan = demo_module.PLANS["lgg"]
    quick = dataclasses.replace(plan, cases=8, held_out=2, size=(6, 64, 64),
                                train={**plan.train, "epochs": 1, "steps_per_epoch": 2})
    monkeypatch.setitem(demo_module.PLANS, "lgg", quick)


def test_lgg_demo_writes_slice_masks_and_scores_the_held_out_patients(tmp_path, quick_lgg_plan):
    result = demo_module.run_demo(tmp_path / "demo", layout="lgg", device="cpu")
    out = tmp_path / "demo"
    assert set(result.test_dice) == {"tumour"}
    patients = sorted(p.name for p in (out / "test").iterdir())
    assert len(patients) == 2
    for patient in patients:  # kaggle_3m style: one mask TIF per source slice
        assert len(list((out / "predictions" / patient).glob("*_mask.tif"))) == 6
    rows = (out / "evaluation" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + len(patients)


def test_overwrite_replaces_only_what_the_demo_made(tmp_path, quick_lgg_plan):
    out = tmp_path / "demo"
    demo_module.run_demo(out, layout="lgg", device="cpu")
    (out / "notes.txt").write_text("mine")
    (out / "predictions" / "stale.txt").write_text("old")
    demo_module.run_demo(out, layout="lgg", device="cpu", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "predictions" / "stale.txt").exists()


def test_unknown_layout_is_a_user_error(tmp_path):
    with pytest.raises(MrisegError, match="--layout"):
        demo_module.run_demo(tmp_path / "demo", layout="msd")
    assert not (tmp_path / "demo").exists()


def test_a_folder_that_is_not_a_demo_and_bad_options_are_refused_before_any_step(tmp_path):
    (tmp_path / "dataset" / "TCGA_X").mkdir(parents=True)
    with pytest.raises(MrisegError, match="not a demo's \\(TCGA_X\\)"):
        demo_module.run_demo(tmp_path / "dataset", layout="lgg")
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == ["TCGA_X"]
    for bad in ({"seed": -1}, {"device": "nonsense"}):
        with pytest.raises(MrisegError):
            demo_module.run_demo(tmp_path / "fresh", layout="lgg", **bad)
        assert not (tmp_path / "fresh").exists()
