"""The one atomic writer: every file mriseg writes appears only once it is complete.

A file is written under a hidden temporary name in its own folder (so the rename stays on one
file system) and renamed over the final name when complete. A crash, a full disk or Ctrl-C
leaves at most a hidden ``.NAME.partial-*`` file, never a file that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mriseg.errors import BadInputError


def write_error_reason(error: OSError) -> str:
    """Why a write failed; numpy and tifffile report a short write on a full disk as "N requested
    and M written", without an errno."""
    return error.strerror or f"{error}: short write, the disk is probably full"


def temporary_beside(path: Path) -> Path:
    """A hidden, unique name in ``path``'s folder that keeps its extensions (writers look at them)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{''.join(path.suffixes)}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block ends without error.

    Raises:
        BadInputError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    path = Path(path)
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise BadInputError(path, f"cannot write: {write_error_reason(error)}") from error
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (newlines as given)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Any, indent: int = 1) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=str) + "\n")


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written in it, before any long work starts."""
    if folder.exists() and not folder.is_dir():
        raise BadInputError(folder, "is a file; the output is a folder: choose another one")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".write-test") as probe:
            probe.write_bytes(b"")
        (folder / ".write-test").unlink()
    except OSError as error:
        raise BadInputError(folder, f"output folder is not writable: {error.strerror or error}") from error


_STALE_FOLDER = re.compile(r"\..+\.[0-9a-f]{32}\.(tmp|old)")


def temporary_folder_beside(final: Path) -> Path:
    """A hidden, unique name beside ``final`` to build a folder under before ``replace_folder``."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")


def remove_stale_folders(folder: Path) -> None:
    """Delete what an interrupted ``replace_folder`` left in ``folder``: half-built ``.*.tmp`` folders
    and ``.*.old`` versions that a kill stopped between the renames and the delete."""
    for stale in folder.glob(".*"):
        if _STALE_FOLDER.fullmatch(stale.name):  # only names these two functions make
            shutil.rmtree(stale, ignore_errors=True)


def replace_folder(temporary: Path, final: Path) -> None:
    """Move a finished folder into place; an old version is moved aside first, then deleted, so a
    reader sees the old folder or the new one, never a mixture (``remove_stale_folders`` deletes
    what a kill between the steps leaves)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
        os.replace(final, old)
    os.replace(temporary, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def folder_in_place(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder to fill; when the block ends without error it replaces
    ``final`` whole (``replace_folder``), so no file of an earlier version is left inside.

    Raises:
        BadInputError: the folder cannot be created or moved (the temporary folder is removed).
    """
    temporary = temporary_folder_beside(final)
    try:
        temporary.mkdir(parents=True)
        yield temporary
        replace_folder(temporary, final)
    except OSError as error:
        raise BadInputError(final, f"cannot write: {write_error_reason(error)}") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def refuse_output_over_inputs(out: str | Path, inputs: list[str | Path], option: str = "--out",
                              nested: bool = True) -> None:
    """Refuse an output folder that is an input; with ``nested`` also one that holds an input or lies
    inside an input folder (commands whose output names come from the inputs' names: predict,
    preprocess, train). Outputs then never replace an input, whatever ``--overwrite`` says: it
    replaces earlier outputs only.
    """
    target = Path(out).expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        inside = _inside(source, target) or (source.is_dir() and _inside(target, source))
        if target == source or (nested and inside):
            relation = ("is" if target == source else "holds" if _inside(source, target) else "lies inside")
            raise BadInputError(Path(out), f"{option} {relation} the input {given}; outputs must never land on "
                                           "inputs: choose a folder outside the inputs")
