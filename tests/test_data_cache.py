"""The .npy cache: round trip, incremental re-run, parameter changes, workers, the default dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import BRATS_2013_MAP, make_brats, make_lgg
from mriseg.data.cache import build_cache, open_cache
from mriseg.data.preprocess import PreprocessParams, preprocess_case
from mriseg.data.readers import list_cases, read_case
from mriseg.errors import BadInputError, MrisegError


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mriseg", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def lgg(tmp_path_factory) -> Path:
    return make_lgg(tmp_path_factory.mktemp("cache") / "lgg", cases=3, size=(6, 24, 24))


def test_round_trip_matches_preprocess_case(lgg, tmp_path):
    params = PreprocessParams(size=(16, 16), dtype="float32")
    summary = build_cache(lgg, tmp_path / "cache", params)
    assert summary.to_dict()["written"] == 3
    cache = open_cache(tmp_path / "cache")
    assert cache.case_ids == ["TCGA_SY_0001_19990101", "TCGA_SY_0002_19990101", "TCGA_SY_0003_19990101"]
    assert cache.params == params and cache.modalities == ["pre-contrast", "flair", "post-contrast"]
    assert cache.label_info["scheme"] == "binary"
    image, label, _ = preprocess_case(read_case(list_cases(lgg)[0]), params)
    cached = cache.image(cache.case_ids[0])
    assert isinstance(cached, np.memmap) and cached.shape == (3, 6, 16, 16)
    np.testing.assert_array_equal(cached, image)
    np.testing.assert_array_equal(cache.label(cache.case_ids[0]), label)
    record = cache.record(cache.case_ids[0])
    assert record["original_shape"] == [6, 24, 24] and record["slice_axis"] == 0
    assert all({"path", "size", "mtime_ns"} <= set(s) for s in record["sources"])


def test_rerun_skips_unchanged_cases_and_redoes_touched_ones(lgg, tmp_path):
    params = PreprocessParams()
    build_cache(lgg, tmp_path / "cache", params)
    again = build_cache(lgg, tmp_path / "cache", params)
    assert len(again.skipped) == 3 and not again.written
    touched = list_cases(lgg)[1].image_paths[0]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = build_cache(lgg, tmp_path / "cache", params)
    assert third.written == ["TCGA_SY_0002_19990101"] and len(third.skipped) == 2


def test_other_parameters_refuse_unless_forced(lgg, tmp_path):
    build_cache(lgg, tmp_path / "cache", PreprocessParams())
    with pytest.raises(MrisegError, match="--force"):
        build_cache(lgg, tmp_path / "cache", PreprocessParams(norm="minmax"))
    summary = build_cache(lgg, tmp_path / "cache", PreprocessParams(norm="minmax"), force=True)
    assert len(summary.written) == 3
    assert open_cache(tmp_path / "cache").params.norm == "minmax"


def test_interrupted_run_is_not_a_valid_cache_and_a_rerun_finishes(lgg, tmp_path):
    build_cache(lgg, tmp_path / "cache", PreprocessParams())
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["cases"]["TCGA_SY_0003_19990101"]
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "cache" / "cases" / f".TCGA_SY_0003_19990101.{'ab' * 16}.tmp").mkdir()  # a half-written case
    with pytest.raises(BadInputError, match="unfinished"):
        open_cache(tmp_path / "cache")
    summary = build_cache(lgg, tmp_path / "cache", PreprocessParams())
    assert summary.written == ["TCGA_SY_0003_19990101"]
    assert len(open_cache(tmp_path / "cache")) == 3
    assert not list((tmp_path / "cache" / "cases").glob(".*"))


@pytest.mark.parametrize("killed_at", ["between the renames", "before the old copy is deleted"])
def test_a_kill_inside_a_case_replacement_is_repaired_by_the_next_run(lgg, tmp_path, monkeypatch, killed_at):
    """Redoing a case moves the old folder aside, renames the new one in, then deletes the old one; a
    kill at either gap leaves hidden folders (and, at the first, no case folder) that the next run
    must clean up, redoing the case."""
    import mriseg.files

    params = PreprocessParams()
    build_cache(lgg, tmp_path / "cache", params)
    touched = list_cases(lgg)[1]
    stat = touched.image_paths[0].stat()
    os.utime(touched.image_paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    if killed_at == "between the renames":
        real_replace = os.replace

        def replace_then_die(source, target):
            if str(source).endswith(".tmp"):  # the old folder is already aside
                raise KeyboardInterrupt
            real_replace(source, target)

        monkeypatch.setattr(mriseg.files.os, "replace", replace_then_die)
    else:
        monkeypatch.setattr(mriseg.files.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        build_cache(lgg, tmp_path / "cache", params)
    monkeypatch.undo()
    cases = tmp_path / "cache" / "cases"
    assert list(cases.glob(".*.old")), "the simulated kill left no old copy: the test tests nothing"
    summary = build_cache(lgg, tmp_path / "cache", params)
    assert summary.written == [touched.case_id]
    assert not list(cases.glob(".*")), "the re-run left hidden folders behind"
    fresh = build_cache(lgg, tmp_path / "reference", params)
    assert fresh.written and len(open_cache(tmp_path / "cache")) == 3
    for case_id in open_cache(tmp_path / "reference").case_ids:
        for name in ("image.npy", "label.npy"):
            np.testing.assert_array_equal(np.load(cases / case_id / name),
                                          np.load(tmp_path / "reference" / "cases" / case_id / name))


def test_open_cache_refuses_other_formats(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BadInputError, match="not an mriseg cache"):
        open_cache(tmp_path)
    with pytest.raises(BadInputError, match="no manifest"):
        open_cache(tmp_path / "..")


def test_cli_with_workers_and_json(tmp_path):
    brats = make_brats(tmp_path / "brats", cases=3, size=(20, 20, 12))
    result = run_cli("preprocess", str(brats), str(tmp_path / "cache"), "--size", "16,16", "--crop",
                     "--workers", "2", "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["written"] == 3 and summary["layout"] == "brats"
    cache = open_cache(tmp_path / "cache")
    assert cache.image(cache.case_ids[0]).dtype == np.float32
    assert cache.label_info["values"] in ([0, 1, 2, 4], [0, 2, 4], [0, 1, 2], [0, 2])
    again = run_cli("preprocess", str(brats), str(tmp_path / "cache"), "--size", "16,16", "--crop",
                    "--dtype", "float32")
    assert again.returncode == 0 and "3 of 3 cases unchanged" in again.stderr


def test_real_brats_cache_with_label_map(shared_data, tmp_path):
    (tmp_path / "brats").mkdir()  # one real case keeps the test fast
    (tmp_path / "brats" / "brats_2013_pat0002_1").symlink_to(shared_data / "brats" / "brats_2013_pat0002_1")
    summary = build_cache(tmp_path / "brats", tmp_path / "cache",
                          PreprocessParams(size=(48, 48, 32), crop=True, label_map={3: 1}),
                          modalities=BRATS_2013_MAP)
    assert summary.total == 1
    cache = open_cache(tmp_path / "cache")
    assert cache.label_info["values_original"] == [0, 1, 2, 3, 4]
    assert cache.label_info["scheme_original"] == "brats2013"
    assert cache.label_info["values"] == [0, 1, 2, 4] and cache.label_info["scheme"] == "brats"
    image = np.asarray(cache.image("brats_2013_pat0002_1"), dtype=np.float32)
    assert image.shape == (2, 48, 48, 32) and np.isfinite(image).all()
    record = cache.record("brats_2013_pat0002_1")
    assert record["background"][0] == pytest.approx(-3.1937, abs=1e-3)
    assert record["crop_box"][2][0] == 0 and record["spacing"] == [1.0, 1.0, 1.0]


def test_default_dataset_is_built_once_and_reused(tmp_path, monkeypatch):
    from mriseg.data import synthetic

    monkeypatch.setenv("MRISEG_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(synthetic.DEFAULT_DATASET, "lgg",
                        {"cases": 2, "size": (4, 16, 16), "seed": 0, "preprocess": {"norm": "zscore"}})
    path = synthetic.default_dataset("lgg")
    assert path == tmp_path / "home" / "datasets" / "synthetic-lgg-v1"
    assert len(open_cache(path)) == 2
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert synthetic.default_dataset("lgg") == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_default_dataset_two_processes_at_once(tmp_path):
    script = ("import sys; from mriseg.data import synthetic; "
              "synthetic.DEFAULT_DATASET['lgg'] = {'cases': 2, 'size': (4, 16, 16), 'seed': 0, "
              "'preprocess': {'norm': 'zscore'}}; print(synthetic.default_dataset('lgg'))")
    env = {**os.environ, "MRISEG_HOME": str(tmp_path / "home")}
    processes = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate() for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert outputs[0][0] == outputs[1][0]
    assert sum("generating" in err for _, err in outputs) == 1  # built once, reused by the other
    assert len(open_cache(Path(outputs[0][0].strip()))) == 2


def test_force_redoes_every_case_even_with_the_same_parameters(lgg, tmp_path):
    """The errors for a damaged cache say "re-run mriseg preprocess with --force": that must redo
    the damaged case even though its sources did not change."""
    build_cache(lgg, tmp_path / "cache", PreprocessParams())
    damaged = tmp_path / "cache" / "cases" / "TCGA_SY_0002_19990101" / "image.npy"
    np.save(damaged, np.zeros((1, 2, 2), np.float32))
    summary = build_cache(lgg, tmp_path / "cache", PreprocessParams(), force=True)
    assert len(summary.written) == 3 and not summary.skipped
    assert len(open_cache(tmp_path / "cache")) == 3 and np.load(damaged).shape[0] == 3


def test_a_label_map_entry_that_matches_nothing_is_said(lgg, tmp_path, capsys):
    build_cache(lgg, tmp_path / "cache", PreprocessParams(label_map={9: 1}))
    assert "--label-map: label value(s) [9] occur in no case" in capsys.readouterr().err
