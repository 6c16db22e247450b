"""nnU-Net raw datasets as input: imagesTs and CASE_XXXX channel files predicted per case, the
dataset root's choice of sub-folder, nnU-Net naming, nnU-Net's split file and its mean."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriseg.data.preprocess import PreprocessParams
from mriseg.data.readers import list_cases, read_case
from mriseg.errors import BadInputError
from mriseg.evaluate import evaluate
from mriseg.predict import PredictOptions, predict_path
from mriseg.train import train

from test_predict import threshold_model

SHAPE = (24, 20, 12)


def tumour_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FLAIR, T1c, tumour): the tumour is bright in T1c only, at a place set by ``seed``."""
    flair = np.zeros(SHAPE, np.float32)
    flair[2:22, 2:18, 1:11] = 1.0
    t1c = flair.copy()
    x = 4 + 3 * seed
    t1c[x:x + 5, 5:11, 3:7] = 4.0
    return flair, t1c, (t1c == 4).astype(np.uint8)


def save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.2, 2.0, 1.0])), str(path))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Dataset001_Toy: 2 training and 2 test cases, channels FLAIR (0000) and T1c (0001)."""
    root = tmp_path / "Dataset001_Toy"
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    for index, (subset, labels) in enumerate((("imagesTr", "labelsTr"),) * 2 + (("imagesTs", "labelsTs"),) * 2):
        case_id = f"TOY_{index:03d}"
        flair, t1c, tumour = tumour_case(index)
        save(flair, root / subset / f"{case_id}_0000.nii.gz")
        save(t1c, root / subset / f"{case_id}_0001.nii.gz")
        save(tumour, root / labels / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1c"}, "labels": {"background": 0, "tumour": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    return root


def model(tmp_path: Path):
    # channel 0 of the checkpoint is T1c: matching by name must put the test cases' _0001 there
    return threshold_model(tmp_path, 2, ["T1c", "FLAIR"], 0, PreprocessParams(norm="max"))


def test_images_ts_is_one_case_per_case_with_named_channels(dataset):
    refs = list_cases(dataset / "imagesTs")
    assert [ref.case_id for ref in refs] == ["TOY_002", "TOY_003"]
    assert [p.name for p in refs[0].image_paths] == ["TOY_002_0000.nii.gz", "TOY_002_0001.nii.gz"]
    case = read_case(refs[0])
    assert case.modalities == ["FLAIR", "T1c"] and case.image.shape == (2, *SHAPE)
    assert case.label is not None  # from labelsTs beside it


def test_predict_images_ts_writes_nnunet_names_that_evaluate_scores_perfectly(dataset, tmp_path):
    options = PredictOptions(out=tmp_path / "pred")
    results = predict_path(str(dataset / "imagesTs"), model(tmp_path), options)
    assert [(r.case_id, r.status) for r in results] == [("TOY_002", "ok"), ("TOY_003", "ok")]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["TOY_002.nii.gz", "TOY_003.nii.gz"]
    for case_id in ("TOY_002", "TOY_003"):
        written = np.asarray(nib.load(tmp_path / "pred" / f"{case_id}.nii.gz").dataobj)
        truth = np.asarray(nib.load(dataset / "labelsTs" / f"{case_id}.nii.gz").dataobj)
        np.testing.assert_array_equal(written, truth)
    result = evaluate(tmp_path / "pred", dataset / "labelsTs", tmp_path / "eval")
    assert result.summary["regions"]["tumour"]["metrics"]["dice"]["mean"] == 1.0


def test_the_dataset_root_predicts_images_ts_and_says_so(dataset, tmp_path, capsys):
    results = predict_path(str(dataset), model(tmp_path), PredictOptions(out=tmp_path / "ts"))
    assert [r.case_id for r in results] == ["TOY_002", "TOY_003"]
    assert "predicting imagesTs/" in capsys.readouterr().err
    training = predict_path(str(dataset), model(tmp_path), PredictOptions(out=tmp_path / "tr", subset="imagesTr"))
    assert [r.case_id for r in training] == ["TOY_000", "TOY_001"]


def test_a_single_channel_file_stands_for_its_whole_case(dataset, tmp_path):
    [result] = predict_path(str(dataset / "imagesTs" / "TOY_003_0000.nii.gz"), model(tmp_path),
                            PredictOptions(out=tmp_path / "one", naming="mriseg"))
    assert result.status == "ok", result.error
    assert result.case_id == "TOY_003" and Path(result.outputs["mask"]).name == "TOY_003_seg.nii.gz"


def test_a_missing_channel_is_named(dataset, tmp_path):
    (dataset / "imagesTs" / "TOY_003_0001.nii.gz").unlink()
    with pytest.raises(BadInputError, match="TOY_003.*1 channel file.*2 channels"):
        list_cases(dataset / "imagesTs")


def test_bad_subset_and_naming_are_refused(dataset, tmp_path):
    with pytest.raises(Exception, match="--naming"):
        PredictOptions(naming="kaggle").check()
    (dataset / "imagesTs").rename(dataset / "elsewhere")
    [result] = predict_path(str(dataset), model(tmp_path), PredictOptions(out=tmp_path / "x", subset="imagesTs"))
    assert result.status == "failed" and "--subset imagesTs" in result.error


# --- dataset.json in full: regions, ignore, file_ending ----------------------------------------

REGION_LABELS = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3, "ignore": 4}


def region_dataset(root: Path, **meta) -> Path:
    """nnU-Net's region form of a BraTS conversion: labels 0-3 nested as WT > TC > ET, 4 ignored."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for index in range(3):
        flair, t1c, tumour = tumour_case(index)
        label = tumour.copy()
        x = np.indices(SHAPE)
        label[(tumour == 1) & (x[0] < 6 + 3 * index)] = 2                          # core
        label[(label == 2) & (x[2] == 4)] = 3                                       # enhancing
        label[0, 0, :] = 4                                                          # unannotated
        save(flair, root / "imagesTr" / f"R_{index:03d}_0000.nii.gz")
        save(t1c, root / "imagesTr" / f"R_{index:03d}_0001.nii.gz")
        save(label.astype(np.uint8), root / "labelsTr" / f"R_{index:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1c"}, "labels": REGION_LABELS,
        "regions_class_order": [1, 2, 3], "numTraining": 3, "file_ending": ".nii.gz", **meta}))
    return root


def test_region_lists_and_ignore_become_the_task(tmp_path):
    from mriseg.data.cache import build_cache, open_cache
    from mriseg.train.validation import resolve_task

    root = region_dataset(tmp_path / "Dataset002_Regions")
    case = read_case(list_cases(root)[0])
    assert set(np.unique(case.label)) == {0, 1, 2, 3, 4}
    build_cache(root, tmp_path / "cache", PreprocessParams(size=(32, 32)))
    cache = open_cache(tmp_path / "cache")
    assert cache.label_info["regions"] == {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": [3]}
    task = resolve_task(cache.label_info, "auto", 255, cache.path)
    assert task.kind == "regions" and task.ignore_label == 4
    assert [r.name for r in task.regions] == ["whole tumour", "tumour core", "enhancing"]
    assert task.decode(np.ones((3, 2, 2), np.float32)).max() == 3   # innermost region wins
    summary = train(tmp_path / "cache", out=tmp_path / "run", epochs=1, steps_per_epoch=2, batch_size=2,
                    model_options={"features": 4}, device="cpu")
    assert set(summary["last"]["val_dice_channels"]) == {"whole tumour", "tumour core", "enhancing"}


def test_evaluate_scores_dataset_regions_and_leaves_ignored_voxels_out(tmp_path):
    root = region_dataset(tmp_path / "Dataset002_Regions")
    (tmp_path / "pred").mkdir()
    for label_file in sorted((root / "labelsTr").iterdir()):
        truth = np.asarray(nib.load(label_file).dataobj)
        prediction = np.where(truth == 4, 1, truth).astype(np.uint8)  # tumour painted where nobody annotated
        save(prediction, tmp_path / "pred" / label_file.name)
    result = evaluate(tmp_path / "pred", root, tmp_path / "eval")
    dice = {region: report["metrics"]["dice"]["mean"] for region, report in result.summary["regions"].items()}
    assert dice == {"whole tumour": 1.0, "tumour core": 1.0, "enhancing": 1.0}


def test_regions_class_order_that_mriseg_would_not_paint_is_refused(tmp_path):
    root = region_dataset(tmp_path / "Dataset003", regions_class_order=[3, 2, 1])
    with pytest.raises(BadInputError, match="regions_class_order"):
        list_cases(root)


def test_an_unsupported_file_ending_is_named(tmp_path):
    root = region_dataset(tmp_path / "Dataset004", file_ending=".mha")
    with pytest.raises(BadInputError, match="file_ending '.mha'"):
        list_cases(root)


# --- mriseg convert --to nnunet --------------------------------------------------------------

def test_convert_writes_a_dataset_nnunet_accepts_and_mriseg_reads_back(tmp_path):
    from mriseg.convert import check_nnunet_dataset, convert_to_nnunet
    from mriseg.data.synthetic import write_synthetic
    from mriseg.errors import MrisegError

    write_synthetic(tmp_path / "brats", layout="brats", cases=2, seed=1, size=(24, 24, 12))
    with pytest.raises(MrisegError, match="not consecutive.*--label-map"):  # BraTS 2021 labels 0, 1, 2, 4
        convert_to_nnunet(tmp_path / "brats", tmp_path / "raw", 7, "Synth")
    assert not (tmp_path / "raw" / "Dataset007_Synth").exists()  # nothing half-written left looking valid
    root = convert_to_nnunet(tmp_path / "brats", tmp_path / "raw", 7, "Synth", label_map={4: 3})
    meta = check_nnunet_dataset(root)
    assert meta["numTraining"] == 2 and list(meta["channel_names"].values()) == ["t1", "t1ce", "t2", "flair"]
    assert sorted(meta["labels"].values()) == [0, 1, 2, 3]
    for source, converted in zip(list_cases(tmp_path / "brats"), list_cases(root)):
        original, back = read_case(source), read_case(converted)
        assert back.case_id == original.case_id and back.modalities == original.modalities
        np.testing.assert_array_equal(back.image, original.image)
        np.testing.assert_allclose(back.affine, original.affine)
        np.testing.assert_array_equal(back.label, np.where(original.label == 4, 3, original.label))
    with pytest.raises(BadInputError, match="--overwrite"):
        convert_to_nnunet(tmp_path / "brats", tmp_path / "raw", 7, "Synth", label_map={4: 3})


def test_convert_kaggle_patients_to_2d_cases_one_per_slice(tmp_path):
    from mriseg.convert import check_nnunet_dataset, convert_to_nnunet
    from mriseg.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "lgg", layout="lgg", cases=2, seed=1, size=(5, 32, 32))
    root = convert_to_nnunet(tmp_path / "lgg", tmp_path / "raw", 8, "LGG2D", dims=2)
    meta = check_nnunet_dataset(root)
    assert meta["numTraining"] == 10 and meta["labels"] == {"background": 0, "tumour": 1}
    shapes = {nib.load(p).shape for p in (root / "imagesTr").iterdir()}
    assert shapes == {(32, 32, 1)}


def test_convert_cli_refuses_bad_names_and_an_output_inside_the_source(tmp_path):
    import subprocess
    import sys

    from mriseg.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "lgg", layout="lgg", cases=1, seed=1, size=(4, 16, 16))
    for extra, message in ((["--name", "has space"], "--name"), (["--name", "ok", "--dims", "4"], "--dims"),
                           (["--name", "ok", "--to", "monai"], "--to")):
        result = subprocess.run([sys.executable, "-m", "mriseg", "convert", str(tmp_path / "lgg"), str(tmp_path / "o"),
                                 "--dataset-id", "3", *extra], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    inside = subprocess.run([sys.executable, "-m", "mriseg", "convert", str(tmp_path / "lgg"), str(tmp_path / "lgg"),
                             "--dataset-id", "3", "--name", "x"], capture_output=True, text=True)
    assert inside.returncode == 2 and "Traceback" not in inside.stderr


@pytest.mark.parametrize("names, expected", [
    # MSD Task01's dataset.json
    ({1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}, ((1, 2, 3), (2, 3), (3,))),
    # BraTS 2013 as mriseg convert names it: 4 is enhancing, 3 is not
    ({1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"},
     ((1, 2, 3, 4), (1, 3, 4), (4,))),
    # BraTS 2021 converted with --label-map 4:3
    ({1: "necrotic and non-enhancing tumour core", 2: "oedema", 3: "enhancing tumour"}, ((1, 2, 3), (1, 3), (3,))),
    ({1: "NCR", 2: "ED", 3: "ET"}, None),                        # abbreviations: scored label by label
    ({1: "non-enhancing", 2: "necrosis"}, None),
])
def test_tumour_regions_come_from_the_label_names_not_one_numbering(names, expected):
    from mriseg.labels import regions_from_label_names

    regions = regions_from_label_names([(0, "background"), *names.items()])
    assert (None if regions is None else tuple(r.labels for r in regions)) == expected


def test_evaluate_on_a_converted_brats_dataset_scores_the_true_regions(tmp_path):
    """A BraTS dataset converted to nnU-Net keeps its numbering (4 = enhancing): auto regions must be
    BraTS's, checked against WT/TC/ET Dice computed here with numpy."""
    from mriseg.convert import convert_to_nnunet
    from mriseg.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "brats", layout="brats", cases=2, seed=1, size=(24, 24, 12))
    for case in list_cases(tmp_path / "brats"):  # BraTS 2013 numbering: add label 3 inside the core
        image = nib.load(case.label_paths[0])
        label = np.asarray(image.dataobj).astype(np.uint8)
        label[(label == 1) & (np.indices(label.shape)[0] % 2 == 0)] = 3
        nib.save(nib.Nifti1Image(label, image.affine), str(case.label_paths[0]))
    root = convert_to_nnunet(tmp_path / "brats", tmp_path / "raw", 9, "B13")
    (tmp_path / "pred").mkdir()
    expected = {}
    for case in list_cases(root):
        image = nib.load(case.label_paths[0])
        truth = np.asarray(image.dataobj).astype(np.uint8)
        pred = np.roll(truth, 1, axis=0)
        nib.save(nib.Nifti1Image(pred, image.affine), str(tmp_path / "pred" / f"{case.case_id}.nii.gz"))
        for name, labels in (("WT", (1, 2, 3, 4)), ("TC", (1, 3, 4)), ("ET", (4,))):
            a, b = np.isin(pred, labels), np.isin(truth, labels)
            expected[case.case_id, name] = 2 * (a & b).sum() / (a.sum() + b.sum())
    summary = evaluate(tmp_path / "pred", root, tmp_path / "eval")
    got = {(row.case_id, row.region): row.scores.dice for row in summary.rows}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_unnamed_channel_files_are_taken_in_the_models_order_and_that_is_said_once(dataset, tmp_path, capsys):
    """Without dataset.json the _0000/_0001 files have no names: the model's order is assumed
    (nnU-Net's convention), never silently: one warning per run names the order taken."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in (dataset / "imagesTs").iterdir():
        (bare / file.name).write_bytes(file.read_bytes())
    loaded = threshold_model(tmp_path, 2, ["FLAIR", "T1c"], 1, PreprocessParams(norm="max"))
    results = predict_path(str(bare), loaded, PredictOptions(out=tmp_path / "pred"))
    assert [r.status for r in results] == ["ok", "ok"]
    said = [line for line in capsys.readouterr().err.splitlines() if "no names" in line]
    assert len(said) == 1 and "FLAIR, T1c" in said[0], said
    for case_id in ("TOY_002", "TOY_003"):  # _0001 is T1c, the channel this model thresholds
        written = np.asarray(nib.load(tmp_path / "pred" / f"{case_id}.nii.gz").dataobj)
        np.testing.assert_array_equal(written, np.asarray(nib.load(dataset / "labelsTs" / f"{case_id}.nii.gz").dataobj))


def test_convert_slices_3d_cases_keeps_names_through_the_label_map_and_refuses_bad_outputs(tmp_path):
    from mriseg.convert import convert_to_nnunet
    from mriseg.data.synthetic import write_synthetic
    from mriseg.errors import MrisegError

    write_synthetic(tmp_path / "brats", layout="brats", cases=1, seed=1, size=(24, 24, 12))
    source = nib.load(next((tmp_path / "brats").rglob("*_flair.nii.gz")))
    root = convert_to_nnunet(tmp_path / "brats", tmp_path / "raw", 8, "Slices", label_map={4: 3}, dims=2)
    first = nib.load(sorted((root / "imagesTr").iterdir())[0])
    assert first.shape == (24, 24, 1)
    assert first.header.get_zooms() == pytest.approx(source.header.get_zooms())  # the slice axis (z) stays last
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    assert labels["enhancing tumour"] == 3 and labels["oedema"] == 2  # 4's name went with it to 3
    (tmp_path / "afile").write_text("")
    with pytest.raises(BadInputError, match="OUT is a file"):
        convert_to_nnunet(tmp_path / "brats", tmp_path / "afile", 9, "X", label_map={4: 3})
    with pytest.raises(BadInputError, match="--dataset-id 8 is taken"):
        convert_to_nnunet(tmp_path / "brats", tmp_path / "raw", 8, "Other", label_map={4: 3})
    with pytest.raises(MrisegError, match="not consecutive"):
        convert_to_nnunet(tmp_path / "brats", tmp_path / "new", 9, "X")
    assert not (tmp_path / "new").exists()  # nothing left behind, not even the folder it made
