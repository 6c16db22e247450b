"""MSD / nnU-Net raw: ``imagesTr/`` + ``labelsTr/``, 4D or ``_0000`` channel files, ``dataset.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from mriseg.data.readers.common import CaseRef, NIFTI_SUFFIXES, strip_suffix
from mriseg.data.readers.detect import NNUNET_CHANNEL, is_channel_folder, nifti_files
from mriseg.errors import BadInputError
from mriseg.labels import painted_values


@dataclass(frozen=True)
class DatasetJson:
    """What mriseg takes from an MSD / nnU-Net v2 dataset.json."""

    channel_names: tuple[str, ...] = ()
    label_names: tuple[tuple[int, str], ...] = ()                 # single-valued labels
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()         # nnU-Net region lists, e.g. WT [1, 2, 3]
    regions_class_order: tuple[int, ...] = ()
    ignore_label: int | None = None                               # nnU-Net's "ignore" label
    file_ending: str = ".nii.gz"

    def label_values(self) -> set[int]:
        return {v for v, _ in self.label_names} | {v for _, vs in self.regions for v in vs} \
            | ({self.ignore_label} if self.ignore_label is not None else set())


SUPPORTED_ENDINGS = (".nii.gz", ".nii")


def read_dataset_json(root: Path) -> DatasetJson:
    path = root / "dataset.json"
    if not path.is_file():
        return DatasetJson()
    try:
        meta = json.loads(path.read_text())
        channels = meta.get("channel_names") or meta.get("modality") or {}
        channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
        labels = meta.get("labels") or {}
        regions, ignore = [], None
        if labels and all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background"}
            label_names = {int(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0, "whole tumour": [1, 2, 3], "enhancing": 3, "ignore": 4}
            label_names = {}
            region_based = "regions_class_order" in meta or any(isinstance(v, list) for v in labels.values())
            for name, value in labels.items():
                if str(name).lower() == "ignore":
                    ignore = int(value)
                elif region_based and value != 0:  # every foreground entry is a region, a lone value too
                    values = value if isinstance(value, list) else [value]
                    regions.append((str(name), tuple(int(v) for v in values)))
                else:
                    label_names[int(value)] = str(name)
        order = tuple(int(v) for v in meta.get("regions_class_order") or ())
        ending = str(meta.get("file_ending") or ".nii.gz")
    except (ValueError, TypeError, AttributeError) as error:
        raise BadInputError(path, f"not a valid MSD/nnU-Net dataset.json ({error})") from error
    if ending not in SUPPORTED_ENDINGS:
        raise BadInputError(path, f"file_ending {ending!r}: mriseg reads {', '.join(SUPPORTED_ENDINGS)} datasets; "
                                  "convert the images to NIfTI first (e.g. with SimpleITK or c3d)")
    if regions and order and len(order) != len(regions):
        raise BadInputError(path, f"regions_class_order has {len(order)} values for {len(regions)} regions")
    if regions and order:
        painted = painted_values([vs for _, vs in regions])
        if tuple(painted) != order:
            raise BadInputError(path, f"regions_class_order {list(order)} differs from the order mriseg paints "
                                      f"nested regions back to labels ({painted}, largest region first)")
    return DatasetJson(channel_names, tuple(sorted(label_names.items())), tuple(regions), order, ignore, ending)


def list_msd(root: Path) -> list[CaseRef]:
    """The training cases of an MSD / nnU-Net raw dataset: ``imagesTr/`` with ``labelsTr/``."""
    if not (root / "imagesTr").is_dir():
        raise BadInputError(root, "not an MSD / nnU-Net dataset: it has no imagesTr/ folder (is --layout right?)")
    return channel_cases(root / "imagesTr", root / "labelsTr", root)


def list_image_folder(folder: Path) -> list[CaseRef]:
    """A folder of nnU-Net channel files (``imagesTs/``, or any folder of ``CASE_0000.nii.gz``...),
    one case per CASE; channel names from the dataset.json beside or above it, labels from a
    sibling ``labelsTs``/``labelsTr`` when present."""
    root = folder if (folder / "dataset.json").is_file() else folder.parent
    labels = folder.parent / folder.name.replace("images", "labels") if folder.name.startswith("images") else None
    return channel_cases(folder, labels, root)


def channel_group(file: Path) -> CaseRef | None:
    """The whole case a single ``CASE_0000.nii.gz`` belongs to (its sibling channel files), or None
    when the name is not an nnU-Net channel file."""
    match = NNUNET_CHANNEL.match(strip_suffix(file.name)[0])
    if not match or not is_channel_folder(file.parent):
        return None
    return next((ref for ref in list_image_folder(file.parent) if ref.case_id == match["case"]), None)


def channel_cases(images_dir: Path, labels_dir: Path | None, root: Path) -> list[CaseRef]:
    """One case per CASE of ``images_dir`` (4D files or ``_0000``-style channels), checked for gaps."""
    meta = read_dataset_json(root)
    channel_names = meta.channel_names
    groups: dict[str, dict[int, Path]] = {}
    for file in nifti_files(images_dir):
        stem = strip_suffix(file.name)[0]
        match = NNUNET_CHANNEL.match(stem)
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, -1)
        if channel in groups.get(case_id, {}):
            raise BadInputError(file, f"case {case_id} is also given by {groups[case_id][channel].name}")
        groups.setdefault(case_id, {})[channel] = file
    refs = []
    for case_id, channels in sorted(groups.items()):
        if -1 in channels and len(channels) > 1:
            raise BadInputError(channels[-1], "mixes a 4D image with _0000-style channel files of the same case")
        order = sorted(channels)
        if order != [-1] and order != list(range(len(order))):
            raise BadInputError(images_dir, f"case {case_id} has channel files {order}, expected 0..{len(order) - 1}")
        if channel_names and order != [-1] and len(order) != len(channel_names):
            raise BadInputError(channels[order[0]], f"case {case_id} has {len(order)} channel file(s); "
                                                     f"dataset.json names {len(channel_names)} channels")
        label = [p for p in (labels_dir / f"{case_id}{s}" for s in NIFTI_SUFFIXES) if p.is_file()] \
            if labels_dir is not None else []
        names = tuple(channel_names) if channel_names else ()
        refs.append(CaseRef(case_id=case_id, layout="msd", image_paths=tuple(channels[c] for c in order),
                            label_paths=tuple(label[:1]), modalities=names, label_names=meta.label_names,
                            label_regions=meta.regions, ignore_label=meta.ignore_label,
                            allowed_labels=tuple(sorted(meta.label_values()))))
    return refs
