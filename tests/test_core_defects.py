"""One test per silent wrong result found in the core path (each failed before its fix)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mriseg.data.case import Case
from mriseg.data.preprocess import PreprocessParams
from mriseg.devices import choose_precision
from mriseg.errors import BadInputError
from mriseg.inference import InferenceSettings, LoadedModel, predict_case, predict_logits
from mriseg.labels import REGION_SCHEMES, Task, task_for_labels
from mriseg.models import build_model


def nifti(array: np.ndarray, path: Path, zooms=(1.0, 1.0, 1.0)) -> Path:
    image = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return path


class LabelOracle(torch.nn.Module):
    """Whole-volume 'network' whose logits are those of a fixed label map for a task."""

    def __init__(self, label: np.ndarray, task: Task):
        super().__init__()
        masks = np.stack([region.mask(label) for region in task.regions]) if task.kind == "regions" \
            else (label[None] > 0)
        self.logits = torch.nn.Parameter(torch.from_numpy(masks.astype(np.float32) * 40 - 20), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[None].expand(x.shape[0], -1, *self.logits.shape[1:])


def brats2013_case(folder: Path) -> np.ndarray:
    """A BraTS-2013-style case (labels 0-4, label 3 present) named like the real ones."""
    folder.mkdir(parents=True)
    label = np.zeros((16, 16, 12), np.float32)
    label[3:13, 3:13, 2:10] = 2
    label[5:11, 5:11, 4:8] = 1
    label[6:10, 6:8, 5:7] = 3
    label[8:10, 8:11, 5:7] = 4
    flair = np.where(label > 0, 3.0, 1.0).astype(np.float32)
    nifti(flair, folder / "Flair_subtrMeanDivStd.nii.gz")
    nifti(flair * 2, folder / "T1c_subtrMeanDivStd.nii.gz")
    nifti(label, folder / "OTMultiClass.nii.gz")
    return label.astype(np.uint8)


def test_evaluate_model_maps_the_truth_with_the_checkpoints_label_map(tmp_path, monkeypatch):
    import mriseg.inference as inference
    from mriseg.evaluate import evaluate_model

    label = brats2013_case(tmp_path / "data" / "p1")
    mapped = np.where(label == 3, 1, label)
    task = task_for_labels({"values": [0, 1, 2, 4], "scheme": "brats"}, "regions", label_map={3: 1})
    checkpoint = {"model": {"name": "oracle", "in_channels": 2, "out_channels": 3, "spatial_dims": 3},
                  "preprocess": PreprocessParams(label_map={3: 1}).to_dict(), "modalities": ["flair", "t1ce"],
                  "task": task.to_dict()}
    loaded = LoadedModel(tmp_path / "m.pt", checkpoint, LabelOracle(mapped, task), torch.device("cpu"))
    monkeypatch.setattr(inference, "load_model", lambda model, device: loaded)
    result = evaluate_model(tmp_path / "m.pt", tmp_path / "data", tmp_path / "out",
                            modalities="flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass")
    dice = {row.region: row.scores.dice for row in result.rows}
    assert dice == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_validation_and_evaluate_share_one_engine_and_agree(tmp_path):
    """Training's validation Dice equals scoring the engine's output on the same grid."""
    from mriseg.train import TrainOptions, Volume, validate
    from mriseg.losses import build_loss
    from mriseg.metrics import dice

    torch.manual_seed(0)
    network = build_model("unet", 1, 1, spatial_dims=3, features=2).eval()
    image = np.random.default_rng(0).normal(size=(1, 20, 24, 18)).astype(np.float32)
    label = (image[0] > 0.8).astype(np.uint8)
    task = Task("binary")
    options = TrainOptions(spatial_dims=3, patch_size=(16, 16, 16), batch_size=2)
    [record] = validate(network, [Volume("c", image, label, 2)], task, build_loss("dice", "sigmoid"), options,
                        choose_precision(torch.device("cpu")))
    logits = predict_logits(network, image, 3, 2, InferenceSettings(patch_size=(16, 16, 16), batch_size=2))
    predicted = task.decode(task.probabilities(logits[None])[0].numpy())
    assert record["dice"] == pytest.approx(dice(predicted > 0, label > 0))


def test_inference_pads_with_the_normalised_background_not_the_minimum():
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.clone())
            return x[:, :1]

    recorder = Recorder()
    recorder.size_rule = SimpleNamespace(axis_ok=lambda axis, size: size % 8 == 0)  # a 5^3 scan needs padding
    image = np.full((1, 5, 5, 5), -4.0, np.float32)
    predict_logits(recorder, image, 3, 2, InferenceSettings(patch_size=(8, 8, 8)))
    padded = seen[0][0, 0]
    assert padded.min() == -4.0 and (padded == 0).sum() == 8**3 - 5**3


def test_prediction_ignores_a_label_beside_the_input_when_cropping():
    rng = np.random.default_rng(0)
    image = np.zeros((1, 20, 20, 10), np.float32)
    image[0, 5:15, 5:15, 2:8] = rng.normal(size=(10, 10, 6)) + 3
    label = np.zeros((20, 20, 10), np.uint8)
    label[0:3, 0:3, 0:2] = 1  # outside the brain: would widen a crop box that looked at labels
    case = Case("c", image, label, (1.0, 1.0, 1.0), slice_axis=2)
    task = Task("binary")
    params = PreprocessParams(crop=True, size=(8, 8, 8))
    network = build_model("unet3d", 1, 1, spatial_dims=3, features=2)
    with_label = predict_case(case, network, task, params, 3, InferenceSettings())
    without = predict_case(Case("c", image, None, (1.0, 1.0, 1.0), slice_axis=2), network, task, params, 3,
                           InferenceSettings())
    assert with_label.record["crop_box"] == without.record["crop_box"] == [[5, 15], [5, 15], [2, 8]]
    np.testing.assert_array_equal(with_label.labels, without.labels)


def test_valid_convolution_unet_predicts_a_whole_slice():
    network = build_model("unet", 1, 2, spatial_dims=2, variant="original", features=2).eval()
    image = np.random.default_rng(0).normal(size=(1, 3, 40, 36)).astype(np.float32)
    logits = predict_logits(network, image, 2, 0, InferenceSettings(amp=False, tta=False))  # float32, as the direct pass
    assert tuple(logits.shape) == (2, 3, 40, 36)
    # the same as one direct pass on the slice centred in a 236 x 220 input (output 184 smaller)
    padded = torch.nn.functional.pad(torch.from_numpy(image[:, 0])[None], (92, 220 - 36 - 92, 92, 236 - 40 - 92))
    with torch.no_grad():
        direct = network(padded)[0]
    assert tuple(direct.shape[1:]) == (52, 36)
    torch.testing.assert_close(logits[:, 0], direct[:, :40, :36], atol=1e-5, rtol=1e-5)


def test_multiclass_slice_holding_only_label_1_keeps_label_1(tmp_path):
    from mriseg.predict import write_slice_masks

    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, 1:3, 1:3] = 1
    case = Case("p", np.zeros((1, 1, 4, 4), np.float32), None, (1.0, 1.0, 1.0), slice_axis=0,
                header={"slice_names": ["p_1.tif"]})
    [path] = write_slice_masks(labels, case, tmp_path, binary=False)
    assert np.asarray(Image.open(path)).max() == 1
    [path] = write_slice_masks(labels, case, tmp_path, binary=True)
    assert np.asarray(Image.open(path)).max() == 255


def test_ignore_label_is_left_out_of_binary_targets_and_validation_dice():
    from mriseg.train import TrainOptions, Volume, validate
    from mriseg.losses import build_loss

    task = task_for_labels({"values": [0, 1, 255], "scheme": "binary"}, "auto", ignore_label=255)
    assert task.kind == "binary" and task.ignore_label == 255
    targets = task.targets(torch.tensor([[0, 1, 255]]))
    assert targets.tolist() == [[[0.0, 1.0, -1.0]]]

    class Constant(torch.nn.Module):  # predicts tumour everywhere
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.full_like(x[:, :1], 10.0) * self.weight

    label = np.array([[[1, 1, 255, 255]] * 4], np.uint8).reshape(1, 4, 4)
    image = np.zeros((1, 1, 4, 4), np.float32)
    [record] = validate(Constant(), [Volume("c", image, label, 0)], task, build_loss("dice", "sigmoid"),
                        TrainOptions(spatial_dims=2), choose_precision(torch.device("cpu")))
    assert record["dice"] == 1.0  # the ignored voxels are neither false positives nor background


def test_multiclass_ignore_label_is_not_a_false_positive():
    from mriseg.metrics import dice

    label = np.array([0, 1, 1, 255])
    predicted = np.array([0, 1, 1, 1])
    assert dice(predicted == 1, label == 1, valid=label != 255) == 1.0


def test_resume_keeps_the_split_it_started_with(tmp_path):
    from mriseg.train import saved_split

    (tmp_path / "config.json").write_text(json.dumps({"options": {}, "train_cases": ["a", "b"], "val_cases": ["c"]}))
    assert saved_split(tmp_path, ["a", "b", "c", "d", "e"]) == (["a", "b"], ["c"])
    with pytest.raises(BadInputError, match="no longer labelled"):
        saved_split(tmp_path, ["a", "c"])


def test_two_files_matching_one_modality_are_an_error(tmp_path):
    from mriseg.data.readers import list_cases

    case = tmp_path / "data" / "BraTS_001"
    case.mkdir(parents=True)
    for name in ("BraTS_001_flair", "BraTS_001_old_flair", "BraTS_001_t1", "BraTS_001_t1ce", "BraTS_001_t2"):
        nifti(np.zeros((4, 4, 4), np.float32), case / f"{name}.nii.gz")
    with pytest.raises(BadInputError, match="both match modality 'flair'"):
        list_cases(tmp_path / "data")


def test_labels_folder_matches_case_ids_exactly_not_by_prefix(tmp_path):
    from mriseg.predict import labels_for_overlay

    folder = tmp_path / "labels"
    folder.mkdir()
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(folder / "c10_seg.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "c1_seg.png")
    case = Case("c1", np.zeros((1, 4, 4), np.float32), None, (1.0, 1.0))
    assert labels_for_overlay(case, folder).max() == 0


def test_task_round_trips_and_names_malformed_records():
    task = task_for_labels({"values": [0, 1, 2, 3, 4], "scheme": "brats2013"}, "regions")
    assert [(r.name, r.labels) for r in task.regions] == [("WT", (1, 2, 3, 4)), ("TC", (1, 3, 4)), ("ET", (4,))]
    assert Task.from_dict(task.to_dict()) == task
    brats = task_for_labels({"values": [0, 1, 2, 4], "scheme": "brats"}, "regions")
    assert [r.labels for r in brats.regions] == [(1, 2, 4), (1, 4), (4,)]
    with pytest.raises(Exception, match="malformed|not one of"):
        Task.from_dict({"kind": "regions", "regions": "WT"})
    assert REGION_SCHEMES["brats"][0].labels == (1, 2, 3, 4)


def test_flip_tta_runs_through_the_engine_on_a_real_network():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    image = np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32)
    plain = predict_logits(network, image, 3, 2, InferenceSettings())
    flipped = predict_logits(network, image, 3, 2, InferenceSettings(tta=True))
    assert flipped.shape == plain.shape and torch.isfinite(flipped).all()


def test_predict_refuses_bad_options_before_loading_anything(tmp_path):
    from mriseg.errors import MrisegError
    from mriseg.predict import PredictOptions, predict

    for bad in ({"threshold": 0.0}, {"threshold": 1.0}, {"overlap": 1.0}, {"batch_size": 0},
                {"gif_fps": float("nan")}, {"patch_size": (0, 8, 8)}, {"interpolation": "cubic"}):
        with pytest.raises(MrisegError):
            predict(["missing.nii.gz"], model=tmp_path / "no-such.pt", options=PredictOptions(out=tmp_path / "o", **bad))


def test_predict_never_writes_over_an_input_folder(tmp_path):
    from mriseg.predict import PredictOptions, predict

    patient = tmp_path / "TCGA_XX_0001_20000101"
    patient.mkdir()
    for n in (1, 2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(patient / f"{patient.name}_{n}.tif")
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(patient / f"{patient.name}_{n}_mask.tif")
    before = {p.name: p.read_bytes() for p in patient.iterdir()}
    for out in (patient, tmp_path, patient / "predictions"):
        with pytest.raises(BadInputError, match="outputs must never land on inputs"):
            predict([str(patient)], model=tmp_path / "no-such.pt", options=PredictOptions(out=out, overwrite=True))
    assert {p.name: p.read_bytes() for p in patient.iterdir()} == before


def test_evaluate_model_ignores_the_ignore_label_and_scores_a_remapped_binary_task(tmp_path, monkeypatch):
    import mriseg.inference as inference
    from mriseg.evaluate import evaluate_model

    label = brats2013_case(tmp_path / "data" / "p1")
    binary = (label > 0).astype(np.uint8)
    task = Task("binary", label_map={1: 1, 2: 1, 3: 1, 4: 1})
    checkpoint = {"model": {"name": "oracle", "in_channels": 2, "out_channels": 1, "spatial_dims": 3},
                  "preprocess": PreprocessParams(label_map={2: 1, 3: 1, 4: 1}).to_dict(),
                  "modalities": ["flair", "t1ce"], "task": task.to_dict()}
    loaded = LoadedModel(tmp_path / "m.pt", checkpoint, LabelOracle(binary, task), torch.device("cpu"))
    monkeypatch.setattr(inference, "load_model", lambda model, device: loaded)
    result = evaluate_model(tmp_path / "m.pt", tmp_path / "data", tmp_path / "out",
                            modalities="flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass")
    assert {row.region: row.scores.dice for row in result.rows} == {"tumour": 1.0}


def test_multiclass_validation_channels_are_named_after_their_classes():
    from mriseg.train import TrainOptions, Volume, validate
    from mriseg.losses import build_loss

    task = task_for_labels({"values": [0, 1, 2], "scheme": "multiclass", "names": {"1": "a", "2": "b"}}, "multiclass")
    assert [r.name for r in task.scored_regions()] == ["a", "b"]
    network = build_model("unet", 1, 3, spatial_dims=2, features=2)
    image = np.zeros((1, 1, 16, 16), np.float32)
    label = np.zeros((1, 16, 16), np.uint8)
    [record] = validate(network, [Volume("c", image, label, 0)], task, build_loss("ce", "softmax", -1),
                        TrainOptions(spatial_dims=2), choose_precision(torch.device("cpu")))
    assert len(record["channels"]) == 2


def test_flip_tta_is_on_by_default_for_2d_models_and_off_for_3d():
    """The default views are the engine's rule: mean of the 4 mirrored views in 2D, the plain view in 3D."""
    torch.manual_seed(0)
    image = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    conv2d = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    # float32 on every CPU (a CPU with native bfloat16 would autocast by default and miss 1e-5)
    default = predict_logits(conv2d, image, 2, 0, InferenceSettings(amp=False))
    plain = predict_logits(conv2d, image, 2, 0, InferenceSettings(tta=False, amp=False))
    with torch.no_grad():  # independent: average the network over the four flips of every slice by hand
        slices = torch.from_numpy(image).permute(1, 0, 2, 3)
        views = [(), (2,), (3,), (2, 3)]
        by_hand = sum(conv2d(slices.flip(v)).flip(v) for v in views) / 4
    assert torch.allclose(default, by_hand.permute(1, 0, 2, 3), atol=1e-5)
    assert not torch.allclose(default, plain, atol=1e-3)
    conv3d = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    assert torch.equal(predict_logits(conv3d, image, 3, 2, InferenceSettings(amp=False)),
                       predict_logits(conv3d, image, 3, 2, InferenceSettings(tta=False, amp=False)))


def test_a_window_larger_than_the_image_is_capped_at_the_image():
    """--patch-size 512,512,512 on a small scan padded it to 512^3 (24 GB, OOM-killed); the window
    now stops at the image, which gives the whole-image prediction."""
    torch.manual_seed(0)
    image = np.random.default_rng(1).normal(size=(1, 6, 10, 8)).astype(np.float32)
    conv3d = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    whole = predict_logits(conv3d, image, 3, 2, InferenceSettings(amp=False))
    huge = predict_logits(conv3d, image, 3, 2, InferenceSettings(amp=False, patch_size=(4096, 4096, 4096)))
    mixed = predict_logits(conv3d, image, 3, 2, InferenceSettings(amp=False, patch_size=(4, 4096, 4096)))
    fitted = predict_logits(conv3d, image, 3, 2, InferenceSettings(amp=False, patch_size=(4, 10, 8)))
    assert torch.allclose(huge, whole, atol=1e-6) and torch.equal(mixed, fitted)
