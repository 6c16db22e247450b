"""Readers: layout detection and one Case per layout, on synthetic and on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (BRATS_2013_MAP, make_brats, make_brats2023, make_class_index_pairs, make_lgg, make_msd,
                           make_pairs)
from mriseg.data.preprocess import background_values
from mriseg.data.readers import detect_layout, label_scheme, list_cases, read_case
from mriseg.errors import BadInputError


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    brats = make_brats(root / "brats")
    return {
        "lgg": make_lgg(root / "lgg"),
        "brats": brats,
        "brats2023": make_brats2023(root / "brats2023", brats),
        "msd": make_msd(root / "msd", brats, channel_files=False),
        "nnunet": make_msd(root / "nnunet", brats, channel_files=True),
        "pairs": make_pairs(root / "pairs"),
        "pairs_flat": make_pairs(root / "pairs_flat", flat=True),
    }


@pytest.mark.parametrize("name, layout", [("lgg", "lgg"), ("brats", "brats"), ("brats2023", "brats"),
                                          ("msd", "msd"), ("nnunet", "msd"), ("pairs", "pairs"),
                                          ("pairs_flat", "pairs")])
def test_detect_layout(datasets, name, layout):
    assert detect_layout(datasets[name]) == layout


def test_lgg_case_is_a_three_channel_slice_stack_with_binary_mask(datasets):
    refs = list_cases(datasets["lgg"])
    assert [r.case_id for r in refs] == ["TCGA_SY_0001_19990101", "TCGA_SY_0002_19990101", "TCGA_SY_0003_19990101"]
    case = read_case(refs[0])
    assert case.image.shape == (3, 12, 32, 32) and case.image.dtype == np.float32
    assert case.label.shape == (12, 32, 32)
    assert set(np.unique(case.label)) <= {0, 1} and case.label.max() == 1
    assert case.slice_axis == 0 and case.layout == "lgg"
    assert case.modalities == ["pre-contrast", "flair", "post-contrast"]


def test_lgg_slices_sorted_by_integer_not_lexically(datasets):
    ref = list_cases(datasets["lgg"])[0]
    numbers = [int(p.stem.rsplit("_", 1)[1]) for p in ref.image_paths]
    assert numbers == list(range(1, 13))  # lexical order would put 10 before 2


@pytest.mark.parametrize("name, modalities", [("brats", ["t1", "t1ce", "t2", "flair"]),
                                              ("brats2023", ["t1n", "t1c", "t2w", "t2f"])])
def test_brats_naming(datasets, name, modalities):
    case = read_case(list_cases(datasets[name])[0])
    assert case.modalities == modalities
    assert case.image.shape == (4, 24, 24, 16)
    assert set(np.unique(case.label)) <= {0, 1, 2, 4}
    assert case.slice_axis == 2 and case.affine.shape == (4, 4)
    assert case.header["qform_code"] == 1 and case.header["sform_code"] == 1
    assert case.spacing == pytest.approx((10.0, 10.0, 155 / 16))


@pytest.mark.parametrize("name", ["msd", "nnunet"])
def test_msd_4d_and_channel_files_give_the_same_case(datasets, name):
    refs = list_cases(datasets[name])
    assert [r.case_id for r in refs] == ["BRATS_001", "BRATS_002"]
    case = read_case(refs[0])
    reference = read_case(list_cases(datasets["brats"])[0])
    assert case.modalities == ["FLAIR", "T1w", "t1gd", "T2w"]
    np.testing.assert_array_equal(case.image[0], reference.image[3])  # flair
    np.testing.assert_array_equal(case.label, reference.label)
    assert case.header["label_names"]["4"] == "enhancing"


@pytest.mark.parametrize("name", ["pairs", "pairs_flat"])
def test_pairs_give_2d_cases_with_binary_masks(datasets, name):
    refs = list_cases(datasets[name])
    assert [r.case_id for r in refs] == ["shape0", "shape1", "shape2"]
    case = read_case(refs[1])
    assert case.image.shape == (1, 20, 24) and case.slice_axis is None
    assert set(np.unique(case.label)) == {0, 1}


def test_seed_style_multiclass_pairs(tmp_path):
    root = make_class_index_pairs(tmp_path / "shape", "train_imgs", "train_mask")
    assert detect_layout(root) == "pairs"
    case = read_case(list_cases(root)[0])
    assert case.image.shape == (3, 16, 16) and set(np.unique(case.label)) == {0, 1, 2, 3}


def test_camvid_style_train_and_valid_pairs_get_prefixed_ids(tmp_path):
    make_class_index_pairs(tmp_path / "camvid", "train_images", "train_labels")
    make_class_index_pairs(tmp_path / "camvid", "valid_images", "valid_labels")
    ids = [r.case_id for r in list_cases(tmp_path / "camvid")]
    assert ids == ["train_images-0", "train_images-1", "valid_images-0", "valid_images-1"]


def test_colour_coded_masks_are_refused(tmp_path):
    root = make_pairs(tmp_path / "pairs", count=1)
    mask = root / "masks" / "shape0.png"
    Image.fromarray(np.dstack([np.zeros((20, 24), np.uint8), np.full((20, 24), 128, np.uint8),
                               np.zeros((20, 24), np.uint8)])).save(mask)
    with pytest.raises(BadInputError, match="colour-coded"):
        read_case(list_cases(root)[0])


def test_single_inputs_for_predict(datasets):
    brats_folder = datasets["brats"] / "BraTS2021_S0001"
    assert read_case(brats_folder).image.shape == (4, 24, 24, 16)
    assert read_case(datasets["lgg"] / "TCGA_SY_0002_19990101").image.shape == (3, 12, 32, 32)
    one_file = read_case(brats_folder / "BraTS2021_S0001_flair.nii.gz")
    assert one_file.image.shape == (1, 24, 24, 16) and one_file.label is None and one_file.slice_axis == 2
    four_d = read_case(datasets["msd"] / "imagesTr" / "BRATS_002.nii.gz")
    assert four_d.image.shape == (4, 24, 24, 16)
    png = read_case(datasets["pairs"] / "images" / "shape0.png")
    assert png.image.shape == (1, 20, 24) and png.label is None


def test_lgg_patient_folder_without_masks_reads_as_unlabelled(datasets, tmp_path):
    patient = tmp_path / "TCGA_SY_0001_19990101"
    patient.mkdir()
    for file in (datasets["lgg"] / patient.name).glob("*.tif"):
        if not file.name.endswith("_mask.tif"):
            (patient / file.name).write_bytes(file.read_bytes())
    assert detect_layout(patient) == "lgg"
    case = read_case(patient)
    assert case.image.shape == (3, 12, 32, 32) and case.label is None


def test_a_folder_of_several_cases_is_not_one_input(datasets):
    with pytest.raises(BadInputError, match="holds 3 cases"):
        read_case(datasets["lgg"])


def test_label_scheme_is_named_from_the_values_found():
    assert label_scheme([0, 1]) == "binary"
    assert label_scheme([0, 1, 2, 3, 4]) == "brats2013"
    assert label_scheme([0, 2, 4]) == "brats"
    assert label_scheme([0, 1, 2, 3], naming="brats2023") == "brats2023"
    assert label_scheme([0, 1, 2, 3]) == "multiclass"
    # 2023 names: 3 is enhancing tumour; a 4 (BraTS 2024's resection cavity) is not 2013's enhancing tumour
    assert label_scheme([0, 1, 2, 3, 4], naming="brats2023") == "multiclass"


def test_a_modality_map_with_2023_sequence_names_keeps_the_2023_labels(datasets):
    """With --modalities the naming used to become "custom", and 2023 cases were scored with ET = 4."""
    from mriseg.evaluate import scheme_for_dataset

    refs = list_cases(datasets["brats2023"], modalities="t1n=t1n,t1c=t1c,t2w=t2w,t2f=t2f,seg=seg")
    assert refs[0].naming == "brats2023" and scheme_for_dataset(refs[0]) == "brats2023"
    assert list_cases(datasets["brats"], modalities="flair=_flair,t1ce=_t1ce,seg=_seg")[0].naming == "custom"


def test_a_palette_png_to_segment_is_read_as_its_grey_levels(tmp_path):
    grey = np.linspace(30, 229, 16 * 20).reshape(16, 20).astype(np.uint8)
    image = Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(tmp_path / "scan.png")
    case = read_case(tmp_path / "scan.png")
    expected = np.asarray(image.convert("L"), dtype=np.float32)
    assert case.image.shape == (1, 16, 20)
    np.testing.assert_array_equal(case.image[0], expected)  # colours, not palette indices 0..15


def test_two_files_with_one_name_in_a_pairs_folder_are_refused(tmp_path):
    for name in ("a.png", "a.tif", "a_mask.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    with pytest.raises(BadInputError, match="same name without extension"):
        list_cases(tmp_path, layout="pairs")


def test_real_brats_with_a_modality_map(shared_data):
    refs = list_cases(shared_data / "brats", modalities=BRATS_2013_MAP)
    assert [r.case_id for r in refs] == ["brats_2013_pat0002_1", "brats_2013_pat0004_1",
                                         "brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    case = read_case(refs[0])
    assert case.image.shape == (2, 240, 240, 155) and case.modalities == ["flair", "t1ce"]
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1, 2, 3, 4}
    assert case.slice_axis == 2
    # The image files carry qform_code 0 and sform_code 2 (only OTMultiClass has 2 and 1).
    assert case.header["qform_code"] == 0 and case.header["sform_code"] == 2
    np.testing.assert_array_equal(case.affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    assert case.affine[1, 3] == 239


def test_real_brats_without_a_map_says_what_to_pass(shared_data):
    with pytest.raises(BadInputError, match="--modalities"):
        list_cases(shared_data / "brats")


def test_real_lgg_slices(shared_data):
    case = read_case(shared_data / "lgg" / "TCGA_CS_4942_19970222")
    assert case.image.shape == (3, 3, 256, 256)
    assert case.header["slice_names"] == [f"TCGA_CS_4942_19970222_{n}.tif" for n in (10, 11, 12)]
    assert set(np.unique(case.label)) == {0, 1}
    assert case.label.sum(axis=(1, 2)).tolist() == [1257, 1539, 1383]  # PROVENANCE.md's 255-valued counts
    # Its FLAIR plane has 1 in every corner but 0 elsewhere outside the head: no constant background.
    assert background_values(case.image).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("damage, match", [
    ("gap", "_5.tif: slice missing"),          # slices 4 and 6 would pass for neighbours
    ("orphan mask", "_13_mask.tif: mask has no slice image"),
    ("grey slices", "1 channel.*RGB"),         # manifest would say 3 modalities for 1 channel
])
def test_a_damaged_lgg_patient_is_refused_by_name(datasets, tmp_path, damage, match):
    patient = tmp_path / "TCGA_SY_0001_19990101"
    patient.mkdir()
    for file in (datasets["lgg"] / patient.name).glob("*.tif"):
        (patient / file.name).write_bytes(file.read_bytes())
    if damage == "gap":
        for name in ("TCGA_SY_0001_19990101_5.tif", "TCGA_SY_0001_19990101_5_mask.tif"):
            (patient / name).unlink()
    elif damage == "orphan mask":
        (patient / "TCGA_SY_0001_19990101_13_mask.tif").write_bytes(
            (patient / "TCGA_SY_0001_19990101_12_mask.tif").read_bytes())
    else:
        for file in patient.glob("*[0-9].tif"):
            Image.fromarray(np.asarray(Image.open(file))[..., 1]).save(file)
    with pytest.raises(BadInputError, match=match):
        read_case(list_cases(patient)[0])


@pytest.mark.parametrize("given, stem, matches", [
    ("Flair_subtrMeanDivStd", "flair_subtrmeandivstd", True),   # the whole name
    ("flair", "pat1_flair", True), ("flair", "pat1-flair", True),  # the end after _ or -
    ("flair_", "flair_subtrmeandivstd", True),                  # a prefix ending in _
    ("_flair", "pat1_flair", True),                             # a suffix starting with _
    ("flair", "flair_subtrmeandivstd", False), ("flair", "preflair", False), ("flair_", "t1_flair", False),
])
def test_modality_names_match_whole_names_ends_and_marked_prefixes(given, stem, matches):
    from mriseg.data.readers.brats import name_matches

    assert name_matches(stem, given.lower(), exact=True) is matches


def test_a_modality_map_that_matches_no_file_names_the_files_there(datasets, tmp_path):
    brats = datasets["brats"]
    refs = list_cases(brats, modalities="flair=_flair,t1ce=_t1ce,seg=_seg")
    assert refs[0].modalities == ("flair", "t1ce") and refs[0].label_paths
    with pytest.raises(BadInputError, match="missing modality flair \\(no file matches flair=Flairr.*files here: .*_flair"):
        list_cases(brats, modalities="flair=Flairr,seg=_seg")
