"""The bad-input corpus: each entry builds one broken dataset, mask set or checkpoint in a folder.

An entry (:class:`BadInput`) names the command that meets the input, says in words what is wrong
(the row of docs/reliability.md), and has a ``build`` function that writes the input under a
:class:`Workspace` and returns a :class:`Scenario`: the CLI arguments, the output folder the
command may write to, and what must happen. Most scenarios expect exit code 2 and one error line
holding ``fragments`` (the file's name and words of the problem). A few bad inputs are accepted
by design (e.g. 0/255 masks, normalised to 0/1); their scenario expects exit code 0 and a
``check`` of the output.

Templates (small synthetic datasets in every layout) are written once per test session and
copied by the builders, so each entry costs one copy and one CLI call.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

from data_fixtures import make_brats, make_lgg, make_msd, make_pairs

BRATS_SHAPE = (12, 12, 8)
LGG_SIZE = (4, 16, 16)


@dataclass
class Scenario:
    """What to run and what must come out of it."""

    args: list[str]
    out: Path
    fragments: tuple[str, ...] = ()
    exit_code: int = 2
    obey_permissions: bool = False
    fresh_interpreter: bool = False   # the behaviour depends on the real stderr (e.g. its encoding)
    check: Callable[[Path], None] | None = None   # for accepted inputs: inspects ``out``
    after: Callable[[Path], None] | None = None   # for refused inputs: a further check after the run


@dataclass
class Workspace:
    """A test's folder: ``root`` holds inputs, ``out`` is the only place a command may write."""

    root: Path
    templates: dict[str, Path]
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.root / "out"

    def copy(self, template: str, name: str = "src") -> Path:
        target = self.root / name
        shutil.copytree(self.templates[template], target, symlinks=True)
        return target


@dataclass(frozen=True)
class BadInput:
    name: str
    command: str
    problem: str
    expected: str
    build: Callable[[Workspace], Scenario]


def make_templates(root: Path) -> dict[str, Path]:
    """One small dataset per layout (and a mask set for evaluate), written once per session."""
    brats = make_brats(root / "brats", cases=2, size=BRATS_SHAPE)
    templates = {
        "brats": brats,
        "lgg": make_lgg(root / "lgg", cases=2, size=LGG_SIZE),
        "pairs": make_pairs(root / "pairs", count=2),
        "msd": make_msd(root / "msd", brats, channel_files=False),
    }
    masks = root / "masks"
    masks.mkdir()
    for folder in sorted(p for p in brats.iterdir() if p.is_dir()):
        source = nib.load(str(folder / f"{folder.name}_seg.nii.gz"))
        binary = (np.asanyarray(source.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(binary, source.affine), str(masks / f"{folder.name}.nii.gz"))
    templates["masks"] = masks
    from mriseg.data.cache import build_cache
    from mriseg.data.preprocess import PreprocessParams

    templates["cache"] = root / "cache"
    build_cache(templates["lgg"], templates["cache"], PreprocessParams())
    templates["cache-brats"] = root / "cache-brats"
    build_cache(brats, templates["cache-brats"], PreprocessParams())
    templates["checkpoint"] = tiny_checkpoint(root / "unet2d.pt")
    templates["checkpoint-3d"] = tiny_checkpoint(root / "tiny3d.pt", model="tiny3d", in_channels=4, spatial_dims=3)
    return templates


# ----------------------------------------------------------------------------- file helpers


def brats_file(root: Path, case: int, modality: str) -> Path:
    name = f"BraTS2021_S{case:04d}"
    return root / name / f"{name}_{modality}.nii.gz"


def lgg_slice(root: Path, case: int, n: int, mask: bool = False) -> Path:
    name = f"TCGA_SY_{case:04d}_19990101"
    return root / name / f"{name}_{n}{'_mask' if mask else ''}.tif"


def affine_of(path: Path) -> np.ndarray:
    return nib.load(str(path)).affine


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def nifti_bytes(path: Path) -> bytes:
    """The uncompressed bytes of a .nii.gz file."""
    return gzip.decompress(path.read_bytes())


def set_pixdim(path: Path, zooms: tuple[float, float, float]) -> None:
    """Rewrite pixdim[1:4] in the raw header and drop qform/sform, so only pixdim gives the voxel size."""
    raw = bytearray(nifti_bytes(path))
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])), check=False)
    header["pixdim"][1:4] = zooms
    header["qform_code"] = 0
    header["sform_code"] = 0
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))


def reject(ws: Workspace, source: Path, target: Path, *problem: str, extra: tuple[str, ...] = ()) -> Scenario:
    """A preprocess run that must fail naming ``target`` and the problem."""
    return Scenario(["preprocess", str(source), str(ws.out), *extra], ws.out, (target.name, *problem))


def cache_check(label_values: list[int] | None = None, cases: int | None = None) -> Callable[[Path], None]:
    """For accepted inputs: the cache opens, its arrays are finite, labels hold ``label_values``."""

    def check(out: Path) -> None:
        from mriseg.data.cache import open_cache

        cache = open_cache(out)
        if cases is not None:
            assert len(cache) == cases, cache.case_ids
        for case_id in cache.case_ids:
            assert np.isfinite(np.asarray(cache.image(case_id), dtype=np.float32)).all(), case_id
        if label_values is not None:
            assert cache.label_info["values"] == label_values, cache.label_info

    return check


def accept(ws: Workspace, source: Path, check: Callable[[Path], None], *extra: str) -> Scenario:
    return Scenario(["preprocess", str(source), str(ws.out), *extra], ws.out, exit_code=0, check=check)


# ----------------------------------------------------------------------------- NIfTI (brats layout)


def nifti_zero_byte(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t2")
    target.write_bytes(b"")
    return reject(ws, src, target, "cannot read NIfTI")


def nifti_truncated_header(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "flair")
    target.write_bytes(gzip.compress(nifti_bytes(target)[:120]))
    return reject(ws, src, target, "cannot read NIfTI")


def nifti_truncated_data(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "t1")
    raw = nifti_bytes(target)
    target.write_bytes(gzip.compress(raw[: 352 + (len(raw) - 352) // 2]))
    return reject(ws, src, target, "cannot read NIfTI")


def nifti_gzip_stream_cut(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "seg")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) * 2 // 3])
    return reject(ws, src, target, "cannot read NIfTI")


def nifti_wrong_magic(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t1ce")
    raw = bytearray(nifti_bytes(target))
    raw[344:348] = b"xx1\0"
    target.write_bytes(gzip.compress(bytes(raw)))
    return reject(ws, src, target, "cannot read NIfTI")


def gzip_not_nifti(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "flair")
    target.write_bytes(gzip.compress(b"patient notes, not an image\n" * 40))
    return reject(ws, src, target, "cannot read NIfTI")


def nifti_not_gzip(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "t2")
    target.write_text("<html>404 not found</html>\n")
    return reject(ws, src, target, "cannot read NIfTI")


def nifti_zero_pixdim(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t1")
    set_pixdim(target, (0.0, 1.0, 1.0))
    return reject(ws, src, target, "voxel size")


def nifti_nan_pixdim(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t1")
    set_pixdim(target, (1.0, float("nan"), 1.0))
    return reject(ws, src, target, "voxel size")


def nifti_negative_pixdim(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    for case in (1, 2):
        for modality in ("t1", "t1ce", "t2", "flair", "seg"):
            set_pixdim(brats_file(src, case, modality), (-1.875, 1.875, 1.9375))

    def check(out: Path) -> None:
        cache_check(cases=2)(out)
        manifest = json.loads((out / "manifest.json").read_text())
        assert all(s > 0 for r in manifest["cases"].values() for s in r["spacing"]), manifest["cases"]

    return accept(ws, src, check)


def nifti_5d(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "t1")
    save_nifti(target, np.zeros(BRATS_SHAPE + (1, 2), dtype=np.float32), affine_of(brats_file(src, 2, "t2")))
    return reject(ws, src, target, "expected a 3D volume")


def nifti_4d_in_brats(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t2")
    save_nifti(target, np.zeros(BRATS_SHAPE + (2,), dtype=np.float32), affine_of(brats_file(src, 1, "t1")))
    return reject(ws, src, target, "expected a 3D volume")


def label_shape_mismatch(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "seg")
    save_nifti(target, np.zeros((12, 12, 7), dtype=np.uint8), affine_of(target))
    return reject(ws, src, target, "label shape")


def modality_affine_mismatch(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t1ce")
    image = nib.load(str(target))
    shifted = image.affine.copy()
    shifted[:3, 3] += 20.0  # 20 mm off: another scan or a bad registration
    save_nifti(target, np.asanyarray(image.dataobj), shifted)
    return reject(ws, src, target, "affine")


def label_affine_mismatch(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "seg")
    image = nib.load(str(target))
    flipped = image.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # left-right flipped label
    save_nifti(target, np.asanyarray(image.dataobj), flipped)
    return reject(ws, src, target, "affine")


def label_nan(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "seg")
    label = np.zeros(BRATS_SHAPE, dtype=np.float32)
    label[2, 3, 4] = np.nan
    save_nifti(target, label, affine_of(target))
    return reject(ws, src, target, "NaN/Inf")


def image_inf(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "flair")
    image = nib.load(str(target))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[5, 5, 5] = np.inf
    save_nifti(target, data, image.affine)
    return reject(ws, src, target, "NaN/Inf")


def label_negative(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "seg")
    label = np.zeros(BRATS_SHAPE, dtype=np.int16)
    label[4, 4, 4] = -1
    save_nifti(target, label, affine_of(target))
    return reject(ws, src, target, "0..255")


def label_above_255(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "seg")
    label = np.zeros(BRATS_SHAPE, dtype=np.int16)
    label[4, 4, 4] = 300
    save_nifti(target, label, affine_of(target))
    return reject(ws, src, target, "0..255")


def nifti_mask_0_255(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    for case in (1, 2):
        target = brats_file(src, case, "seg")
        image = nib.load(str(target))
        save_nifti(target, np.where(np.asanyarray(image.dataobj) > 0, 255, 0).astype(np.uint8), image.affine)
    return accept(ws, src, cache_check(label_values=[0, 1]))


def all_zero_volume(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "flair")
    save_nifti(target, np.zeros(BRATS_SHAPE, dtype=np.int16), affine_of(target))
    return accept(ws, src, cache_check(cases=2))


def single_slice_volume(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    for case in (1, 2):
        for modality in ("t1", "t1ce", "t2", "flair", "seg"):
            target = brats_file(src, case, modality)
            image = nib.load(str(target))
            save_nifti(target, np.asanyarray(image.dataobj)[:, :, 3:4], image.affine)
    return accept(ws, src, cache_check(cases=2), "--size", "16,16")


def brats_missing_modality(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    brats_file(src, 2, "t1").unlink()
    return reject(ws, src, brats_file(src, 2, "t1").parent, "missing modality t1")


def symlink_loop_file(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 1, "t2")
    target.unlink()
    target.symlink_to(target.name)  # points at itself
    return reject(ws, src, target, "symbolic link")


def symlink_loop_dataset(ws: Workspace) -> Scenario:
    loop = ws.root / "loop"
    loop.symlink_to("loop")
    return reject(ws, loop, loop, "symbolic link")


def symlink_cycle_folder(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    (src / "BraTS2021_S0001" / "again").symlink_to("..")  # a folder cycle: listing must not recurse forever
    return accept(ws, src, cache_check(cases=2))


def unreadable_file(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = brats_file(src, 2, "t1ce")
    target.chmod(0)
    return Scenario(["preprocess", str(src), str(ws.out)], ws.out, (target.name, "Permission denied"),
                    obey_permissions=True)


def unreadable_folder(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    target = src / "BraTS2021_S0002"
    target.chmod(0)
    return Scenario(["preprocess", str(src), str(ws.out)], ws.out, (target.name, "Permission denied"),
                    obey_permissions=True)


# ----------------------------------------------------------------------------- MSD / dataset.json


def dataset_json_not_json(ws: Workspace) -> Scenario:
    src = ws.copy("msd")
    (src / "dataset.json").write_text("{'labels': {0: 'background'},")
    return reject(ws, src, src / "dataset.json", "dataset.json")


def dataset_json_wrong_type(ws: Workspace) -> Scenario:
    src = ws.copy("msd")
    (src / "dataset.json").write_text(json.dumps(["imagesTr", "labelsTr"]))
    return reject(ws, src, src / "dataset.json", "dataset.json")


def dataset_json_points_outside(ws: Workspace) -> Scenario:
    """nnU-Net's ``training`` list naming files outside the folder: mriseg lists imagesTr/ itself."""
    src = ws.copy("msd")
    outside = ws.root / "outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"not for mriseg to read")
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = [{"image": "../outside/secret.nii.gz", "label": "/etc/passwd"}]
    (src / "dataset.json").write_text(json.dumps(meta))

    def check(out: Path) -> None:
        cache_check(cases=2)(out)
        manifest = json.loads((out / "manifest.json").read_text())
        sources = [s["path"] for r in manifest["cases"].values() for s in r["sources"]]
        assert all(Path(s).is_relative_to(src.resolve()) for s in sources), sources

    return accept(ws, src, check)


def msd_label_outside_dataset_json(ws: Workspace) -> Scenario:
    src = ws.copy("msd")
    target = src / "labelsTr" / "BRATS_002.nii.gz"
    image = nib.load(str(target))
    label = np.asanyarray(image.dataobj).astype(np.uint8)
    label[0, 0, 0] = 7  # dataset.json names 0, 1, 2, 4 only
    save_nifti(target, label, image.affine)
    return reject(ws, src, target, "7", "dataset.json")


def msd_empty_images(ws: Workspace) -> Scenario:
    src = ws.copy("msd")
    for file in (src / "imagesTr").iterdir():
        file.unlink()
    return reject(ws, src, src, "no cases found")


def msd_duplicate_case(ws: Workspace) -> Scenario:
    src = ws.copy("msd")
    first = src / "imagesTr" / "BRATS_001.nii.gz"
    (src / "imagesTr" / "BRATS_001.nii").write_bytes(nifti_bytes(first))
    return reject(ws, src, src / "imagesTr" / "BRATS_001.nii", "BRATS_001")


# ----------------------------------------------------------------------------- 2D images (lgg, pairs)


def lgg_zero_byte_tif(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    target = lgg_slice(src, 1, 2)
    target.write_bytes(b"")
    return reject(ws, src, target, "cannot read image")


def lgg_wrong_magic_tif(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    target = lgg_slice(src, 2, 1, mask=True)
    data = bytearray(target.read_bytes())
    data[:4] = b"\x89PNG"
    target.write_bytes(bytes(data))
    return reject(ws, src, target, "cannot read image")


def lgg_slice_without_mask(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    lgg_slice(src, 2, 3, mask=True).unlink()
    return reject(ws, src, lgg_slice(src, 2, 3), "no mask")


def lgg_stack_in_slice(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    target = lgg_slice(src, 1, 1)
    tifffile.imwrite(target, np.zeros((2, 5, 16, 16, 3), dtype=np.uint8))
    return reject(ws, src, target, "expected a 2D image")


def lgg_slice_shapes_differ(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    target = lgg_slice(src, 2, 2)
    tifffile.imwrite(target, np.zeros((16, 20, 3), dtype=np.uint8))
    return reject(ws, src, target, "differs from")


def lgg_mask_0_1(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    for mask in src.glob("*/*_mask.tif"):
        tifffile.imwrite(mask, (tifffile.imread(mask) > 0).astype(np.uint8))
    return accept(ws, src, cache_check(cases=2))


def lgg_non_utf8_name(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    folder = lgg_slice(src, 1, 1).parent
    os.rename(os.fsencode(folder), os.fsencode(folder.parent) + b"/TCGA_\xff\xfe_0001")
    return accept(ws, src, cache_check(cases=2))


def non_utf8_bad_file(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    folder = lgg_slice(src, 1, 1).parent
    renamed = os.fsencode(folder.parent) + b"/TCGA_\xff_0001"
    os.rename(os.fsencode(folder), renamed)
    target = Path(os.fsdecode(renamed)) / lgg_slice(src, 1, 3).name
    target.write_bytes(b"\x00" * 10)
    scenario = reject(ws, src, target, "cannot read image")
    scenario.fresh_interpreter = True  # the name reaches the real stderr, which escapes undecodable bytes
    return scenario


def pairs_zero_byte_png(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")
    target = src / "images" / "shape1.png"
    target.write_bytes(b"")
    return reject(ws, src, target, "cannot read image")


def pairs_truncated_png(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")
    target = src / "masks" / "shape0.png"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return reject(ws, src, target, "cannot read image")


def pairs_jpeg_named_png(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")
    target = src / "images" / "shape0.png"
    target.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG start and nothing else
    return reject(ws, src, target, "cannot read image")


def pairs_mask_shape_mismatch(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")
    target = src / "masks" / "shape1.png"
    Image.fromarray(np.zeros((10, 24), dtype=np.uint8)).save(target)
    return reject(ws, src, target, "differs from image shape")


def pairs_colour_mask(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")
    target = src / "masks" / "shape0.png"
    mask = np.zeros((20, 24, 3), dtype=np.uint8)
    mask[2:6, 2:6, 0] = 255
    Image.fromarray(mask).save(target)
    return reject(ws, src, target, "colour")


def pairs_mask_0_255(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")  # the template's masks hold 0/255, as skimage-saved masks do
    return accept(ws, src, cache_check(label_values=[0, 1]))


def pairs_duplicate_ids(ws: Workspace) -> Scenario:
    src = ws.copy("pairs")
    Image.open(src / "images" / "shape0.png").save(src / "images" / "shape0.tif")
    return reject(ws, src, src, "shape0")


# ----------------------------------------------------------------------------- folders


def empty_dataset_folder(ws: Workspace) -> Scenario:
    src = ws.root / "src"
    src.mkdir()
    return reject(ws, src, src, "unrecognised layout")


def dicom_series_folder(ws: Workspace) -> Scenario:
    """What a scanner exports: DICOM slices without a suffix, found by their "DICM" preamble."""
    src = ws.root / "src"
    series = src / "series1"
    series.mkdir(parents=True)
    for index in range(3):
        (series / f"IM{index:04d}").write_bytes(bytes(128) + b"DICM" + bytes(64))
    return reject(ws, src, src, "holds DICOM files", "dcm2niix")


def empty_case_folders(ws: Workspace) -> Scenario:
    src = ws.root / "src"
    for name in ("BraTS2021_S0001", "BraTS2021_S0002"):
        (src / name).mkdir(parents=True)
    return reject(ws, src, src, "no cases found", extra=("--layout", "brats"))


def source_is_a_file(ws: Workspace) -> Scenario:
    src = ws.root / "scan.nii.gz"
    shutil.copy(brats_file(ws.templates["brats"], 1, "t1"), src)
    return reject(ws, src, src, "is a file")


def output_is_a_file(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    ws.out.write_text("my thesis\n")
    return Scenario(["preprocess", str(src), str(ws.out)], ws.out, (ws.out.name, "not a folder"))


def output_holds_other_files(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    ws.out.mkdir()
    (ws.out / "thesis.tex").write_text("\\documentclass{article}\n")
    return Scenario(["preprocess", str(src), str(ws.out)], ws.out, (ws.out.name, "not an mriseg cache"))


def output_manifest_corrupt(ws: Workspace) -> Scenario:
    src = ws.copy("brats")
    ws.out.mkdir()
    (ws.out / "manifest.json").write_text('{"format": "mriseg-cache", ')
    return Scenario(["preprocess", str(src), str(ws.out)], ws.out, ("manifest.json", "cannot read"))


# ----------------------------------------------------------------------------- evaluate


def evaluate_scenario(ws: Workspace, pred: Path, target: Path, *problem: str) -> Scenario:
    return Scenario(["evaluate", str(pred), str(ws.templates["masks"]), "--out", str(ws.out)], ws.out,
                    (target.name, *problem))


def eval_truncated_prediction(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    target = pred / "BraTS2021_S0002.nii.gz"
    target.write_bytes(target.read_bytes()[:90])
    return evaluate_scenario(ws, pred, target, "cannot read NIfTI")


def eval_probabilities(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    target = pred / "BraTS2021_S0001.nii.gz"
    save_nifti(target, np.full(BRATS_SHAPE, 0.7, dtype=np.float32), affine_of(target))
    return evaluate_scenario(ws, pred, target, "non-integer")


def eval_nan(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    target = pred / "BraTS2021_S0001.nii.gz"
    data = np.zeros(BRATS_SHAPE, dtype=np.float32)
    data[1, 1, 1] = np.nan
    save_nifti(target, data, affine_of(target))
    return evaluate_scenario(ws, pred, target, "NaN")


def eval_shape_mismatch(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    target = pred / "BraTS2021_S0002.nii.gz"
    save_nifti(target, np.zeros((12, 12, 9), dtype=np.uint8), affine_of(target))
    return evaluate_scenario(ws, pred, target, "shape")


def eval_affine_mismatch(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    target = pred / "BraTS2021_S0001.nii.gz"
    image = nib.load(str(target))
    save_nifti(target, np.asanyarray(image.dataobj), image.affine @ np.diag([1.0, -1.0, 1.0, 1.0]))
    return evaluate_scenario(ws, pred, target, "affine")


def eval_empty_prediction_folder(ws: Workspace) -> Scenario:
    pred = ws.root / "pred"
    pred.mkdir()
    return evaluate_scenario(ws, pred, pred, "no masks found")


def eval_duplicate_ids(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    image = nib.load(str(pred / "BraTS2021_S0001.nii.gz"))
    nib.save(image, str(pred / "BraTS2021_S0001.nii"))
    return evaluate_scenario(ws, pred, pred / "BraTS2021_S0001.nii.gz", "BraTS2021_S0001")


def eval_output_is_a_file(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    ws.out.write_text("results from last week\n")
    return evaluate_scenario(ws, pred, ws.out, "not a folder")


def eval_mask_0_255(ws: Workspace) -> Scenario:
    pred = ws.copy("masks", "pred")
    for target in pred.iterdir():
        image = nib.load(str(target))
        save_nifti(target, (np.asanyarray(image.dataobj) * 255).astype(np.uint8), image.affine)

    def check(out: Path) -> None:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["regions"]["tumour"]["metrics"]["dice"]["mean"] == 1.0, summary

    return Scenario(["evaluate", str(pred), str(ws.templates["masks"]), "--out", str(ws.out)], ws.out,
                    exit_code=0, check=check)


# ----------------------------------------------------------------------------- predict and checkpoints

MARKER = "pwned-marker"


def tiny_checkpoint(path: Path, model: str = "unet", in_channels: int = 3, spatial_dims: int = 2) -> Path:
    """A checkpoint as ``mriseg train`` writes it, for an untrained 4-feature network (binary task)."""
    import torch

    from mriseg.checkpoint import save_checkpoint
    from mriseg.models import build_model

    torch.manual_seed(0)
    options = {"features": 4} if model == "unet" else {}
    network = build_model(model, in_channels, 1, spatial_dims=spatial_dims, **options)
    task = {"kind": "binary", "activation": "sigmoid", "out_channels": 1, "labels": [0, 1], "foreground_label": 1,
            "channel_names": ["tumour"], "threshold": 0.5, "ignore_index": None}
    return save_checkpoint(path, {
        "model": {"name": model, "in_channels": in_channels, "out_channels": 1, "spatial_dims": spatial_dims,
                  "options": options},
        "state_dict": network.state_dict(), "preprocess": {"size": None, "crop": False, "norm": "zscore",
                                                           "label_map": {}, "dtype": "float16"},
        "modalities": ["pre-contrast", "flair", "post-contrast"], "task": task, "patch_size": [],
        "epoch": 1, "best_score": 0.0})


def predict_scenario(ws: Workspace, checkpoint: Path, target: Path, *problem: str,
                     inputs: tuple[Path, ...] | None = None) -> Scenario:
    lgg_case = sorted(p for p in ws.templates["lgg"].iterdir() if p.is_dir())[0]
    return Scenario(["predict", *(str(p) for p in (inputs or (lgg_case,))), "--model", str(checkpoint),
                     "--out", str(ws.out), "--device", "cpu"], ws.out, (target.name, *problem))


def checkpoint_truncated(ws: Workspace) -> Scenario:
    target = ws.root / "best.pt"
    data = ws.templates["checkpoint"].read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return predict_scenario(ws, target, target, "truncated or corrupt")


def checkpoint_is_a_text_file(ws: Workspace) -> Scenario:
    target = ws.root / "notes.md"
    target.write_text("# my notes\n")
    return predict_scenario(ws, target, target, "neither a torch.save archive nor a pickle")


def checkpoint_zero_byte(ws: Workspace) -> Scenario:
    target = ws.root / "best.pt"
    target.write_bytes(b"")
    return predict_scenario(ws, target, target, "truncated or corrupt")


def checkpoint_of_another_model(ws: Workspace) -> Scenario:
    """Weights of a 3D tiny3d network in a checkpoint that says it holds the 2D unet."""
    import torch

    target = ws.root / "best.pt"
    document = torch.load(ws.templates["checkpoint"], weights_only=True)
    other = torch.load(ws.templates["checkpoint-3d"], weights_only=True)
    document["state_dict"] = other["state_dict"]
    torch.save(document, target)
    return predict_scenario(ws, target, target, "weights do not fit")


def checkpoint_unknown_model(ws: Workspace) -> Scenario:
    import torch

    target = ws.root / "best.pt"
    document = torch.load(ws.templates["checkpoint"], weights_only=True)
    document["model"]["name"] = "resnet9000"
    torch.save(document, target)
    return predict_scenario(ws, target, target, "resnet9000")


def checkpoint_from_another_tool(ws: Workspace) -> Scenario:
    import torch

    target = ws.root / "model.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, target)
    return predict_scenario(ws, target, target, "not an mriseg checkpoint")


def checkpoint_future_version(ws: Workspace) -> Scenario:
    import torch

    target = ws.root / "best.pt"
    document = torch.load(ws.templates["checkpoint"], weights_only=True)
    document["format_version"] = 99
    torch.save(document, target)
    return predict_scenario(ws, target, target, "format_version 99")


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_executing_pickle(ws: Workspace) -> Scenario:
    """A torch.save file whose unpickling would create a marker file; the marker must never appear."""
    import torch

    target = ws.root / "best.pt"
    marker = ws.root / MARKER
    document = torch.load(ws.templates["checkpoint"], weights_only=True)
    document["epoch"] = _RunsCode(marker)
    torch.save(document, target)
    scenario = predict_scenario(ws, target, target, "refused to load")

    def check_marker(out: Path) -> None:
        assert not marker.exists(), "the checkpoint's code ran"

    scenario.after = check_marker
    return scenario


def checkpoint_plain_pickle(ws: Workspace) -> Scenario:
    """Not even a torch file: a bare pickle whose loading would run code."""
    import pickle

    target = ws.root / "best.pt"
    marker = ws.root / MARKER
    target.write_bytes(pickle.dumps(_RunsCode(marker)))
    scenario = predict_scenario(ws, target, target)

    def check_marker(out: Path) -> None:
        assert not marker.exists(), "the checkpoint's code ran"

    scenario.after = check_marker
    return scenario


def predict_truncated_input(ws: Workspace) -> Scenario:
    src = ws.copy("lgg")
    target = lgg_slice(src, 1, 2)
    target.write_bytes(target.read_bytes()[:60])
    return predict_scenario(ws, ws.templates["checkpoint"], target, "cannot read image", inputs=(target.parent,))


def predict_wrong_channels(ws: Workspace) -> Scenario:
    """A 4-channel BraTS case for a 3-channel LGG model."""
    case = sorted(p for p in ws.templates["brats"].iterdir() if p.is_dir())[0]
    return predict_scenario(ws, ws.templates["checkpoint"], case, "needs modalities", inputs=(case,))


# ----------------------------------------------------------------------------- train: caches, splits, runs

TRAIN_OPTIONS = ["--epochs", "1", "--steps-per-epoch", "1", "--model-options", "features=4", "--batch-size", "2",
                 "--device", "cpu"]


def train_scenario(ws: Workspace, cache: Path, target: Path, *problem: str, extra: tuple[str, ...] = ()) -> Scenario:
    return Scenario(["train", str(cache), "--out", str(ws.out), *TRAIN_OPTIONS, *extra], ws.out,
                    (target.name, *problem))


def cache_unfinished(ws: Workspace) -> Scenario:
    cache = ws.copy("cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return train_scenario(ws, cache, cache / "manifest.json", "unfinished")


def cache_manifest_not_json(ws: Workspace) -> Scenario:
    cache = ws.copy("cache")
    (cache / "manifest.json").write_text('{"format": "mriseg-cache", "cases": {')
    return train_scenario(ws, cache, cache / "manifest.json", "cannot read")


def cache_array_truncated(ws: Workspace) -> Scenario:
    cache = ws.copy("cache")
    target = sorted((cache / "cases").iterdir())[0] / "image.npy"
    target.write_bytes(target.read_bytes()[:200])
    return train_scenario(ws, cache, target, "cannot load")


def cache_label_missing(ws: Workspace) -> Scenario:
    cache = ws.copy("cache")
    folder = sorted((cache / "cases").iterdir())[1]
    (folder / "label.npy").unlink()
    return train_scenario(ws, cache, folder, "missing")


def split_not_json(ws: Workspace) -> Scenario:
    split = ws.root / "split.json"
    split.write_text("train: [a, b]\n")
    return train_scenario(ws, ws.templates["cache"], split, "split", extra=("--split", str(split)))


def split_unknown_cases(ws: Workspace) -> Scenario:
    split = ws.root / "split.json"
    split.write_text(json.dumps({"train": ["TCGA_SY_0001_19990101"], "val": ["TCGA_XX_9999"]}))
    return train_scenario(ws, ws.templates["cache"], split, "TCGA_XX_9999", extra=("--split", str(split)))


def resume_scenario(ws: Workspace, target: Path, *problem: str) -> Scenario:
    return Scenario(["train", "--resume", "--out", str(ws.out)], ws.out, (target.name, *problem))


def make_run_folder(ws: Workspace) -> Path:
    """A run folder as training leaves it: config.json and last.pt (the unet template as its weights)."""
    ws.out.mkdir()
    options = {"model": "unet", "model_options": {"features": 4}, "epochs": 2, "steps_per_epoch": 1,
               "batch_size": 2, "device": "cpu"}
    (ws.out / "config.json").write_text(json.dumps({"data": str(ws.templates["cache"]), "options": options}))
    shutil.copy(ws.templates["checkpoint"], ws.out / "last.pt")
    return ws.out


def resume_truncated_checkpoint(ws: Workspace) -> Scenario:
    run = make_run_folder(ws)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    return resume_scenario(ws, run / "last.pt", "truncated or corrupt")


def resume_config_not_json(ws: Workspace) -> Scenario:
    run = make_run_folder(ws)
    (run / "config.json").write_text("{'options': ")
    return resume_scenario(ws, run / "config.json", "config.json")


def resume_config_missing(ws: Workspace) -> Scenario:
    run = make_run_folder(ws)
    (run / "config.json").unlink()
    return resume_scenario(ws, run / "config.json", "config.json")


def train_volume_smaller_than_patch(ws: Workspace) -> Scenario:
    """BraTS volumes of 12x12x8 with a 16x16x16 patch: padded, as documented."""
    def check(out: Path) -> None:
        from mriseg.checkpoint import load_checkpoint

        assert load_checkpoint(out / "best.pt")["model"]["spatial_dims"] == 3

    return Scenario(["train", str(ws.templates["cache-brats"]), "--out", str(ws.out), "--dims", "3", "--model",
                     "unet3d", "--model-options", "features=4", "--patch-size", "16,16,16", "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch-size", "1", "--device", "cpu"], ws.out, exit_code=0, check=check)


# ----------------------------------------------------------------------------- the corpus

CORPUS: list[BadInput] = [
    BadInput("nifti-zero-byte", "preprocess", "zero-byte .nii.gz modality", "refused", nifti_zero_byte),
    BadInput("nifti-truncated-header", "preprocess", "NIfTI header cut at 120 of 348 bytes", "refused",
             nifti_truncated_header),
    BadInput("nifti-truncated-data", "preprocess", "NIfTI voxel data cut in half (valid gzip)", "refused",
             nifti_truncated_data),
    BadInput("nifti-gzip-cut", "preprocess", "gzip stream cut at 2/3", "refused", nifti_gzip_stream_cut),
    BadInput("nifti-wrong-magic", "preprocess", "NIfTI magic 'n+1' replaced", "refused", nifti_wrong_magic),
    BadInput("gzip-not-nifti", "preprocess", "valid gzip of text named .nii.gz", "refused", gzip_not_nifti),
    BadInput("nifti-not-gzip", "preprocess", "HTML page named .nii.gz", "refused", nifti_not_gzip),
    BadInput("nifti-zero-pixdim", "preprocess", "pixdim[1] = 0, no qform/sform", "refused", nifti_zero_pixdim),
    BadInput("nifti-nan-pixdim", "preprocess", "pixdim[2] = NaN, no qform/sform", "refused", nifti_nan_pixdim),
    BadInput("nifti-negative-pixdim", "preprocess", "pixdim[1] < 0 in every file", "accepted: absolute value",
             nifti_negative_pixdim),
    BadInput("nifti-5d", "preprocess", "5D modality (X, Y, Z, 1, 2)", "refused", nifti_5d),
    BadInput("nifti-4d-in-brats", "preprocess", "4D modality in a BraTS case", "refused", nifti_4d_in_brats),
    BadInput("label-shape-mismatch", "preprocess", "label 12x12x7, image 12x12x8", "refused", label_shape_mismatch),
    BadInput("modality-affine-mismatch", "preprocess", "one modality shifted 20 mm", "refused",
             modality_affine_mismatch),
    BadInput("label-affine-mismatch", "preprocess", "label flipped left-right in its affine", "refused",
             label_affine_mismatch),
    BadInput("label-nan", "preprocess", "NaN voxel in a float label", "refused", label_nan),
    BadInput("image-inf", "preprocess", "Inf voxel in an image", "refused", image_inf),
    BadInput("label-negative", "preprocess", "label value -1", "refused", label_negative),
    BadInput("label-above-255", "preprocess", "label value 300", "refused", label_above_255),
    BadInput("nifti-mask-0-255", "preprocess", "NIfTI labels 0/255", "accepted: normalised to 0/1",
             nifti_mask_0_255),
    BadInput("all-zero-volume", "preprocess", "an all-zero modality", "accepted: zeros, no NaN", all_zero_volume),
    BadInput("single-slice", "preprocess", "volumes of one slice (12x12x1)", "accepted", single_slice_volume),
    BadInput("missing-modality", "preprocess", "a case without its t1 file", "refused", brats_missing_modality),
    BadInput("symlink-loop-file", "preprocess", "modality file is a symlink to itself", "refused",
             symlink_loop_file),
    BadInput("symlink-loop-dataset", "preprocess", "dataset path is a symlink to itself", "refused",
             symlink_loop_dataset),
    BadInput("symlink-cycle-folder", "preprocess", "case folder holds a symlink to its parent",
             "accepted: not followed", symlink_cycle_folder),
    BadInput("unreadable-file", "preprocess", "modality file chmod 000", "refused", unreadable_file),
    BadInput("unreadable-folder", "preprocess", "case folder chmod 000", "refused", unreadable_folder),
    BadInput("dataset-json-not-json", "preprocess", "dataset.json is not JSON", "refused", dataset_json_not_json),
    BadInput("dataset-json-list", "preprocess", "dataset.json is a JSON list", "refused", dataset_json_wrong_type),
    BadInput("dataset-json-outside", "preprocess", "dataset.json 'training' points outside the folder",
             "accepted: the list is not used", dataset_json_points_outside),
    BadInput("msd-label-not-in-json", "preprocess", "label 7 not among dataset.json labels", "refused",
             msd_label_outside_dataset_json),
    BadInput("msd-empty-images", "preprocess", "empty imagesTr/", "refused", msd_empty_images),
    BadInput("msd-duplicate-case", "preprocess", "BRATS_001.nii and BRATS_001.nii.gz", "refused",
             msd_duplicate_case),
    BadInput("lgg-zero-byte-tif", "preprocess", "zero-byte slice TIF", "refused", lgg_zero_byte_tif),
    BadInput("lgg-wrong-magic-tif", "preprocess", "mask TIF starting with a PNG signature", "refused",
             lgg_wrong_magic_tif),
    BadInput("lgg-slice-without-mask", "preprocess", "a slice whose mask is missing", "refused",
             lgg_slice_without_mask),
    BadInput("lgg-stack-in-slice", "preprocess", "a 5D stack saved as one slice", "refused", lgg_stack_in_slice),
    BadInput("lgg-slice-shapes-differ", "preprocess", "one slice 16x20 among 16x16", "refused",
             lgg_slice_shapes_differ),
    BadInput("lgg-mask-0-1", "preprocess", "LGG masks 0/1 instead of 0/255", "accepted", lgg_mask_0_1),
    BadInput("non-utf8-name", "preprocess", "patient folder name not UTF-8", "accepted", lgg_non_utf8_name),
    BadInput("non-utf8-bad-file", "preprocess", "broken TIF in a non-UTF-8 folder", "refused", non_utf8_bad_file),
    BadInput("png-zero-byte", "preprocess", "zero-byte PNG image", "refused", pairs_zero_byte_png),
    BadInput("png-truncated", "preprocess", "PNG mask cut in half", "refused", pairs_truncated_png),
    BadInput("png-is-jpeg", "preprocess", "JPEG bytes named .png", "refused", pairs_jpeg_named_png),
    BadInput("png-mask-shape-mismatch", "preprocess", "mask 10x24, image 20x24", "refused",
             pairs_mask_shape_mismatch),
    BadInput("png-colour-mask", "preprocess", "RGB mask with differing channels", "refused", pairs_colour_mask),
    BadInput("png-mask-0-255", "preprocess", "PNG masks 0/255", "accepted: normalised to 0/1", pairs_mask_0_255),
    BadInput("pairs-duplicate-ids", "preprocess", "shape0.png and shape0.tif", "refused", pairs_duplicate_ids),
    BadInput("empty-folder", "preprocess", "empty dataset folder", "refused", empty_dataset_folder),
    BadInput("dicom-folder", "preprocess", "a DICOM series (no suffix, DICM preamble)", "refused",
             dicom_series_folder),
    BadInput("empty-case-folders", "preprocess", "case folders without files", "refused", empty_case_folders),
    BadInput("source-is-file", "preprocess", "a NIfTI file given as dataset", "refused", source_is_a_file),
    BadInput("output-is-file", "preprocess", "cache path is an existing file", "refused", output_is_a_file),
    BadInput("output-not-cache", "preprocess", "cache folder holds other files", "refused",
             output_holds_other_files),
    BadInput("output-manifest-corrupt", "preprocess", "cache manifest.json cut short", "refused",
             output_manifest_corrupt),
    BadInput("eval-truncated", "evaluate", "prediction .nii.gz cut at 90 bytes", "refused",
             eval_truncated_prediction),
    BadInput("eval-probabilities", "evaluate", "prediction holds 0.7 everywhere", "refused", eval_probabilities),
    BadInput("eval-nan", "evaluate", "prediction holds NaN", "refused", eval_nan),
    BadInput("eval-shape-mismatch", "evaluate", "prediction 12x12x9, truth 12x12x8", "refused",
             eval_shape_mismatch),
    BadInput("eval-affine-mismatch", "evaluate", "prediction affine flipped", "refused", eval_affine_mismatch),
    BadInput("eval-empty-folder", "evaluate", "empty prediction folder", "refused", eval_empty_prediction_folder),
    BadInput("eval-duplicate-ids", "evaluate", "case.nii and case.nii.gz", "refused", eval_duplicate_ids),
    BadInput("eval-output-is-file", "evaluate", "--out is an existing file", "refused", eval_output_is_a_file),
    BadInput("checkpoint-truncated", "predict", "checkpoint cut in half", "refused", checkpoint_truncated),
    BadInput("checkpoint-text-file", "predict", "a text file given as --model", "refused", checkpoint_is_a_text_file),
    BadInput("checkpoint-zero-byte", "predict", "zero-byte checkpoint", "refused", checkpoint_zero_byte),
    BadInput("checkpoint-other-model", "predict", "tiny3d weights in a unet checkpoint", "refused",
             checkpoint_of_another_model),
    BadInput("checkpoint-unknown-model", "predict", "model name not in the registry", "refused",
             checkpoint_unknown_model),
    BadInput("checkpoint-other-tool", "predict", "a torch.save dict from another tool", "refused",
             checkpoint_from_another_tool),
    BadInput("checkpoint-future-version", "predict", "format_version 99", "refused", checkpoint_future_version),
    BadInput("checkpoint-executes-code", "predict", "torch.save file whose unpickling runs os.system",
             "refused, the code never runs", checkpoint_executing_pickle),
    BadInput("checkpoint-bare-pickle", "predict", "a bare pickle that runs os.system", "refused, the code never runs",
             checkpoint_plain_pickle),
    BadInput("predict-truncated-input", "predict", "a truncated slice TIF as input", "refused",
             predict_truncated_input),
    BadInput("predict-wrong-channels", "predict", "4-channel BraTS case for a 3-channel model", "refused",
             predict_wrong_channels),
    BadInput("cache-unfinished", "train", "cache manifest says complete: false", "refused", cache_unfinished),
    BadInput("cache-manifest-not-json", "train", "cache manifest.json cut short", "refused", cache_manifest_not_json),
    BadInput("cache-array-truncated", "train", "a cached image.npy cut at 200 bytes", "refused",
             cache_array_truncated),
    BadInput("cache-label-missing", "train", "a cached label.npy deleted", "refused", cache_label_missing),
    BadInput("split-not-json", "train", "--split file is not JSON", "refused", split_not_json),
    BadInput("split-unknown-cases", "train", "--split names a case not in the cache", "refused", split_unknown_cases),
    BadInput("resume-truncated-checkpoint", "train", "--resume with last.pt cut to a third", "refused",
             resume_truncated_checkpoint),
    BadInput("resume-config-not-json", "train", "--resume with config.json not JSON", "refused",
             resume_config_not_json),
    BadInput("resume-config-missing", "train", "--resume with config.json deleted", "refused",
             resume_config_missing),
    BadInput("train-volume-smaller-than-patch", "train", "3D patch 16x16x16 on 12x12x8 volumes",
             "accepted: padded", train_volume_smaller_than_patch),
    BadInput("eval-mask-0-255", "evaluate", "prediction masks 0/255, truth 0/1", "accepted: any non-zero is tumour",
             eval_mask_0_255),
]
