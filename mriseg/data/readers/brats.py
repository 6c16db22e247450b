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
def name_matches(stem: str, name: str, exact: bool) -> bool:
    """Whether a file stem is the one ``name`` stands for (both lower-case).

    BraTS's own suffixes (``exact=False``) match the end of the stem. A ``--modalities`` name
    (``exact=True``) matches the whole stem, its end after ``_`` or ``-`` (``flair`` for
    ``pat1_flair``), or, when the name itself begins or ends with ``_``/``-``, the stem's end or
    start (``_flair``, ``Flair_`` for ``Flair_subtrMeanDivStd``).
    """
    if not exact:
        return stem.endswith(name)
    return (stem == name or stem.endswith(("_" + name, "-" + name))
            or (name.endswith(("_", "-")) and stem.startswith(name))
            or (name.startswith(("_", "-")) and stem.endswith(name)))


def match_modalities(folder: Path, suffixes: dict[str, str], exact: bool) -> dict[str, Path]:
    """Map each key to the one file of ``folder`` its name matches (:func:`name_matches`)."""
    found: dict[str, Path] = {}
    for file in nifti_files(folder):
        stem = strip_suffix(file.name)[0].lower()
        for key, suffix in suffixes.items():
            if name_matches(stem, suffix.lower(), exact):
                if key in found:
                    raise BadInputError(folder, f"{found[key].name} and {file.name} both match modality "
                                                f"{key!r} ({suffix!r}); rename one or pass --modalities "
                                                f"with a file name that matches one file")
                found[key] = file
    return found


def brats_ref(folder: Path, modalities: dict[str, str] | None) -> CaseRef:
    if modalities is not None:
        found = match_modalities(folder, modalities, exact=True)
        # the 2023 sequence names (t1n, t1c, t2w, t2f) say which label convention the files follow
        naming = "brats2023" if {k for k in modalities if k not in LABEL_KEYS} <= set(BRATS_NAMINGS["brats2023"]) \
            else "custom"
        wanted = modalities
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
        files = ", ".join(f.name for f in nifti_files(folder)[:6])
        key, name = missing[0], wanted[missing[0]]
        rule = (f"no file matches {key}={name}: the whole name, its end after _ or -, or a prefix ending in _"
                if modalities is not None else f"a NIfTI named like *{name}.nii.gz")
        raise BadInputError(folder, f"missing modality {key} ({rule}); files here: {files}")
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
