"""The ``.npy`` training cache: writing it (``mriseg preprocess``) and opening it (train, evaluate).

Folder contract (docs/architecture.md)::

    CACHE/manifest.json
    CACHE/cases/<case_id>/image.npy   (C, *spatial) float16|float32
    CACHE/cases/<case_id>/label.npy   (*spatial) uint8, absent when the case has no label

Each case is written into a temporary folder and renamed into place, and the manifest is
rewritten (also by rename) after every case, so an interrupted run leaves only complete cases
behind and a re-run finishes the job. A case is skipped on a re-run when its record says it
was made from source files of the same size and mtime with the same parameters.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mriseg import __version__, log
from mriseg.options import number
from mriseg.data.preprocess import PreprocessParams, preprocess_case
from mriseg.data.readers import CaseRef, label_names_for, label_scheme, list_cases, read_case
from mriseg.files import folder_in_place, refuse_output_over_inputs, remove_stale_folders, write_json_atomic
from mriseg.errors import BadInputError, MrisegError

FORMAT = "mriseg-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def source_signature(ref: CaseRef) -> list[dict[str, Any]]:
    """Path, size and mtime of every source file: what decides whether a case is unchanged."""
    files = []
    for path in ref.source_paths:
        try:
            stat = path.stat()
        except OSError as error:
            raise BadInputError(path, f"cannot stat ({error.strerror})") from error
        files.append({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return files


def process_one(ref: CaseRef, params_dict: dict, cases_dir: str, require_label: bool) -> dict:
    """Read, preprocess and write one case (runs in a worker process). Returns its record."""
    params = PreprocessParams.from_dict(params_dict)
    signature = source_signature(ref)
    case = read_case(ref)
    if require_label and case.label is None:
        raise BadInputError(ref.image_paths[0].parent if ref.layout != "pairs" else ref.image_paths[0],
                            f"case {ref.case_id} has no label, and labels are required "
                            + ("(--modalities names no label file, e.g. seg=FILENAME, or its name matched no file; "
                               if ref.naming == "custom" else "(")
                            + "pass --allow-unlabelled to cache images only)")
    image, label, record = preprocess_case(case, params)
    final = Path(cases_dir) / ref.case_id
    try:
        with folder_in_place(final) as temporary:
            np.save(temporary / "image.npy", image)
            if label is not None:
                np.save(temporary / "label.npy", label)
    except BadInputError as error:  # disk full, read-only or vanished folder: stop the run, not just this case
        raise MrisegError(f"{final}: cannot write the cached case ({error.problem.removeprefix('cannot write: ')})") \
            from error
    record["sources"] = signature
    record["source_paths"] = [str(p) for p in case.source_paths]
    return record


@dataclass
class PreprocessSummary:
    """What one ``mriseg preprocess`` run did (printed, or as JSON with ``--json``)."""

    cache: str
    layout: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"cache": self.cache, "layout": self.layout, "cases": self.total - len(self.bad), "found": self.total,
                "written": len(self.written),
                "skipped_unchanged": len(self.skipped), "removed": self.removed, "bad": self.bad}


def _label_info(records: list[dict], refs: dict[str, CaseRef]) -> dict[str, Any]:
    values = sorted({v for r in records for v in r["label_values"]})
    original = sorted({v for r in records for v in r["label_values_original"]})
    naming = next((r.get("header", {}).get("naming", "") for r in records), "")
    scheme_original = label_scheme(original, naming) if original else "none"
    known = {}
    for ref in refs.values():
        known.update(dict(ref.label_names))
    names_scheme = label_scheme(values, naming) if values else "none"
    info = {"values": values, "scheme": names_scheme, "values_original": original,
            "scheme_original": scheme_original,
            "names": {str(k): v for k, v in label_names_for(values, names_scheme, known or None).items()}}
    declared = next((ref for ref in refs.values() if ref.label_regions or ref.ignore_label is not None), None)
    if declared is not None:  # nnU-Net's dataset.json: its regions and its ignore label
        info["regions"] = {name: list(labels) for name, labels in declared.label_regions}
        info["ignore"] = declared.ignore_label
    return info


def build_cache(source: str | Path, out: str | Path, params: PreprocessParams, layout: str | None = None,
                modalities: str | dict[str, str] | None = None, workers: int = 1, force: bool = False,
                skip_bad: bool = False, require_labels: bool = True) -> PreprocessSummary:
    """Preprocess every case under ``source`` into the cache folder ``out`` (``mriseg preprocess``).

    Raises:
        MrisegError: ``out`` holds a cache made with other parameters (unless ``force``) or
            something that is not a cache; BadInputError for the first bad case unless ``skip_bad``.
    """
    number("workers", workers, integer=True, low=1, high=256)
    source, out = Path(source), Path(out)
    refuse_output_over_inputs(out, [source], option="the cache folder")
    refs = list_cases(source, layout=layout, modalities=modalities)
    layout = refs[0].layout
    previous = _previous_manifest(out, params, layout, force)
    cases_dir = _prepare_cases_folder(out)
    summary = PreprocessSummary(cache=str(out), layout=layout, total=len(refs))
    records, todo = _reuse_unchanged(refs, previous, cases_dir, summary, force)

    def save_manifest(complete: bool) -> None:
        ordered = {r.case_id: records[r.case_id] for r in refs if r.case_id in records}
        first = next(iter(ordered.values()), {})
        write_json_atomic(out / MANIFEST, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "mriseg_version": __version__,
            "complete": complete, "source": str(source.resolve()), "layout": layout,
            "params": params.to_dict(), "modalities": first.get("modalities", list(refs[0].modalities)),
            "label_info": _label_info(list(ordered.values()), {r.case_id: r for r in refs}),
            "bad_cases": summary.bad, "cases": ordered,
        })

    save_manifest(complete=not todo)
    for ref, record, error in _run(todo, params, cases_dir, require_labels, workers):
        if error is not None:
            if not skip_bad:
                save_manifest(complete=False)
                raise error
            log.warn(str(error))
            summary.bad.append({"case": ref.case_id, "error": str(error)})
            continue
        records[ref.case_id] = record
        summary.written.append(ref.case_id)
        save_manifest(complete=False)
    if not records:
        raise MrisegError(f"{source}: no case could be preprocessed ({len(summary.bad)} bad)")
    _check_consistent(records, refs)
    found = {v for record in records.values() for v in record["label_values_original"]}
    unused = sorted(set(params.label_map) - found)
    if unused and found:
        log.warn(f"--label-map: label value(s) {unused} occur in no case (the labels found are {sorted(found)}); "
                 "that part of the map does nothing")
    if len({tuple(r["shape"]) for r in records.values()}) > 1 and params.size is None:
        log.warn("the cases have different shapes; models trained on whole images in batches need one size (--size)")
    save_manifest(complete=True)
    if summary.bad:
        log.warn(f"skipped {len(summary.bad)} bad case(s): " + ", ".join(b["case"] for b in summary.bad))
    return summary


def _previous_manifest(out: Path, params: PreprocessParams, layout: str, force: bool) -> dict[str, Any] | None:
    """The manifest of an earlier run into ``out`` with the same parameters (None: start afresh)."""
    if (out / MANIFEST).exists():
        if force:  # a rebuild redoes every case, also one whose files were damaged after it was written
            return None
        previous = _load_manifest(out)
        if previous["params"] == params.to_dict() and previous.get("layout") == layout:
            return previous
        if not force:
            raise MrisegError(f"{out}: holds a cache made with other parameters "
                              f"({json.dumps(previous['params'])}, layout {previous.get('layout')}); "
                              "pass --force to rebuild it")
        return None
    if out.exists() and not out.is_dir():
        raise BadInputError(out, "exists and is not a folder; choose a new folder for the cache")
    if out.exists() and any(out.iterdir()):
        raise MrisegError(f"{out}: exists and is not an mriseg cache; choose an empty or new folder")
    return None


def _prepare_cases_folder(out: Path) -> Path:
    cases_dir = out / "cases"
    try:
        cases_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MrisegError(f"{out}: cannot create the cache folder ({error.strerror})") from error
    remove_stale_folders(cases_dir)  # left by an interrupted run
    return cases_dir


def _reuse_unchanged(refs: list[CaseRef], previous: dict[str, Any] | None, cases_dir: Path,
                     summary: PreprocessSummary, force: bool) -> tuple[dict[str, dict], list[CaseRef]]:
    """Records of cases whose sources did not change since the last run, and the cases to (re)do;
    cached cases no longer in the source are removed."""
    records: dict[str, dict] = {}
    old_records = previous["cases"] if previous else {}
    todo = []
    for ref in refs:
        old = old_records.get(ref.case_id)
        if old is not None and _unchanged(old, ref, cases_dir):
            records[ref.case_id] = old
            summary.skipped.append(ref.case_id)
        else:
            todo.append(ref)
    current_ids = {r.case_id for r in refs}
    summary.removed = sorted(set(old_records) - current_ids)
    for case_id in summary.removed:
        shutil.rmtree(cases_dir / case_id, ignore_errors=True)
    if previous is None and force:
        for folder in cases_dir.iterdir():
            if folder.name not in current_ids:
                shutil.rmtree(folder, ignore_errors=True)
    if summary.skipped:
        log.info(f"{len(summary.skipped)} of {len(refs)} cases unchanged since the last run: skipped")
    return records, todo


def _unchanged(record: dict, ref: CaseRef, cases_dir: Path) -> bool:
    try:
        same_sources = record.get("sources") == source_signature(ref)
    except BadInputError:
        return False
    folder = cases_dir / ref.case_id
    label_present = not record.get("has_label") or (folder / "label.npy").is_file()
    files_present = (folder / "image.npy").is_file() and label_present
    return same_sources and files_present


def _check_consistent(records: dict[str, dict], refs: list[CaseRef]) -> None:
    """All cases of one cache need the same channels and dimensionality to be trained together."""
    first_id = next(iter(records))
    first = records[first_id]
    for case_id, record in records.items():
        if len(record["modalities"]) != len(first["modalities"]) or len(record["shape"]) != len(first["shape"]):
            ref = next(r for r in refs if r.case_id == case_id)
            raise BadInputError(ref.image_paths[0], f"{len(record['modalities'])} channels, {len(record['shape'])}D; "
                                                    f"case {first_id} has {len(first['modalities'])} channels, "
                                                    f"{len(first['shape'])}D")


def _run(todo: list[CaseRef], params: PreprocessParams, cases_dir: Path, require_labels: bool,
         workers: int) -> Iterator[tuple[CaseRef, dict | None, BadInputError | None]]:
    """Process cases in this process (``workers <= 1``) or a process pool, with progress."""
    args = (params.to_dict(), str(cases_dir), require_labels)
    if workers <= 1 or len(todo) <= 1:
        for ref in log.progress(todo, description="preprocess"):
            try:
                yield ref, process_one(ref, *args), None
            except BadInputError as error:
                yield ref, None, error
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(process_one, ref, *args): ref for ref in todo}
        for future in log.progress(as_completed(futures), total=len(futures), description="preprocess"):
            ref = futures[future]
            try:
                yield ref, future.result(), None
            except BadInputError as error:
                yield ref, None, error


# ----------------------------------------------------------------------------- reading


def _load_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise BadInputError(manifest_path, f"cannot read the cache manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInputError(manifest_path, f"not an mriseg cache manifest (format is not '{FORMAT}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BadInputError(manifest_path, f"cache format version {manifest.get('format_version')} is not "
                                           f"{FORMAT_VERSION}; re-run mriseg preprocess with --force")
    _check_manifest_fields(manifest, manifest_path)
    return manifest


# What every manifest written by build_cache holds, and the type of each field.
MANIFEST_FIELDS = {"params": dict, "modalities": list, "label_info": dict, "cases": dict}
RECORD_FIELDS = {"shape": list, "has_label": bool}


def _check_manifest_fields(manifest: dict[str, Any], path: Path) -> None:
    """Name the first missing or mistyped field of an edited or damaged manifest."""
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise BadInputError(path, f"manifest field {key!r} is missing or not a {kind.__name__}; "
                                      "re-run mriseg preprocess with --force")
    try:
        PreprocessParams.from_dict(manifest["params"])
    except (MrisegError, TypeError, ValueError) as error:
        raise BadInputError(path, f"manifest params are not valid preprocessing parameters ({error})") from None
    for case_id, record in manifest["cases"].items():
        for key, kind in RECORD_FIELDS.items():
            if not isinstance(record, dict) or not isinstance(record.get(key), kind):
                raise BadInputError(path, f"case {case_id!r}: record field {key!r} is missing or not a "
                                          f"{kind.__name__}")
        if not all(isinstance(n, int) and n > 0 for n in record["shape"]):
            raise BadInputError(path, f"case {case_id!r}: shape {record['shape']} is not a list of sizes")


@dataclass
class Cache:
    """An opened cache: ids, parameters, per-case records and memory-mapped arrays."""

    path: Path
    manifest: dict[str, Any]

    @property
    def case_ids(self) -> list[str]:
        return list(self.manifest["cases"])

    @property
    def params(self) -> PreprocessParams:
        return PreprocessParams.from_dict(self.manifest["params"])

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def label_info(self) -> dict[str, Any]:
        return self.manifest["label_info"]

    def record(self, case_id: str) -> dict[str, Any]:
        return self.manifest["cases"][case_id]

    def image(self, case_id: str) -> np.ndarray:
        """(C, *spatial), memory-mapped read-only."""
        return self._load(case_id, "image.npy")

    def label(self, case_id: str) -> np.ndarray | None:
        """(*spatial) uint8, memory-mapped read-only, or None for an unlabelled case."""
        if not self.record(case_id).get("has_label"):
            return None
        return self._load(case_id, "label.npy")

    def _load(self, case_id: str, name: str) -> np.ndarray:
        """A cached array, checked against its manifest record (shape, channels, data type)."""
        path = self.path / "cases" / case_id / name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise BadInputError(path, f"cannot load cached array ({error})") from error
        shape = tuple(self.record(case_id)["shape"])
        if name == "image.npy":
            expected, kinds = (len(self.modalities), *shape), ("float16", "float32")
        else:
            expected, kinds = shape, ("uint8",)
        if tuple(array.shape) != expected or array.dtype.name not in kinds:
            raise BadInputError(path, f"cached array is {array.dtype.name} {tuple(array.shape)}; the manifest says "
                                      f"{' or '.join(kinds)} {expected}: re-run mriseg preprocess with --force")
        return array

    def __len__(self) -> int:
        return len(self.manifest["cases"])


def open_cache(path: str | Path) -> Cache:
    """Open and validate a cache folder written by :func:`build_cache`.

    Raises:
        BadInputError: no manifest, another format or version, an unfinished run, or missing case files.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(path, "no such cache folder")
    if not (path / MANIFEST).is_file():
        raise BadInputError(path, "not an mriseg cache (no manifest.json); create one with mriseg preprocess")
    manifest = _load_manifest(path)
    if not manifest.get("complete"):
        raise BadInputError(path / MANIFEST, "the cache is unfinished (an interrupted run?); "
                                             "re-run the same mriseg preprocess command to finish it")
    for case_id, record in manifest["cases"].items():
        folder = path / "cases" / case_id
        if not (folder / "image.npy").is_file() or (record.get("has_label") and not (folder / "label.npy").is_file()):
            raise BadInputError(folder, "cached case files are missing; re-run mriseg preprocess")
    if not manifest["cases"]:
        raise BadInputError(path / MANIFEST, "the cache holds no cases")
    return Cache(path=path, manifest=manifest)
