"""Every bad input gives one line naming the file, exit code 2 and no traceback (via the CLI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from data_fixtures import make_brats, make_lgg


class CliResult:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter: what a user sees."""
    return subprocess.run([sys.executable, "-m", "mriseg", *args], capture_output=True, text=True)


def run_main(capsys, monkeypatch, *args: str) -> CliResult:
    """``mriseg.cli.main`` in this process (same code path as the console script, no start-up cost)."""
    from mriseg.cli import main

    monkeypatch.setattr(sys, "argv", ["mriseg", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main()
    return CliResult(int(stop.value.code or 0), capsys.readouterr().err)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    return {"lgg": make_lgg(root / "lgg", cases=2, size=(4, 16, 16)),
            "brats": make_brats(root / "brats", cases=2, size=(12, 12, 8))}


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def brats_file(root: Path, case: int, modality: str) -> Path:
    name = f"BraTS2021_S{case:04d}"
    return root / name / f"{name}_{modality}.nii.gz"


def save_like(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


@pytest.fixture
def preprocess(capsys, monkeypatch):
    def run(source: Path, tmp_path: Path, *extra: str) -> CliResult:
        return run_main(capsys, monkeypatch, "preprocess", str(source), str(tmp_path / "cache"), *extra)
    return run


def test_missing_path_in_a_fresh_interpreter(tmp_path):
    result = run_cli("preprocess", str(tmp_path / "nowhere"), str(tmp_path / "cache"))
    assert_one_line_error(result, "nowhere", "no such file")


def test_unrecognised_layout(tmp_path, preprocess):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    assert_one_line_error(preprocess(tmp_path / "src", tmp_path), "src", "unrecognised layout")


def test_no_cases_found(tmp_path, preprocess):
    (tmp_path / "src").mkdir()
    assert_one_line_error(preprocess(tmp_path / "src", tmp_path, "--layout", "lgg"), "src", "no cases found")


def test_truncated_nifti(sources, tmp_path, preprocess):
    root = copy(sources["brats"], tmp_path / "src")
    target = brats_file(root, 2, "t2")
    target.write_bytes(target.read_bytes()[:200])
    assert_one_line_error(preprocess(root, tmp_path), target.name, "cannot read NIfTI")


def test_unreadable_tif(sources, tmp_path, preprocess):
    root = copy(sources["lgg"], tmp_path / "src")
    target = root / "TCGA_SY_0001_19990101" / "TCGA_SY_0001_19990101_3.tif"
    target.write_bytes(target.read_bytes()[:100])
    assert_one_line_error(preprocess(root, tmp_path), target.name, "cannot read image")


def test_image_and_mask_of_different_shapes(sources, tmp_path, preprocess):
    root = copy(sources["lgg"], tmp_path / "src")
    target = root / "TCGA_SY_0002_19990101" / "TCGA_SY_0002_19990101_2_mask.tif"
    tifffile.imwrite(target, np.zeros((8, 8), dtype=np.uint8))
    assert_one_line_error(preprocess(root, tmp_path), target.name, "differs from image shape")


def test_lgg_mask_with_odd_values(sources, tmp_path, preprocess):
    root = copy(sources["lgg"], tmp_path / "src")
    target = root / "TCGA_SY_0002_19990101" / "TCGA_SY_0002_19990101_1_mask.tif"
    tifffile.imwrite(target, np.full((16, 16), 7, dtype=np.uint8))
    assert_one_line_error(preprocess(root, tmp_path), target.name, "neither 0/255 nor 0/1")


def test_case_without_label_where_labels_are_required(sources, tmp_path, preprocess):
    root = copy(sources["brats"], tmp_path / "src")
    brats_file(root, 1, "seg").unlink()
    assert_one_line_error(preprocess(root, tmp_path), "BraTS2021_S0001", "no label")
    assert preprocess(root, tmp_path / "c2", "--allow-unlabelled").returncode == 0


def test_nan_voxels(sources, tmp_path, preprocess):
    root = copy(sources["brats"], tmp_path / "src")
    target = brats_file(root, 1, "flair")
    volume = np.zeros((12, 12, 8), dtype=np.float32)
    volume[3, 4, 5] = np.nan
    save_like(target, volume)
    assert_one_line_error(preprocess(root, tmp_path), target.name, "NaN/Inf")


def test_non_integer_labels(sources, tmp_path, preprocess):
    root = copy(sources["brats"], tmp_path / "src")
    target = brats_file(root, 2, "seg")
    save_like(target, np.full((12, 12, 8), 0.5, dtype=np.float32))
    assert_one_line_error(preprocess(root, tmp_path), target.name, "non-integer")


def test_modalities_of_different_shapes(sources, tmp_path, preprocess):
    root = copy(sources["brats"], tmp_path / "src")
    target = brats_file(root, 1, "t1ce")
    save_like(target, np.zeros((12, 12, 9), dtype=np.float32))
    assert_one_line_error(preprocess(root, tmp_path), target.name, "differs from")


def test_bad_modality_map(sources, tmp_path, preprocess):
    assert_one_line_error(preprocess(sources["brats"], tmp_path, "--modalities", "flair"), "--modalities")


def test_skip_bad_goes_on_and_lists_the_bad_cases(sources, tmp_path, preprocess):
    root = copy(sources["brats"], tmp_path / "src")
    target = brats_file(root, 2, "t2")
    target.write_bytes(target.read_bytes()[:200])
    result = preprocess(root, tmp_path, "--skip-bad", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad case(s): BraTS2021_S0002" in result.stderr
    assert (tmp_path / "cache" / "cases" / "BraTS2021_S0001" / "image.npy").is_file()
    assert not (tmp_path / "cache" / "cases" / "BraTS2021_S0002").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "preprocess", str(tmp_path / "nowhere"), str(tmp_path / "cache"))
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_synth_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    arguments = ("synth", str(tmp_path / "s"), "--cases", "1", "--size", "4,16,16")
    assert run_main(capsys, monkeypatch, *arguments).returncode == 0
    assert_one_line_error(run_main(capsys, monkeypatch, *arguments), "TCGA_SY_0001_19990101", "--overwrite")


def test_dicom_is_named_with_a_way_out(tmp_path, preprocess):
    """DICOM is what scanners write; a user who brings it gets told how to convert, not "unrecognised"."""
    series = tmp_path / "src" / "patient1" / "series2"
    series.mkdir(parents=True)
    for index in range(3):  # no .dcm suffix, as many PACS exports: found by the preamble
        (series / f"IM{index:04d}").write_bytes(bytes(128) + b"DICM" + bytes(200))
    assert_one_line_error(preprocess(tmp_path / "src" / "patient1", tmp_path), "patient1: holds DICOM", "dcm2niix")
    from mriseg.data.readers import read_case
    from mriseg.errors import BadInputError

    with pytest.raises(BadInputError, match="IM0000: is a DICOM file"):
        read_case(series / "IM0000")


def test_a_dataset_wrapped_in_one_more_folder_is_pointed_at(sources, tmp_path, preprocess):
    """Kaggle's download is lgg-mri-segmentation/kaggle_3m/TCGA_*: the error says where the data are."""
    copy(sources["lgg"], tmp_path / "lgg-mri-segmentation" / "kaggle_3m")
    result = preprocess(tmp_path / "lgg-mri-segmentation", tmp_path)
    assert_one_line_error(result, "one level down", "kaggle_3m (lgg layout)")
    assert not (tmp_path / "cache").exists()
