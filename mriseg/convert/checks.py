"""nnU-Net v2's rules for a raw dataset (its ``verify_dataset_integrity``), written down here so a
converted dataset is checked without nnU-Net installed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from mriseg.errors import BadInputError

DATASET_NAME = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>[A-Za-z0-9_\-]+)$")


def _cases(folder: Path, ending: str) -> dict[str, list[Path]]:
    cases: dict[str, list[Path]] = {}
    for file in sorted(folder.glob(f"*{ending}")):
        match = re.fullmatch(rf"(.+)_(\d{{4}}){re.escape(ending)}", file.name)
        if not match:
            raise BadInputError(file, "is not named CASE_XXXX" + ending)
        cases.setdefault(match[1], []).append(file)
    return cases


def check_nnunet_dataset(root: Path) -> dict:
    """Check ``root`` against nnU-Net v2's rules; return its dataset.json. Raises BadInputError
    naming the first file that breaks one: folder name, dataset.json keys, numTraining, every
    case having every channel and a label, consecutive label values declared in dataset.json,
    and images and labels sharing shape and affine."""
    if not DATASET_NAME.match(root.name):
        raise BadInputError(root, "an nnU-Net dataset folder is named DatasetNNN_NAME")
    meta = json.loads((root / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in meta:
            raise BadInputError(root / "dataset.json", f"has no {key!r}")
    labels = meta["labels"]
    if labels.get("background") != 0:
        raise BadInputError(root / "dataset.json", "labels must map 'background' to 0")
    declared = sorted(int(v) for v in labels.values())
    if declared != list(range(len(declared))):
        raise BadInputError(root / "dataset.json", f"label values {declared} are not consecutive from 0")
    ending, channels = meta["file_ending"], len(meta["channel_names"])
    training = _cases(root / "imagesTr", ending)
    if len(training) != meta["numTraining"]:
        raise BadInputError(root / "dataset.json", f"numTraining {meta['numTraining']} but imagesTr holds "
                                                   f"{len(training)} cases")
    for case_id, files in training.items():
        if [f.name for f in files] != [f"{case_id}_{c:04d}{ending}" for c in range(channels)]:
            raise BadInputError(root / "imagesTr", f"case {case_id} has files {[f.name for f in files]}, "
                                                   f"expected {channels} channels")
        label_path = root / "labelsTr" / f"{case_id}{ending}"
        if not label_path.is_file():
            raise BadInputError(label_path, "missing: every training case needs a label")
        label = nib.load(label_path)
        values = set(np.unique(np.asarray(label.dataobj)).astype(int).tolist())
        if not values <= set(declared):
            raise BadInputError(label_path, f"holds label values {sorted(values - set(declared))} that "
                                            "dataset.json does not declare")
        for file in files:
            image = nib.load(file)
            if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=1e-4):
                raise BadInputError(file, f"shape {image.shape} / affine differs from its label {label_path.name}")
    return meta
