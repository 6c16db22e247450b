"""mriseg predict: inference engines, post-processing, writers, overlays and the command itself.

The geometry tests use a "model" whose answer is known (it thresholds one input channel),
so the written mask must land exactly on the voxels that were bright in that channel.
The command-line tests use a tiny randomly initialised registry U-Net saved exactly as
training saves checkpoints.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mriseg import viz
from mriseg.checkpoint import save_checkpoint
from mriseg.data.preprocess import PreprocessParams
from mriseg.errors import MrisegError
from mriseg.models import build_model
from mriseg.inference import (LoadedModel, gaussian_importance_map, keep_largest_component, load_model,
                              resolve_model_path, window_starts, with_flips)
from mriseg.inference import slicewise as slicewise_predict
from mriseg.inference import sliding_window as sliding_window_predict
from mriseg.labels import Task, regions_to_labels
from mriseg.predict import PredictOptions, parse_shard, predict, predict_path, take_shard


def probabilities_to_labels(probabilities, task, threshold=0.5):
    return Task.from_dict({**task, "threshold": threshold}).decode(probabilities)

# LPS like the real BraTS cases (diag(-1, -1, 1), y offset 239), with anisotropic voxels.
LPS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.2, 0, 239], [0, 0, 2.0, 0], [0, 0, 0, 1]])
SHAPE = (24, 20, 12)
BRATS_NAMES = "flair=flair,t1ce=t1ce,seg=seg"


def position_encoder(batch: torch.Tensor) -> torch.Tensor:
    """A 'model' whose output is its input plus a marker channel: any seam or misplaced
    window in an engine shows up as a difference from the input."""
    return torch.cat([batch, batch[:, :1] * 2 + 1], dim=1)


# --- engines -------------------------------------------------------------------

@pytest.mark.parametrize("size,patch,overlap", [(10, 4, 0.5), (9, 4, 0.5), (4, 4, 0.5), (3, 8, 0.25), (100, 32, 0.75)])
def test_windows_cover_every_voxel_and_stay_inside(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(max(size, patch), dtype=bool)
    for start in starts:
        assert 0 <= start and start + patch <= max(size, patch)
        covered[start:start + patch] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts))


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    weights = gaussian_importance_map((9, 7, 5))
    assert weights.shape == (9, 7, 5)
    assert weights.argmax().item() == np.ravel_multi_index((4, 3, 2), (9, 7, 5))
    assert weights.min() >= 1e-3


@pytest.mark.parametrize("shape,patch", [((2, 20, 17, 9), (8, 8, 8)), ((1, 5, 6, 3), (8, 8, 8))])
def test_sliding_window_reproduces_a_position_exact_model(shape, patch):
    image = torch.randn(shape)
    scores = sliding_window_predict(position_encoder, image, patch, overlap=0.5, batch_size=3)
    assert scores.shape == (shape[0] + 1, *shape[1:])
    torch.testing.assert_close(scores[:shape[0]], image)
    torch.testing.assert_close(scores[shape[0]], image[0] * 2 + 1)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_slicewise_keeps_axis_order_and_crops_padding(slice_axis):
    image = torch.randn(2, 7, 9, 11)
    seen_shapes = []

    def recording(batch):
        seen_shapes.append(tuple(batch.shape[-2:]))
        return position_encoder(batch)

    scores = slicewise_predict(recording, image, slice_axis, batch_size=4)
    torch.testing.assert_close(scores[:2], image)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in seen_shapes)


def test_slicewise_on_a_single_2d_image():
    image = torch.randn(3, 40, 33)
    torch.testing.assert_close(slicewise_predict(position_encoder, image, None)[:3], image)


def test_flip_averaging_undoes_each_flip():
    image = torch.randn(1, 2, 6, 5, 4)
    torch.testing.assert_close(with_flips(position_encoder, 3)(image), position_encoder(image))


# --- post-processing -------------------------------------------------------------

def test_binary_threshold_and_multiclass_argmax():
    probabilities = np.array([[[0.2, 0.5, 0.9]]])
    assert probabilities_to_labels(probabilities, {"kind": "binary"}).tolist() == [[0, 1, 1]]
    assert probabilities_to_labels(probabilities, {"kind": "binary"}, threshold=0.6).tolist() == [[0, 0, 1]]
    scores = np.array([[0.7, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.1, 0.7]])[..., None]
    labels = probabilities_to_labels(scores, {"kind": "multiclass", "labels": [0, 2, 4]})
    assert labels[:, 0].tolist() == [0, 2, 4]


def test_brats_regions_paint_back_to_labels_1_2_4():
    regions = [[1, 2, 4], [1, 4], [4]]  # whole tumour, tumour core, enhancing
    masks = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    assert regions_to_labels(masks, regions).tolist() == [0, 2, 1, 4]
    task = {"kind": "regions", "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}}
    assert probabilities_to_labels(masks.astype(float), task).tolist() == [0, 2, 1, 4]


def test_largest_component_keeps_one_face_connected_blob():
    labels = np.zeros((5, 8), dtype=np.uint8)
    labels[0:3, 0:3] = 1
    labels[3, 3] = 2          # touches the big blob only at a corner: a separate blob
    labels[4, 6:8] = 1
    kept = keep_largest_component(labels)
    assert kept[0:3, 0:3].all() and kept.sum() == 9


# --- overlays --------------------------------------------------------------------

def test_outline_is_the_inner_border():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    expected = mask.copy()
    expected[2:5, 2:5] = False
    assert np.array_equal(viz.outline(mask), expected)


def test_binary_overlay_paints_red_prediction_and_green_truth_exactly():
    grey = np.full((20, 30), 90, dtype=np.uint8)
    predicted = np.zeros((20, 30), dtype=bool)
    predicted[3:12, 4:15] = True
    truth = np.zeros((20, 30), dtype=bool)
    truth[8:17, 10:25] = True
    picture = viz.overlay_binary(grey, predicted, truth)
    red = np.all(picture == viz.PREDICTION_COLOUR, axis=-1)
    green = np.all(picture == viz.TRUTH_COLOUR, axis=-1)
    assert np.array_equal(green, viz.outline(truth))
    assert np.array_equal(red, viz.outline(predicted) & ~viz.outline(truth))


def test_multiclass_overlay_has_a_prediction_and_a_truth_panel_with_legend():
    grey = np.zeros((40, 50), dtype=np.uint8)
    labels = np.zeros((40, 50), dtype=np.uint8)
    labels[5:20, 5:20], labels[8:12, 8:12] = 2, 4
    picture = viz.overlay_picture(grey, labels, labels, True, {2: "oedema", 4: "enhancing"}, "slice 1/1")
    scale = -(-viz.MIN_PICTURE_WIDTH // (2 * 50 + 2))
    legend_height = picture.shape[0] - 40 * scale
    assert picture.shape[1:] == ((2 * 50 + 2) * scale, 3)
    assert legend_height > 0 and legend_height % viz.LEGEND_HEIGHT == 0  # wrapped onto whole lines
    panel = picture[:40 * scale:scale, :50 * scale:scale]
    assert np.array_equal(np.all(panel == viz.LABEL_COLOURS[4], axis=-1), viz.outline(labels == 4))


# --- fixtures: cases on disk and models -------------------------------------------

class ThresholdNet(torch.nn.Module):
    """Logits that are positive exactly where input channel ``channel`` exceeds 0.5."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.steepness = torch.nn.Parameter(torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, self.channel:self.channel + 1] - 0.5) * self.steepness


def save_nifti(array: np.ndarray, path: Path, qform_code: int = 1, sform_code: int = 2) -> Path:
    image = nib.Nifti1Image(array, LPS_AFFINE)
    image.set_qform(LPS_AFFINE, code=qform_code)
    image.set_sform(LPS_AFFINE, code=sform_code)
    nib.save(image, path)
    return path


def write_brats_case(folder: Path, case_id: str = "case1") -> np.ndarray:
    """A two-modality case whose tumour is bright only in T1ce; returns the tumour mask.

    The tumour is an L shape off-centre, so a flipped or transposed mask cannot match.
    """
    case = folder / case_id
    case.mkdir(parents=True)
    flair = np.zeros(SHAPE, np.float32)
    flair[2:22, 3:19, 1:11] = 1.0
    t1ce = flair.copy()
    t1ce[8:12, 6:14, 4:7] = 4.0
    t1ce[12:15, 6:8, 4:7] = 4.0
    tumour = (t1ce == 4).astype(np.uint8)
    save_nifti(flair, case / f"{case_id}_flair.nii.gz")
    save_nifti(t1ce, case / f"{case_id}_t1ce.nii.gz")
    save_nifti(tumour, case / f"{case_id}_seg.nii.gz")
    return tumour


def threshold_model(tmp_path: Path, spatial_dims: int, modalities: list[str], channel: int,
                    params: PreprocessParams, **extra) -> LoadedModel:
    checkpoint = {"model": {"name": "threshold", "in_channels": len(modalities), "out_channels": 1,
                            "spatial_dims": spatial_dims, "options": {}},
                  "preprocess": params.to_dict(), "modalities": modalities,
                  "task": {"kind": "binary", "labels": [0, 1]}, **extra}
    return LoadedModel(path=tmp_path / "threshold.pt", checkpoint=checkpoint, network=ThresholdNet(channel),
                       device=torch.device("cpu"))


def save_unet_checkpoint(path: Path, modalities: list[str], spatial_dims: int = 2) -> Path:
    torch.manual_seed(0)
    network = build_model("unet", len(modalities), 1, spatial_dims=spatial_dims, features=4)
    save_checkpoint(path, {"model": {"name": "unet", "in_channels": len(modalities), "out_channels": 1,
                                     "spatial_dims": spatial_dims, "options": {"features": 4}},
                           "state_dict": network.state_dict(), "preprocess": PreprocessParams(norm="max").to_dict(),
                           "modalities": modalities, "task": {"kind": "binary", "labels": [0, 1]},
                           "epoch": 1, "best_score": 0.0})
    return path


def run_cli(*args: str, cwd: Path, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mriseg", *args], capture_output=True, text=True, cwd=cwd,
                          input=stdin, env={**os.environ, **(env or {})})


# --- geometry --------------------------------------------------------------------

@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nifti_mask_keeps_shape_affine_codes_and_lands_on_the_right_voxels(tmp_path, spatial_dims):
    tumour = write_brats_case(tmp_path / "data")
    # Crop to the brain, then enlarge exactly 2x in-plane (or in 3D): the mask must come back exactly.
    size = (40, 32) if spatial_dims == 2 else (40, 32, 20)
    model = threshold_model(tmp_path, spatial_dims, ["t1ce", "flair"], channel=0,
                            params=PreprocessParams(size=size, crop=True, norm="max"), patch_size=[16, 16, 16])
    options = PredictOptions(out=tmp_path / "out", modalities=BRATS_NAMES)
    [result] = predict_path(str(tmp_path / "data" / "case1"), model, options)
    assert result.status == "ok", result.error
    written = nib.load(result.outputs["mask"])
    source = nib.load(tmp_path / "data" / "case1" / "case1_flair.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    np.testing.assert_allclose(written.header.get_zooms(), source.header.get_zooms())
    np.testing.assert_array_equal(np.asarray(written.dataobj), tumour)
    assert result.volume_ml == pytest.approx(tumour.sum() * 1.0 * 1.2 * 2.0 / 1000)


def test_probabilities_are_written_in_the_source_grid(tmp_path):
    write_brats_case(tmp_path / "data")
    model = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(crop=True, norm="max"))
    options = PredictOptions(out=tmp_path / "out", modalities=BRATS_NAMES, probabilities=True)
    [result] = predict_path(str(tmp_path / "data" / "case1"), model, options)
    soft = nib.load(result.outputs["probabilities"])
    assert soft.shape == (*SHAPE, 1)
    np.testing.assert_array_equal(soft.affine, nib.load(tmp_path / "data" / "case1" / "case1_flair.nii.gz").affine)
    mask = np.asarray(nib.load(result.outputs["mask"]).dataobj)
    assert np.array_equal(np.asarray(soft.dataobj)[..., 0] > 0.5, mask > 0)


def write_lgg_patient(folder: Path, patient: str = "TCGA_XX_0001_20000101", slices: int = 4) -> list[np.ndarray]:
    """kaggle_3m-style slices (RGB TIF, FLAIR in the green channel) and masks; returns the masks."""
    folder.mkdir(parents=True)
    masks = []
    for n in range(1, slices + 1):
        rgb = np.zeros((32, 32, 3), np.uint8)
        rgb[4:28, 4:28] = 60
        mask = np.zeros((32, 32), np.uint8)
        if n in (2, 3):
            mask[10:16 + n, 8:14] = 255
        rgb[..., 1][mask > 0] = 240
        Image.fromarray(rgb).save(folder / f"{patient}_{n}.tif")
        Image.fromarray(mask).save(folder / f"{patient}_{n}_mask.tif")
        masks.append(mask)
    return masks


def test_tif_slice_folder_gives_one_mask_per_slice_named_like_the_source(tmp_path):
    masks = write_lgg_patient(tmp_path / "TCGA_XX_0001_20000101")
    model = threshold_model(tmp_path, 2, ["pre-contrast", "flair", "post-contrast"], channel=1,
                            params=PreprocessParams(size=(64, 64), norm="max"))
    [result] = predict_path(str(tmp_path / "TCGA_XX_0001_20000101"), model, PredictOptions(out=tmp_path / "out"))
    assert result.status == "ok", result.error
    folder = Path(result.outputs["mask"])
    expected_names = [f"TCGA_XX_0001_20000101_{n}_mask.tif" for n in range(1, 5)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected_names)
    for n, expected in enumerate(masks, start=1):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / f"TCGA_XX_0001_20000101_{n}_mask.tif")), expected)


# --- overlays and GIFs -----------------------------------------------------------------

def test_overlays_outline_prediction_red_and_truth_green_and_gif_has_one_frame_per_overlay(tmp_path):
    truth = write_brats_case(tmp_path / "data")
    model = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(crop=True, norm="max"))
    # Predicted tumour: the truth minus two slices (so red and green differ there).
    truth_file = tmp_path / "truth.nii.gz"
    shifted = np.zeros_like(truth)
    shifted[:, :, 3:8] = truth[:, :, 4:9]  # the true labels given by --labels: one slice lower
    save_nifti(shifted, truth_file)
    options = PredictOptions(out=tmp_path / "out", modalities=BRATS_NAMES, overlay=True, gif=True,
                             labels=truth_file)
    [result] = predict_path(str(tmp_path / "data" / "case1"), model, options)
    assert result.status == "ok", result.error
    pngs = sorted(Path(result.outputs["overlays"]).iterdir())
    slices_with_tumour = sorted(set(np.nonzero(truth)[2]) | set(np.nonzero(shifted)[2]))
    assert [p.name for p in pngs] == [f"case1_{k:03d}.png" for k in slices_with_tumour]
    codes = nib.aff2axcodes(LPS_AFFINE)
    predicted_planes = viz.display_planes(truth, 2, codes)
    true_planes = viz.display_planes(shifted, 2, codes)
    for png, k in zip(pngs, slices_with_tumour):
        picture = np.asarray(Image.open(png).convert("RGB"))
        rows, cols = predicted_planes[k].shape
        scale = -(-viz.MIN_PICTURE_WIDTH // cols)
        body = picture[:rows * scale:scale, :cols * scale:scale]
        red = np.all(body == viz.PREDICTION_COLOUR, axis=-1)
        green = np.all(body == viz.TRUTH_COLOUR, axis=-1)
        assert np.array_equal(green, viz.outline(true_planes[k] > 0))
        assert np.array_equal(red, viz.outline(predicted_planes[k] > 0) & ~green)
    gif = Image.open(result.outputs["gif"])
    assert gif.n_frames == len(pngs)


def test_all_slices_draws_every_slice(tmp_path):
    write_lgg_patient(tmp_path / "P_1", patient="P_1")
    model = threshold_model(tmp_path, 2, ["pre-contrast", "flair", "post-contrast"], 1, PreprocessParams(norm="max"))
    options = PredictOptions(out=tmp_path / "out", overlay=True, all_slices=True, gif=True, gif_fps=4)
    [result] = predict_path(str(tmp_path / "P_1"), model, options)
    names = sorted(p.name for p in Path(result.outputs["overlays"]).iterdir())
    assert names == [f"P_1_{n}.png" for n in range(1, 5)]
    gif = Image.open(result.outputs["gif"])
    assert gif.n_frames == 4 and gif.info["duration"] == 250


# --- inputs, shards and the command line ---------------------------------------------

@given(st.lists(st.text(min_size=1, max_size=5), max_size=40), st.integers(1, 12))
def test_shards_cover_every_input_exactly_once(items, count):
    taken = [item for index in range(count) for item in take_shard(items, index, count)]
    assert sorted(taken) == sorted(items)
    positions = sorted(position for index in range(count) for position in take_shard(range(len(items)), index, count))
    assert positions == list(range(len(items)))


@pytest.mark.parametrize("text", ["3/3", "1", "-1/2", "a/b", "1/0"])
def test_bad_shard_is_a_user_error(text):
    with pytest.raises(MrisegError):
        parse_shard(text)


def save_volume_file(path: Path, channels: int = 2) -> Path:
    volume = np.zeros((*SHAPE, channels), np.float32)
    volume[2:22, 3:19, 1:11] = 1.0
    return save_nifti(volume, path)


def test_stdin_paths_json_lines_and_default_model_from_environment(tmp_path):
    checkpoint = save_unet_checkpoint(tmp_path / "model.pt", ["t1ce", "flair"])
    paths = [save_volume_file(tmp_path / f"vol{i}.nii.gz") for i in range(2)]
    result = run_cli("predict", "-", "--json", cwd=tmp_path, stdin="\n".join(map(str, paths)) + "\n",
                     env={"MRISEG_MODEL": str(checkpoint)})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["case_id"] for line in lines] == ["vol0", "vol1"]
    assert all(line["status"] == "ok" and line["volume_ml"] >= 0 and line["seconds"] > 0 for line in lines)
    assert "MRISEG_MODEL" in result.stderr and "predictions" in result.stderr
    for line in lines:
        mask = nib.load(tmp_path / line["outputs"]["mask"])
        assert mask.shape == SHAPE


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    write_brats_case(tmp_path / "data")
    model = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(norm="max"))
    options = PredictOptions(out=tmp_path / "out", modalities=BRATS_NAMES)
    case = str(tmp_path / "data" / "case1")
    assert predict_path(case, model, options)[0].status == "ok"
    mask = tmp_path / "out" / "case1_seg.nii.gz"
    mask.write_bytes(b"precious")
    [refused] = predict_path(case, model, options)
    assert refused.status == "failed" and "--overwrite" in refused.error and mask.read_bytes() == b"precious"
    options.overwrite = True
    assert predict_path(case, model, options)[0].status == "ok" and nib.load(mask).shape == SHAPE
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MRISEG_MODEL", raising=False)
    with pytest.raises(MrisegError, match="mriseg train.*mriseg demo"):
        resolve_model_path(None)
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    (tmp_path / "runs" / "latest" / "best.pt").write_bytes(b"")
    assert resolve_model_path(None) == Path("runs/latest/best.pt")


def test_each_bad_input_is_reported_and_the_others_finish(tmp_path):
    checkpoint = save_unet_checkpoint(tmp_path / "model.pt", ["t1ce", "flair"])
    good = save_volume_file(tmp_path / "good.nii.gz")
    truncated = save_volume_file(tmp_path / "truncated.nii.gz")
    truncated.write_bytes(truncated.read_bytes()[:300])
    not_nifti = tmp_path / "notes.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"this is not an image"))
    broken_png = tmp_path / "scan.png"
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with_nan = np.zeros((*SHAPE, 2), np.float32)
    with_nan[3, 4, 5, 0] = np.nan
    nan_file = save_nifti(with_nan, tmp_path / "nan.nii.gz")
    three_channels = save_volume_file(tmp_path / "three.nii.gz", channels=3)
    write_brats_case(tmp_path / "data")
    (tmp_path / "data" / "case1" / "case1_t1ce.nii.gz").unlink()
    bad = [truncated, not_nifti, broken_png, nan_file, three_channels, tmp_path / "data" / "case1",
           tmp_path / "missing.nii.gz"]
    result = run_cli("predict", str(good), *map(str, bad), "--model", str(checkpoint), "--out", "out",
                     "--modalities", BRATS_NAMES, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors):
        assert str(path) in line
    assert "NaN" in errors[3] and "flair" in errors[4] and "t1ce" in errors[5]
    assert (tmp_path / "out" / "good_seg.nii.gz").is_file()
    assert "Traceback" not in result.stderr
    nothing = run_cli("predict", *map(str, bad), "--model", str(checkpoint), "--out", "out", cwd=tmp_path)
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    good = save_unet_checkpoint(tmp_path / "good.pt", ["flair"])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:1000])
    other_tool = tmp_path / "other.pt"
    torch.save({"epoch": 3, "state_dict": {}}, other_tool)
    future = tmp_path / "future.pt"
    document = torch.load(good, weights_only=True)
    document["format_version"] = 99
    torch.save(document, future)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    for path, words in [(tmp_path / "missing.pt", "not found"), (corrupt, "corrupt"), (other_tool, "another tool"),
                        (future, "format_version"), (empty_run, "best.pt")]:
        with pytest.raises(MrisegError, match=words):
            load_model(path, "cpu")
    result = run_cli("predict", "x.nii.gz", "--model", str(corrupt), cwd=tmp_path)
    assert result.returncode == 2 and str(corrupt) in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_folder_stops_before_any_work(tmp_path):
    checkpoint = save_unet_checkpoint(tmp_path / "model.pt", ["flair"])
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(MrisegError, match="not writable"):
        predict([str(save_volume_file(tmp_path / "v.nii.gz", 1))], model=checkpoint,
                options=PredictOptions(out=blocker / "out"))


def test_real_brats_case_round_trip_keeps_lps_geometry(tmp_path, shared_data):
    """A real LPS case (../shared/data/brats): the mask is written in its exact geometry and
    lands where the thresholding model must put it."""
    case = shared_data / "brats" / "brats_2013_pat0002_1"
    model = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(crop=True, norm="max", dtype="float32"))
    options = PredictOptions(out=tmp_path / "out", modalities="flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,"
                                                               "seg=OTMultiClass")
    [result] = predict_path(str(case), model, options)
    assert result.status == "ok", result.error
    source = nib.load(case / "T1c_subtrMeanDivStd.nii.gz")
    written = nib.load(result.outputs["mask"])
    assert written.shape == source.shape == (240, 240, 155)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    for code in ("qform_code", "sform_code"):
        assert written.header[code] == source.header[code]
    t1c = np.asarray(source.dataobj, dtype=np.float32)
    expected = t1c / np.float32(np.abs(t1c).max()) >= 0.5
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, expected)


class RegionNet(torch.nn.Module):
    """Three nested BraTS regions from one channel: WT above 0.2, TC above 0.5, ET above 0.8."""

    def __init__(self):
        super().__init__()
        self.steepness = torch.nn.Parameter(torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1] - 0.2, x[:, :1] - 0.5, x[:, :1] - 0.8], dim=1) * self.steepness


def test_single_2d_image_with_brats_regions_gives_labels_1_2_4_named_like_the_source(tmp_path):
    image = np.full((40, 48), 10, np.uint8)
    image[5:30, 5:30], image[10:25, 10:25], image[14:20, 14:20] = 30, 60, 100
    Image.fromarray(image).save(tmp_path / "scan.png")
    task = {"kind": "regions", "activation": "sigmoid", "labels": [0, 1, 2, 4],
            "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}}
    checkpoint = {"model": {"name": "regions", "in_channels": 1, "out_channels": 3, "spatial_dims": 2},
                  "preprocess": PreprocessParams(norm="max").to_dict(), "modalities": [], "task": task,
                  "label_info": {"names": {"1": "core", "2": "oedema", "4": "enhancing"}}}
    model = LoadedModel(path=tmp_path / "m.pt", checkpoint=checkpoint, network=RegionNet(), device=torch.device("cpu"))
    [result] = predict_path(str(tmp_path / "scan.png"), model, PredictOptions(out=tmp_path / "out", overlay=True))
    assert result.status == "ok", result.error
    assert Path(result.outputs["mask"]).name == "scan_mask.png"
    expected = np.zeros_like(image)
    expected[image == 30], expected[image == 60], expected[image == 100] = 2, 1, 4
    np.testing.assert_array_equal(np.asarray(Image.open(result.outputs["mask"])), expected)
    [overlay] = Path(result.outputs["overlays"]).iterdir()
    picture = np.asarray(Image.open(overlay).convert("RGB"))
    scale = -(-viz.MIN_PICTURE_WIDTH // 48)
    body = picture[:40 * scale:scale, :48 * scale:scale]
    for value in (1, 2, 4):
        assert np.array_equal(np.all(body == viz.LABEL_COLOURS[value], axis=-1), viz.outline(expected == value))


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_inputs_with_one_case_id_never_share_an_output(tmp_path, overwrite):
    """a/x.nii.gz and b/x.nii.gz (or one file given twice) both map to OUT/x_seg.nii.gz: the first is
    written, the second is refused naming both inputs (with --overwrite it used to replace the first)."""
    checkpoint = save_unet_checkpoint(tmp_path / "model.pt", ["t1ce", "flair"])
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save_volume_file(tmp_path / folder / "x.nii.gz")
    args = ["predict", "a/x.nii.gz", "b/x.nii.gz", "a/x.nii.gz", "--model", str(checkpoint), "--out", "out",
            "--json", *(["--overwrite"] if overwrite else [])]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["status"] for line in lines] == ["ok", "failed", "failed"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "b/x.nii.gz" in errors[0] and "already written in this run for a/x.nii.gz" in errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_seg.nii.gz"]


def test_overwrite_replaces_a_slice_mask_folder_and_its_overlays_whole(tmp_path):
    """A patient predicted again with --overwrite after a slice was removed must not keep the old
    slice's mask (evaluate would read it) or its overlay."""
    patient = tmp_path / "TCGA_XX_0001_20000101"
    write_lgg_patient(patient, slices=4)
    model = threshold_model(tmp_path, 2, ["pre-contrast", "flair", "post-contrast"], channel=1,
                            params=PreprocessParams(size=(64, 64), norm="max"))
    options = PredictOptions(out=tmp_path / "out", overlay=True)
    [first] = predict_path(str(patient), model, options)
    assert first.status == "ok", first.error
    for name in ("TCGA_XX_0001_20000101_4.tif", "TCGA_XX_0001_20000101_4_mask.tif"):
        (patient / name).unlink()
    options.overwrite = True
    [again] = predict_path(str(patient), model, options)
    assert again.status == "ok", again.error
    masks = sorted(p.name for p in Path(again.outputs["mask"]).iterdir())
    assert masks == [f"TCGA_XX_0001_20000101_{n}_mask.tif" for n in range(1, 4)]
    overlays = sorted(p.name for p in Path(again.outputs["overlays"]).iterdir())
    assert len(overlays) <= 3 and "TCGA_XX_0001_20000101_4.png" not in overlays
    assert not [p for p in (tmp_path / "out").rglob(".*")], "temporary folders left behind"


def test_threshold_on_a_multiclass_model_is_refused_not_ignored(tmp_path):
    from mriseg.errors import MrisegError
    from mriseg.predict import predict

    loaded = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(norm="max"),
                             task={"kind": "multiclass", "labels": [0, 1]})
    save_volume_file(tmp_path / "x.nii.gz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mriseg.predict.run.load_model", lambda model, device: loaded)
        with pytest.raises(MrisegError, match="--threshold 0.7: .*multi-class"):
            predict([str(tmp_path / "x.nii.gz")], "any", PredictOptions(out=tmp_path / "out", threshold=0.7))
    assert not (tmp_path / "out").exists()


def test_patch_size_on_a_2d_model_and_subset_on_a_file_are_refused(tmp_path):
    from mriseg.errors import MrisegError
    from mriseg.predict import predict

    loaded = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(norm="max"))
    save_volume_file(tmp_path / "x.nii.gz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mriseg.predict.run.load_model", lambda model, device: loaded)
        with pytest.raises(MrisegError, match="--patch-size .* 2D model"):
            predict([str(tmp_path / "x.nii.gz")], "any", PredictOptions(out=tmp_path / "o1", patch_size=(16, 16, 16)))
    [result] = predict_path(str(tmp_path / "x.nii.gz"), loaded, PredictOptions(out=tmp_path / "o2", subset="imagesTr"))
    assert result.status == "failed" and "--subset imagesTr picks a folder" in result.error


def test_a_jpeg_input_gets_a_lossless_png_mask(tmp_path):
    """A JPEG mask smears label values (41 distinct values came back from a binary mask)."""
    image = np.full((40, 48), 10, np.uint8)
    image[5:30, 5:30], image[10:25, 10:25], image[14:20, 14:20] = 30, 60, 100
    Image.fromarray(image).save(tmp_path / "scan.jpg", quality=100)
    task = {"kind": "regions", "activation": "sigmoid", "labels": [0, 1, 2, 4],
            "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}}
    checkpoint = {"model": {"name": "regions", "in_channels": 1, "out_channels": 3, "spatial_dims": 2},
                  "preprocess": PreprocessParams(norm="max").to_dict(), "modalities": [], "task": task}
    model = LoadedModel(path=tmp_path / "m.pt", checkpoint=checkpoint, network=RegionNet(), device=torch.device("cpu"))
    [result] = predict_path(str(tmp_path / "scan.jpg"), model, PredictOptions(out=tmp_path / "out"))
    assert result.status == "ok", result.error
    assert Path(result.outputs["mask"]).name == "scan_mask.png"
    assert set(np.unique(np.asarray(Image.open(result.outputs["mask"])))) <= {0, 1, 2, 4}


def test_one_labels_file_outlines_one_case_only(tmp_path):
    write_brats_case(tmp_path / "data", "case1")
    write_brats_case(tmp_path / "data", "case2")
    model = threshold_model(tmp_path, 2, ["t1ce", "flair"], 0, PreprocessParams(norm="max"))
    labels = next((tmp_path / "data" / "case1").glob("*_seg.nii.gz"))
    options = PredictOptions(out=tmp_path / "out", overlay=True, labels=labels, modalities=BRATS_NAMES)
    results = predict_path(str(tmp_path / "data"), model, options, {})
    assert [r.status for r in results] == ["ok", "failed"]
    assert "--labels names one file" in results[1].error
