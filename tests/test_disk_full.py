"""Full disks and read-only output folders: one clear error line, nothing half-written left behind.

A full disk is a real 1 MiB-scale tmpfs where this process may mount one (root in a container),
and otherwise, or in addition, a simulated one: ``numpy.save`` / the file writes of evaluate
monkeypatched to write part of the data and then fail with ENOSPC, as a full disk does.
Read-only folders are real: ``chmod 555`` (with root's permission override dropped for the
subprocess), and a read-only bind mount where mounting is allowed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from corrupt.harness import (assert_one_line_error, describe_changes, permissions_can_be_enforced, run_cli, run_main,
                             snapshot)
from data_fixtures import make_brats, make_lgg
from mriseg.data.cache import build_cache, open_cache
from mriseg.data.preprocess import PreprocessParams
from mriseg.errors import BadInputError


def mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A function making a tmpfs of the given size under tmp_path (skips where mounting is not allowed)."""
    mounted: list[Path] = []

    def make(size_kib: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        if not mount("-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)):
            pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN); the simulated variant runs")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def temporary_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name or ".partial" in p.name]


def assert_cache_not_valid(cache: Path) -> None:
    if (cache / "manifest.json").exists():
        with pytest.raises(BadInputError):
            open_cache(cache)


def failing_after(real, calls_allowed: int):
    """``real`` that, after ``calls_allowed`` calls, writes half its data and fails like a full disk."""
    calls = {"n": 0}

    def write(file, array, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= calls_allowed:
            return real(file, array, *args, **kwargs)
        with open(file, "wb") as stream:
            stream.write(np.asarray(array).tobytes()[: np.asarray(array).nbytes // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


@pytest.fixture(scope="module")
def lgg(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset whose cache (about 900 KiB) does not fit 300 KiB, and its cache built normally."""
    root = tmp_path_factory.mktemp("full")
    source = make_lgg(root / "src", cases=4, size=(8, 64, 64))
    reference = root / "reference"
    build_cache(source, reference, PreprocessParams())
    return source, reference


def assert_same_cache(cache: Path, reference: Path) -> None:
    opened, expected = open_cache(cache), open_cache(reference)
    assert opened.case_ids == expected.case_ids
    for case_id in opened.case_ids:
        assert np.array_equal(opened.image(case_id), expected.image(case_id))
        assert np.array_equal(opened.label(case_id), expected.label(case_id))


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_preprocess_on_a_full_disk_then_with_room(disk, lgg, small_disk, tmp_path, monkeypatch, capsys):
    source, reference = lgg
    (tmp_path / "home").mkdir()
    if disk == "tmpfs":
        cache = small_disk(300) / "cache"
        result = run_cli(["preprocess", str(source), str(cache)], cwd=tmp_path, home=tmp_path / "home")
    else:
        cache = tmp_path / "cache"
        monkeypatch.setattr(np, "save", failing_after(np.save, calls_allowed=3))
        result = run_main(["preprocess", str(source), str(cache)], cwd=tmp_path, home=tmp_path / "home",
                          monkeypatch=monkeypatch, capsys=capsys)
        monkeypatch.undo()
    line = assert_one_line_error(result, (str(cache),))
    assert "No space left on device" in line or "disk is probably full" in line, line
    assert not temporary_leftovers(cache), temporary_leftovers(cache)
    assert_cache_not_valid(cache)

    if disk == "tmpfs":
        assert mount("-o", "remount,size=4m", str(cache.parent))
    result = run_cli(["preprocess", str(source), str(cache)], cwd=tmp_path, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert_same_cache(cache, reference)


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    """A folder of <case_id>.nii.gz label files (the BraTS synthetic labels)."""
    root = tmp_path_factory.mktemp("masks")
    brats = make_brats(root / "brats", cases=2, size=(12, 12, 8))
    masks = root / "masks"
    masks.mkdir()
    for label in brats.glob("*/*_seg.nii.gz"):
        shutil.copy(label, masks / f"{label.parent.name}.nii.gz")
    return masks


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_evaluate_on_a_full_disk(disk, masks, small_disk, tmp_path, monkeypatch, capsys):
    (tmp_path / "home").mkdir()
    if disk == "tmpfs":
        full = small_disk(64)
        handle = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # take every free byte
            while os.write(handle, b"\0" * 4096):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(handle)
        out = full / "evaluation"
    else:
        out = tmp_path / "evaluation"
        real_write_bytes = Path.write_bytes

        def full_disk(path, data):  # half the bytes land, then the disk is full
            real_write_bytes(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(Path, "write_bytes", full_disk)
    args = ["evaluate", str(masks), str(masks), "--out", str(out), "--regions", "brats"]
    if disk == "tmpfs":
        result = run_cli(args, cwd=tmp_path, home=tmp_path / "home")
    else:
        result = run_main(args, cwd=tmp_path, home=tmp_path / "home", monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(result, ("metrics.csv", "No space left on device"))
    assert not [p.name for p in out.iterdir() if p.name in ("metrics.csv", "summary.json", "dsc.png")]
    assert not temporary_leftovers(out)


@pytest.fixture(scope="module")
def permissions(tmp_path_factory) -> tuple[bool, str]:
    return permissions_can_be_enforced(tmp_path_factory.mktemp("permissions"))


@pytest.fixture
def make_read_only():
    """A function making a folder (and, for chmod, the folders in it) read-only; mounts are undone after."""
    mounted: list[Path] = []

    def make(folder: Path, how: str) -> None:
        if how == "chmod":
            for inner in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
                inner.chmod(0o555)
        elif mount("--bind", str(folder), str(folder)):
            mounted.append(folder)
            if not mount("-o", "remount,bind,ro", str(folder)):
                pytest.skip("cannot remount a bind mount read-only here")
        else:
            pytest.skip("cannot make a bind mount here (not root, or no CAP_SYS_ADMIN)")

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("how", ["chmod", "ro-mount"])
@pytest.mark.parametrize("command", ["preprocess-new", "preprocess-update", "evaluate", "predict", "train"])
def test_read_only_output(command, how, lgg, masks, permissions, make_read_only, tmp_path):
    if how == "chmod" and not permissions[0]:
        pytest.skip(permissions[1])
    source, reference = lgg
    (tmp_path / "home").mkdir()
    parent = tmp_path / "outputs"
    parent.mkdir()
    if command == "preprocess-new":
        out, args = parent / "cache", ["preprocess", str(source), str(parent / "cache")]
    elif command == "preprocess-update":  # an existing cache whose sources changed: it must be rewritten
        out = parent / "cache"
        shutil.copytree(reference, out)
        shutil.copytree(source, tmp_path / "src")
        for file in (tmp_path / "src").rglob("*_3.tif"):
            os.utime(file, ns=(1, 1))
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["source"] = str((tmp_path / "src").resolve())
        (out / "manifest.json").write_text(json.dumps(manifest))
        args = ["preprocess", str(tmp_path / "src"), str(out)]
    elif command == "evaluate":
        out = parent / "evaluation"
        args = ["evaluate", str(masks), str(masks), "--regions", "brats", "--out", str(out)]
    elif command == "predict":
        from corrupt.corpus import tiny_checkpoint

        checkpoint = tiny_checkpoint(tmp_path / "best.pt")
        out = parent / "predictions"
        args = ["predict", str(next(p for p in source.iterdir() if p.is_dir())), "--model", str(checkpoint),
                "--out", str(out), "--device", "cpu"]
    else:
        out = parent / "run"
        args = ["train", str(reference), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1",
                "--model-options", "features=4", "--batch-size", "2", "--device", "cpu"]
    locked = out if command == "preprocess-update" else parent
    make_read_only(locked, how)
    before = snapshot(tmp_path, exclude=(tmp_path / "home",))
    result = run_cli(args, cwd=tmp_path, home=tmp_path / "home", obey_permissions=how == "chmod")
    assert_one_line_error(result, (locked.name, "Permission denied" if how == "chmod" else "Read-only file system"))
    changes = describe_changes(before, snapshot(tmp_path, exclude=(tmp_path / "home",)))
    assert not changes, changes
    if command == "preprocess-update":
        assert_same_cache(out, reference)  # the previous cache is still whole and usable


def test_synth_on_a_full_disk_is_one_line_and_leaves_no_case(small_disk, tmp_path):
    disk = small_disk(200)
    result = run_cli(["synth", str(disk / "s"), "--cases", "3", "--size", "8,64,64"], cwd=tmp_path,
                     home=tmp_path / "home")
    assert_one_line_error(result, (str(disk / "s"), "cannot write"))
    assert "No space left on device" in result.stderr or "written" in result.stderr
    assert not temporary_leftovers(disk)
    written = [p for p in (disk / "s").iterdir()] if (disk / "s").exists() else []
    assert all(len(list(p.iterdir())) == 16 for p in written), "a case folder with some slices missing"
