"""`mriseg evaluate`: metrics against medpy and hand values, the empty-mask policy, reports, bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from medpy.metric import binary as medpy_binary
from PIL import Image

from mriseg.errors import BadInputError, MrisegError
from mriseg.labels import Task
from mriseg.evaluate import (BOTH_EMPTY, PRED_EMPTY, REGION_SCHEMES, TRUTH_EMPTY, MaskVolume,
                             evaluate, evaluate_model, parse_regions, score_case, score_masks)


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mriseg", *map(str, args)], capture_output=True, text=True)


def cube(shape: tuple[int, ...], start: tuple[int, ...], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def save_nifti(path: Path, labels: np.ndarray, zooms: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))
    return path


def volume(case_id: str, labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> MaskVolume:
    return MaskVolume(case_id, labels.astype(np.uint8), tuple(spacing), None, Path(case_id))


# --- metrics against medpy and hand values ---------------------------------------------

def test_overlap_metrics_equal_hand_values():
    # truth 4 voxels, prediction 2 of them plus 2 outside: overlap 2.
    truth = np.zeros((1, 8), bool)
    truth[0, 0:4] = True
    pred = np.zeros((1, 8), bool)
    pred[0, 2:6] = True
    scores = score_masks(pred, truth, spacing=(1.0, 2.0))
    assert scores.dice == pytest.approx(2 * 2 / (4 + 4))
    assert scores.iou == pytest.approx(2 / 6)
    assert scores.sensitivity == pytest.approx(0.5)
    assert scores.precision == pytest.approx(0.5)
    assert scores.pred_ml == pytest.approx(4 * 2.0 / 1000)
    # Surface voxels of a 1-wide line are all its voxels; distances along axis 1 are 2 mm per voxel.
    # pred -> truth: 0, 0, 2, 4 mm; truth -> pred: 4, 2, 0, 0 mm; 95th percentile of the 8 values.
    assert scores.hd95 == pytest.approx(np.percentile([0, 0, 2, 4, 4, 2, 0, 0], 95))
    assert scores.assd == pytest.approx(12 / 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_medpy_on_non_empty_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 14, 10)
    truth = cube(shape, (2, 3, 2), 6) | (rng.random(shape) > 0.9)
    pred = cube(shape, (3, 4, 3), 6) | (rng.random(shape) > 0.9)
    spacing = (0.9, 1.1, 3.0)
    scores = score_masks(pred, truth, spacing)
    assert scores.dice == pytest.approx(medpy_binary.dc(pred, truth))
    assert scores.iou == pytest.approx(medpy_binary.jc(pred, truth))
    assert scores.sensitivity == pytest.approx(medpy_binary.sensitivity(pred, truth))
    assert scores.precision == pytest.approx(medpy_binary.precision(pred, truth))
    # Distances are computed on a cropped box; they must equal medpy on the whole volume.
    assert scores.hd95 == pytest.approx(medpy_binary.hd95(pred, truth, voxelspacing=spacing))
    assert scores.assd == pytest.approx(medpy_binary.assd(pred, truth, voxelspacing=spacing))


def test_anisotropic_spacing_scales_hd95_along_the_shifted_axis():
    truth = cube((20, 20, 20), (5, 5, 5), 6)
    shifted = np.roll(truth, 2, axis=2)  # 2 voxels along the last axis
    isotropic = score_masks(shifted, truth, (1.0, 1.0, 1.0)).hd95
    thick_slices = score_masks(shifted, truth, (1.0, 1.0, 3.0)).hd95
    other_axis = score_masks(shifted, truth, (3.0, 1.0, 1.0)).hd95
    assert isotropic == pytest.approx(2.0)
    assert thick_slices == pytest.approx(6.0)
    assert other_axis == pytest.approx(2.0)


def test_volumes_respect_spacing():
    mask = cube((10, 10, 10), (0, 0, 0), 5)  # 125 voxels
    scores = score_masks(mask, mask, (0.5, 1.0, 2.0))
    assert scores.true_ml == pytest.approx(125 * 1.0 / 1000)


# --- empty-mask policy -------------------------------------------------------------------

def test_both_empty_is_a_perfect_score():
    empty = np.zeros((4, 4, 4), bool)
    scores = score_masks(empty, empty, (1, 1, 1))
    assert (scores.dice, scores.iou, scores.hd95, scores.assd) == (1.0, 1.0, 0.0, 0.0)
    assert scores.empty_rule == BOTH_EMPTY


@pytest.mark.parametrize("pred_has_tumour", [True, False])
def test_exactly_one_empty_scores_zero_and_the_image_diagonal(pred_has_tumour):
    tumour = cube((6, 6, 6), (1, 1, 1), 2)
    empty = np.zeros_like(tumour)
    pred, truth = (tumour, empty) if pred_has_tumour else (empty, tumour)
    scores = score_masks(pred, truth, (1, 2, 3))
    assert (scores.dice, scores.iou) == (0.0, 0.0)
    # a missed (or invented) tumour is penalised, never left out of the mean
    assert scores.hd95 == scores.assd == pytest.approx(float(np.sqrt(6**2 + 12**2 + 18**2)))
    assert scores.empty_rule == (TRUTH_EMPTY if pred_has_tumour else PRED_EMPTY)


def test_missing_distance_is_the_brats_penalty_on_the_brats_grid():
    from mriseg.metrics import missing_distance

    assert missing_distance((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.128664, abs=1e-5)


def test_ignore_policy_drops_cases_whose_truth_is_empty():
    tumour = cube((6, 6, 6), (1, 1, 1), 2)
    empty = np.zeros_like(tumour)
    assert score_masks(tumour, empty, (1, 1, 1), empty="ignore").dice is None
    assert score_masks(empty, empty, (1, 1, 1), empty="ignore").dice is None
    assert score_masks(empty, tumour, (1, 1, 1), empty="ignore").dice == 0.0


def test_nan_policy_gives_nnunets_nanmean(tmp_path):
    """nnU-Net's compute_metrics: Dice = 2TP/(2TP+FP+FN), NaN when TP+FP+FN = 0; the mean is nanmean."""
    tumour = cube((8, 8, 8), (1, 1, 1), 4)
    empty = np.zeros_like(tumour)
    cases = {"both_empty": (empty, empty), "missed": (empty, tumour), "found": (np.roll(tumour, 1, 0), tumour),
             "invented": (tumour, empty)}
    for side in ("pred", "gt"):
        (tmp_path / side).mkdir()
    expected = []
    for case_id, (pred, truth) in cases.items():
        save_nifti(tmp_path / "pred" / f"{case_id}.nii.gz", pred)
        save_nifti(tmp_path / "gt" / f"{case_id}.nii.gz", truth)
        tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
        expected.append(np.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    result = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", empty="nan")
    dice = result.summary["regions"]["tumour"]["metrics"]["dice"]
    assert dice["mean"] == pytest.approx(np.nanmean(expected)) and dice["n"] == 3
    assert result.summary["empty_policy"]["name"] == "nan"
    assert score_masks(empty, empty, (1, 1, 1), empty="nan").hd95 is None


def test_unknown_empty_policy_is_an_error():
    with pytest.raises(MrisegError):
        score_masks(np.ones(3, bool), np.ones(3, bool), (1,), empty="drop")


def test_summary_counts_each_empty_rule_and_keeps_means_finite(tmp_path):
    tumour = cube((8, 8, 8), (2, 2, 2), 3)
    empty = np.zeros_like(tumour)
    pairs = {"good": (tumour, tumour), "missed": (empty, tumour), "false_alarm": (tumour, empty),
             "healthy": (empty, empty)}
    for side in ("pred", "gt"):
        (tmp_path / side).mkdir()
    for case_id, (pred, truth) in pairs.items():
        save_nifti(tmp_path / "pred" / f"{case_id}.nii.gz", pred)
        save_nifti(tmp_path / "gt" / f"{case_id}.nii.gz", truth)
    result = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    tumour_report = result.summary["regions"]["tumour"]
    assert tumour_report["empty"] == {BOTH_EMPTY: 1, PRED_EMPTY: 1, TRUTH_EMPTY: 1}
    assert tumour_report["metrics"]["dice"]["mean"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    hd95 = tumour_report["metrics"]["hd95"]
    # the two one-sided cases get the image diagonal (BraTS's penalty), never inf or left out
    assert hd95["n"] == 4 and hd95["max"] == pytest.approx(np.sqrt(3 * 8**2))
    assert hd95["mean"] == pytest.approx(2 * np.sqrt(3 * 8**2) / 4)
    text = (tmp_path / "out" / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text


# --- per-volume, regions -------------------------------------------------------------------

def test_per_volume_dice_differs_from_the_mean_over_slices():
    # Slice 0: a large tumour, predicted perfectly. Slice 1: one true voxel, missed.
    truth = np.zeros((2, 10, 10), bool)
    truth[0, :8, :8] = True
    truth[1, 0, 0] = True
    pred = truth.copy()
    pred[1] = False
    per_volume = score_masks(pred, truth, (1, 1, 1)).dice
    per_slice = np.mean([score_masks(pred[i], truth[i], (1, 1)).dice for i in range(2)])
    assert per_volume == pytest.approx(2 * 64 / (64 + 65))
    assert per_slice == pytest.approx(0.5)


def test_brats_regions_on_a_hand_made_label_volume():
    truth = np.zeros((1, 1, 10), np.uint8)
    truth[0, 0, :] = [0, 1, 1, 2, 2, 2, 3, 4, 4, 0]
    pred = np.zeros_like(truth)
    pred[0, 0, :] = [0, 1, 2, 2, 2, 0, 0, 4, 0, 0]
    rows = {row.region: row.scores for row in
            score_case(volume("c", pred), volume("c", truth), REGION_SCHEMES["brats"])}
    # WT {1,2,3,4}: truth 8 voxels, pred 5, overlap 5.
    assert rows["WT"].dice == pytest.approx(2 * 5 / 13)
    # TC {1,3,4}: truth at 1,2,6,7,8 (5), pred at 1,7 (2), overlap 2.
    assert rows["TC"].dice == pytest.approx(2 * 2 / 7)
    # ET {4}: truth at 7,8, pred at 7.
    assert rows["ET"].dice == pytest.approx(2 * 1 / 3)


def test_labels_scheme_scores_each_label_and_custom_regions_parse():
    truth = np.array([[[0, 1, 1, 2]]], np.uint8)
    pred = np.array([[[0, 1, 2, 2]]], np.uint8)
    rows = {row.region: row.scores.dice for row in score_case(volume("c", pred), volume("c", truth), "labels")}
    assert rows == {"label_1": pytest.approx(2 / 3), "label_2": pytest.approx(2 / 3)}
    custom = parse_regions("core=1,3;all=1,2,3")
    assert [(r.name, r.labels) for r in custom] == [("core", (1, 3)), ("all", (1, 2, 3))]
    with pytest.raises(MrisegError):
        parse_regions("core=")


def test_binary_scheme_refuses_a_multi_label_mask():
    labels = np.array([[[0, 1, 2]]], np.uint8)
    with pytest.raises(BadInputError, match="non-binary"):
        score_case(volume("c", labels), volume("c", labels), "binary")


# --- reports ------------------------------------------------------------------------------

def test_reports_csv_and_the_bar_plot_data_are_sorted_by_dice(tmp_path):
    truth = cube((10, 10, 10), (2, 2, 2), 5)
    shifts = {"case_a": 2, "case_b": 0, "case_c": 3, "case_d": 1}
    for side in ("pred", "gt"):
        (tmp_path / side).mkdir()
    for case_id, shift in shifts.items():
        save_nifti(tmp_path / "gt" / f"{case_id}.nii.gz", truth)
        save_nifti(tmp_path / "pred" / f"{case_id}.nii.gz", np.roll(truth, shift, axis=0))
    result = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    bars = result.plot["tumour"]
    assert bars.case_ids == ["case_c", "case_a", "case_d", "case_b"]  # ascending Dice, worst at the bottom
    assert bars.dice == sorted(bars.dice)
    assert bars.mean == pytest.approx(np.mean(bars.dice))
    assert bars.median == pytest.approx(np.median(bars.dice))
    png = tmp_path / "out" / "dsc.png"
    with Image.open(png) as image:
        assert image.format == "PNG"
    with open(tmp_path / "out" / "metrics.csv", newline="") as stream:
        records = list(csv.DictReader(stream))
    assert [r["case_id"] for r in records] == sorted(shifts)
    assert float(records[1]["dice"]) == pytest.approx(1.0)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


# --- the command line ------------------------------------------------------------------

@pytest.fixture
def two_folders(tmp_path):
    truth = cube((8, 8, 8), (2, 2, 2), 4)
    for side in ("pred", "gt"):
        (tmp_path / side).mkdir()
    for case_id in ("p1", "p2"):
        save_nifti(tmp_path / "gt" / f"{case_id}_seg.nii.gz", truth, zooms=(1.0, 1.0, 2.0))
        save_nifti(tmp_path / "pred" / f"{case_id}.nii.gz", np.roll(truth, 1, axis=1), zooms=(1.0, 1.0, 2.0))
    return tmp_path


def test_cli_json_summary_and_refusal_to_overwrite(two_folders):
    out = two_folders / "out"
    result = run_cli("evaluate", two_folders / "pred", two_folders / "gt", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["cases"] == 2
    assert summary["regions"]["tumour"]["metrics"]["dice"]["mean"] == pytest.approx(0.75)
    assert "p1" in result.stderr  # the table
    again = run_cli("evaluate", two_folders / "pred", two_folders / "gt", "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert evaluate(two_folders / "pred", two_folders / "gt", out, overwrite=True).summary["cases"] == 2


def test_workers_give_the_same_report_in_the_same_order(tmp_path):
    rng = np.random.default_rng(3)
    for side in ("pred", "gt"):
        (tmp_path / side).mkdir()
    for number_ in range(6):
        truth = cube((10, 10, 10), tuple(int(v) for v in rng.integers(0, 4, size=3)), 5)
        save_nifti(tmp_path / "gt" / f"c{number_}.nii.gz", truth)
        save_nifti(tmp_path / "pred" / f"c{number_}.nii.gz", np.roll(truth, number_ % 3, axis=0))
    serial = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "one")
    parallel = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "three", workers=3)
    assert (tmp_path / "one" / "metrics.csv").read_text() == (tmp_path / "three" / "metrics.csv").read_text()
    assert serial.summary == parallel.summary
    with pytest.raises(MrisegError, match="--workers"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "zero", workers=0)


def test_unmatched_cases_are_listed_and_strict_refuses(two_folders, capsys):
    save_nifti(two_folders / "pred" / "extra.nii.gz", cube((8, 8, 8), (0, 0, 0), 2))
    result = evaluate(two_folders / "pred", two_folders / "gt", two_folders / "o1")
    assert "predictions without truth: extra" in capsys.readouterr().err
    assert result.summary["unmatched"] == {"pred_only": ["extra"], "truth_only": []}
    strict = run_cli("evaluate", two_folders / "pred", two_folders / "gt", "--out", two_folders / "o2", "--strict")
    assert strict.returncode == 2 and "extra" in strict.stderr and "Traceback" not in strict.stderr


def test_cli_shape_mismatch_names_both_shapes(two_folders):
    save_nifti(two_folders / "pred" / "p2.nii.gz", np.zeros((8, 8, 7), np.uint8))
    result = run_cli("evaluate", two_folders / "pred", two_folders / "gt", "--out", two_folders / "out")
    assert result.returncode == 2
    assert "(8, 8, 7)" in result.stderr and "(8, 8, 8)" in result.stderr
    assert "Traceback" not in result.stderr


def test_affine_mismatch_is_an_error(two_folders):
    save_nifti(two_folders / "pred" / "p2.nii.gz", np.zeros((8, 8, 8), np.uint8), zooms=(1.0, 1.0, 1.0))
    with pytest.raises(BadInputError, match="affine") as error:
        evaluate(two_folders / "pred", two_folders / "gt", two_folders / "out")
    assert error.value.path.name == "p2.nii.gz"


def test_cli_unreadable_file_gives_one_line(two_folders):
    (two_folders / "pred" / "p2.nii.gz").write_bytes(b"not a nifti file")
    result = run_cli("evaluate", two_folders / "pred", two_folders / "gt", "--out", two_folders / "out")
    assert result.returncode == 2 and "p2.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == \
        [line for line in result.stderr.splitlines() if "p2.nii.gz" in line]


def test_non_binary_prediction_is_refused_with_a_hint(two_folders):
    two_labels = cube((8, 8, 8), (0, 0, 0), 2) * 2 + cube((8, 8, 8), (4, 4, 4), 2) * 4
    save_nifti(two_folders / "pred" / "p2.nii.gz", two_labels, zooms=(1.0, 1.0, 2.0))
    with pytest.raises(BadInputError, match="non-binary.*--regions"):
        evaluate(two_folders / "pred", two_folders / "gt", two_folders / "out")


def test_cli_tif_slice_folders_are_stacked_in_slice_number_order(tmp_path):
    # Slice numbers 2 and 10: a lexical sort would put 10 first and misalign the volume.
    for side in ("pred", "gt"):
        folder = tmp_path / side / "TCGA_XX_0001"
        folder.mkdir(parents=True)
        for number, filled in ((2, True), (10, False)):
            mask = np.zeros((6, 6), np.uint8)
            if filled:
                mask[1:4, 1:4] = 255
            Image.fromarray(mask).save(folder / f"TCGA_XX_0001_{number}_mask.tif")
    # The prediction has the tumour on slice 2 only if the stack order is numeric.
    result = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert result.rows[0].scores.dice == pytest.approx(1.0)
    assert result.rows[0].scores.true_ml == pytest.approx(9 / 1000)


def test_cli_missing_path_is_a_one_line_error(tmp_path):
    result = run_cli("evaluate", tmp_path / "nope", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2 and "nope" in result.stderr and "Traceback" not in result.stderr


# --- properties ----------------------------------------------------------------------------

masks = arrays(np.bool_, st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dice_properties(data):
    pred = data.draw(masks)
    truth = data.draw(arrays(np.bool_, pred.shape))
    forward = score_masks(pred, truth, (1, 1, 1))
    backward = score_masks(truth, pred, (1, 1, 1))
    assert forward.dice == pytest.approx(backward.dice)
    assert 0.0 <= forward.dice <= 1.0
    # Dice 1 exactly when the masks are equal (two empty masks score 1 by the policy).
    assert (forward.dice == 1.0) == bool(np.array_equal(pred, truth))
    assert forward.iou == pytest.approx(forward.dice / (2 - forward.dice))
    if forward.hd95 is not None:
        assert forward.hd95 == pytest.approx(backward.hd95)
        assert 0.0 <= forward.assd <= np.sqrt(3 * 25)


# --- the truth as a dataset the readers know ---------------------------------------------

def test_lgg_dataset_truth_against_predict_style_slice_masks(tmp_path):
    patient = "TCGA_XX_0002_20000101"
    truth_slices = {1: cube((8, 8), (1, 1), 3), 2: cube((8, 8), (2, 2), 4), 10: np.zeros((8, 8), bool)}
    (tmp_path / "data" / patient).mkdir(parents=True)
    (tmp_path / "pred" / patient).mkdir(parents=True)
    (tmp_path / "pred" / "overlays" / patient).mkdir(parents=True)  # predict's pictures, not a case
    for number, mask in truth_slices.items():
        image = np.zeros((8, 8, 3), np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / patient / f"{patient}_{number}.tif")
        mask_name = f"{patient}_{number}_mask.tif"
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "data" / patient / mask_name)
        predicted = mask if number != 2 else np.zeros_like(mask)
        Image.fromarray(predicted.astype(np.uint8) * 255).save(tmp_path / "pred" / patient / mask_name)
    result = evaluate(tmp_path / "pred", tmp_path / "data", tmp_path / "out", strict=True)
    assert result.summary["scheme"] == "binary"
    (row,) = result.rows
    assert row.case_id == patient
    assert row.scores.dice == pytest.approx(2 * 9 / (9 + 25))  # over the whole patient, slice 2 missed


def test_real_brats_case_scored_on_brats_regions(shared_data, tmp_path):
    case = shared_data / "brats" / "brats_2013_pat0002_1"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / case.name).symlink_to(case)
    (tmp_path / "pred").mkdir()
    truth = nib.load(str(case / "OTMultiClass.nii.gz"))
    labels = np.asarray(truth.dataobj).astype(np.uint8)
    predicted = np.where(labels == 4, 1, labels)  # enhancing tumour predicted as necrosis
    # Uncompressed: writing a .nii.gz of this size takes seconds.
    nib.save(nib.Nifti1Image(predicted, truth.affine, truth.header),
             str(tmp_path / "pred" / f"{case.name}_seg.nii"))
    result = evaluate(tmp_path / "pred", tmp_path / "data", tmp_path / "out",
                      modalities="flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass")
    dice = {row.region: row.scores for row in result.rows}
    assert result.summary["scheme"] == "brats"
    assert dice["WT"].dice == 1.0 and dice["TC"].dice == 1.0
    assert dice["ET"].empty_rule == PRED_EMPTY and dice["ET"].dice == 0.0
    assert dice["ET"].true_ml == pytest.approx(8219 / 1000)  # PROVENANCE.md: 8219 voxels of label 4 at 1 mm


# --- --model: predict in memory ------------------------------------------------------------

def save_small_unet(path: Path, modalities: list[str]) -> Path:
    """An untrained 2D U-Net checkpoint: its masks are arbitrary but deterministic, which is all
    a comparison of two ways to score them needs."""
    import torch

    from mriseg.checkpoint import save_checkpoint
    from mriseg.data.preprocess import PreprocessParams
    from mriseg.models import build_model

    torch.manual_seed(0)
    network = build_model("unet", len(modalities), 1, spatial_dims=2, features=4)
    torch.nn.init.constant_(list(network.parameters())[-1], 0.05)  # a bias that leaves some voxels positive
    save_checkpoint(path, {"model": {"name": "unet", "in_channels": len(modalities), "out_channels": 1,
                                     "spatial_dims": 2, "options": {"features": 4}},
                           "state_dict": network.state_dict(), "preprocess": PreprocessParams(norm="max").to_dict(),
                           "modalities": modalities, "task": {"kind": "binary", "labels": [0, 1]},
                           "epoch": 1, "best_score": 0.0})
    return path


def test_model_mode_scores_exactly_what_predict_writes(tmp_path):
    from mriseg.data.readers import read_case
    from mriseg.data.synthetic import write_synthetic
    from mriseg.predict import PredictOptions, load_model, predict_path

    write_synthetic(tmp_path / "data", layout="lgg", cases=2, seed=3, size=(4, 32, 32))
    checkpoint = save_small_unet(tmp_path / "model.pt", read_case(next((tmp_path / "data").iterdir())).modalities)
    in_memory = evaluate_model(checkpoint, tmp_path / "data", tmp_path / "scores_memory")

    loaded = load_model(checkpoint, "cpu")
    for case_folder in sorted((tmp_path / "data").iterdir()):
        [written] = predict_path(str(case_folder), loaded, PredictOptions(out=tmp_path / "pred"))
        assert written.status == "ok", written.error
    on_disk = evaluate(tmp_path / "pred", tmp_path / "data", tmp_path / "scores_disk", strict=True)

    assert [r.as_record() for r in in_memory.rows] == [r.as_record() for r in on_disk.rows]
    assert len(in_memory.rows) == 2


def test_auto_scheme_follows_the_dataset_and_the_checkpoint():
    from types import SimpleNamespace

    from mriseg.evaluate import scheme_from_task, scheme_for_dataset

    def ref(layout, naming="", label_names=()):
        return SimpleNamespace(layout=layout, naming=naming, label_names=label_names)

    assert scheme_for_dataset(ref("brats")) == "brats"
    assert scheme_for_dataset(ref("brats", naming="brats2023")) == "brats2023"
    msd_brain = ((0, "background"), (1, "edema"), (2, "non-enhancing tumor"), (3, "enhancing tumour"))
    assert scheme_for_dataset(ref("msd", label_names=msd_brain)) == "msd"
    assert scheme_for_dataset(ref("msd", label_names=((0, "background"), (1, "tumour")))) == "binary"
    assert scheme_for_dataset(ref("msd", label_names=((0, "bg"), (1, "liver"), (2, "cancer")))) == "labels"
    assert scheme_for_dataset(ref("lgg")) == "binary"
    regions = scheme_from_task(Task.from_dict({"kind": "regions", "regions": {"WT": [1, 2, 4], "TC": [1, 4],
                                                                              "ET": [4]}}))
    assert [(r.name, r.labels) for r in regions] == [("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))]
    assert scheme_from_task(Task.from_dict({"kind": "binary", "labels": [0, 1]})) is None


@pytest.mark.parametrize("unit, per_mm", [("micron", 1000.0), ("meter", 0.001), ("mm", 1.0)])
def test_distances_and_volumes_are_in_mm_whatever_the_niftis_length_unit(tmp_path, unit, per_mm):
    """1.5 x 1 x 2 mm voxels written in microns or metres must score exactly as in mm (medpy, in mm)."""
    truth = cube((20, 20, 12), (4, 4, 3), 6)
    pred = cube((20, 20, 12), (6, 5, 3), 6)
    spacing = (1.5, 1.0, 2.0)
    for side, labels in (("pred", pred), ("gt", truth)):
        (tmp_path / side).mkdir()
        image = nib.Nifti1Image(labels.astype(np.uint8), np.diag([*(s * per_mm for s in spacing), 1.0]))
        image.header.set_xyzt_units(unit, "sec")
        nib.save(image, str(tmp_path / side / "case.nii.gz"))
    [row] = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out").rows
    assert row.scores.hd95 == pytest.approx(medpy_binary.hd95(pred, truth, voxelspacing=spacing))
    assert row.scores.assd == pytest.approx(medpy_binary.assd(pred, truth, voxelspacing=spacing))
    assert row.scores.true_ml == pytest.approx(truth.sum() * 3.0 / 1000)


def test_two_label_conventions_are_pointed_out(tmp_path, capsys):
    """A BraTS 2023-style prediction (enhancing tumour 3) against BraTS 2021 truth (4) scores ET 0
    everywhere; the mismatch is said, not left for the user to guess from the numbers."""
    truth = np.zeros((12, 12, 8), np.uint8)
    truth[2:8, 2:8, 2:6] = 2
    truth[4:6, 4:6, 3:5] = 4
    pred = np.where(truth == 4, 3, truth)
    for side, labels in (("pred", pred), ("gt", truth)):
        (tmp_path / side).mkdir()
        save_nifti(tmp_path / side / "case.nii.gz", labels)
    evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", regions="brats")
    said = capsys.readouterr().err
    assert "labels [3] that no truth case has, and the truth [4]" in said
    same = np.where(truth == 4, 4, truth)
    save_nifti(tmp_path / "pred" / "case.nii.gz", np.where(same == 2, 0, same))  # a label missed: no warning
    evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out2", regions="brats")
    assert "conventions" not in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [(["--largest-component"], "--largest-component"),
                                          (["--no-tta", "--batch-size", "2"], "--batch-size, --tta/--no-tta"),
                                          (["--model", "run", "--strict"], "--strict")])
def test_options_of_the_other_mode_are_refused_not_ignored(tmp_path, args, named):
    paths = ["data"] if "--model" in args else ["pred", "gt"]
    result = run_cli("evaluate", *paths, *args, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {named}")
