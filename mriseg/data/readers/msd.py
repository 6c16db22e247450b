"""MSD / nnU-Net raw: ``imagesTr/`` + ``labelsTr/``, 4D or ``_0000`` channel files, ``dataset.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path


from mriseg.data.readers.common import CaseRef, NIFTI_SUFFIXES, strip_suffix
from mriseg.data.readers.detect import nifti_files
from mriseg.errors import BadInputError


NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
def read_dataset_json(root: Path) -> tuple[list[str] | None, dict[int, str]]:
    path = root / "dataset.json"
    if not path.is_file():
        return None, {}
    try:
        meta = json.loads(path.read_text())
        channels = meta.get("channel_names") or meta.get("modality") or {}
        channel_names = [str(channels[k]) for k in sorted(channels, key=int)] or None
        labels = meta.get("labels") or {}
        if labels and all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background"}
            label_names = {int(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0}; region lists are not single values
            label_names = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    except (ValueError, TypeError, AttributeError) as error:
        raise BadInputError(path, f"not a valid MSD/nnU-Net dataset.json ({error})") from error
    return channel_names, label_names


def list_msd(root: Path) -> list[CaseRef]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    channel_names, label_names = read_dataset_json(root)
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
        label = [p for p in (labels_dir / f"{case_id}{s}" for s in NIFTI_SUFFIXES) if p.is_file()]
        names = tuple(channel_names) if channel_names and (order == [-1] or len(channel_names) == len(order)) else ()
        refs.append(CaseRef(case_id=case_id, layout="msd", image_paths=tuple(channels[c] for c in order),
                            label_paths=tuple(label[:1]), modalities=names,
                            label_names=tuple(sorted(label_names.items()))))
    return refs
