"""BraTS: one folder per case, one NIfTI per modality, found by suffix or a ``--modalities`` map."""

from __future__ import annotations

from pathlib import Path


from mriseg.data.readers.common import CaseRef, LABEL_KEYS, strip_suffix, visible_dirs
from mriseg.data.readers.detect import nifti_files
from mriseg.errors import BadInputError


# BraTS file-name suffixes: {modality: suffix}; the label key is "seg".
BRATS_NAMINGS = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1n": "-t1n", "t1c": "-t1c", "t2w": "-t2w", "t2f": "-t2f", "seg": "-seg"},
}
def match_modalities(folder: Path, suffixes: dict[str, str], exact: bool) -> dict[str, Path]:
    """Map each key to the file whose stem ends with (or, if ``exact``, equals) its suffix."""
    found: dict[str, Path] = {}
    for file in nifti_files(folder):
        stem = strip_suffix(file.name)[0].lower()
        for key, suffix in suffixes.items():
            suffix = suffix.lower()
            if stem == suffix or (not exact and stem.endswith(suffix)) or (
                    exact and (stem.endswith("_" + suffix) or stem.endswith("-" + suffix))):
                if key in found:
                    raise BadInputError(folder, f"{found[key].name} and {file.name} both match modality "
                                                f"{key!r} ({suffix!r}); rename one or pass --modalities "
                                                f"with a file name that matches one file")
                found[key] = file
    return found


def brats_ref(folder: Path, modalities: dict[str, str] | None) -> CaseRef:
    if modalities is not None:
        found = match_modalities(folder, modalities, exact=True)
        naming, wanted = "custom", modalities
    else:
        best = max(BRATS_NAMINGS, key=lambda n: len(match_modalities(folder, BRATS_NAMINGS[n], exact=False)))
        naming, wanted = best, BRATS_NAMINGS[best]
        found = match_modalities(folder, wanted, exact=False)
        if not any(k not in LABEL_KEYS for k in found):
            raise BadInputError(folder, "no BraTS modality files recognised (names like *_flair.nii.gz or "
                                        "*-t2f.nii.gz); pass --modalities NAME=FILENAME,...")
    image_keys = [k for k in wanted if k not in LABEL_KEYS]
    missing = [k for k in image_keys if k not in found]
    if missing:
        raise BadInputError(folder, f"missing modality {missing[0]} (a NIfTI named like *{wanted[missing[0]]}.nii.gz)")
    label_key = next((k for k in wanted if k in LABEL_KEYS), None)
    label = (found[label_key],) if label_key and label_key in found else ()
    return CaseRef(case_id=folder.name, layout="brats", image_paths=tuple(found[k] for k in image_keys),
                   label_paths=label, modalities=tuple(image_keys), naming=naming)


def list_brats(root: Path, modalities: dict[str, str] | None) -> list[CaseRef]:
    folders = [d for d in visible_dirs(root) if nifti_files(d)]
    if not folders and nifti_files(root):
        folders = [root]  # a single case folder
    refs = [brats_ref(folder, modalities) for folder in folders]
    if len({r.modalities for r in refs}) > 1:
        first, other = refs[0], next(r for r in refs if r.modalities != refs[0].modalities)
        raise BadInputError(other.image_paths[0].parent,
                            f"modalities {list(other.modalities)} differ from {list(first.modalities)} "
                            f"of {first.case_id}")
    return refs
