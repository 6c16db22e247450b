"""Writing and reading training checkpoints (the train -> predict contract).

A checkpoint is a ``torch.save`` dict made only of tensors and plain Python types,
so it loads with ``torch.load(weights_only=True)``: opening a checkpoint from
somewhere else can never execute code. Its keys (see docs/architecture.md):

``format`` ("mriseg-checkpoint"), ``format_version``, ``mriseg_version``,
``model`` ({name, in_channels, out_channels, spatial_dims, options}),
``state_dict``, ``preprocess``, ``modalities``, ``task``, ``epoch``, ``best_score``;
``last.pt`` adds ``optimizer``, ``scheduler``, ``scaler`` and ``rng`` for ``--resume``.
"""

from __future__ import annotations

import pickle
import zipfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mriseg import __version__
from mriseg.files import atomic_path
from mriseg.errors import BadInputError, MrisegError

CHECKPOINT_FORMAT = "mriseg-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "state_dict", "task")
REQUIRED_MODEL_KEYS = ("name", "in_channels", "out_channels", "spatial_dims")
FOLD_PREFIX = "fold_"  # a cross-validation's run folder holds one run per fold: fold_0, fold_1, ...
# torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle (protocol >= 2).
TORCH_SAVE_MAGICS = (b"PK\x03\x04", b"\x80")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically, adding the format header.

    The file is written under a temporary name in the same folder and then
    renamed, so a reader (or a crash mid-write) never sees a half-written checkpoint.
    """
    path = Path(path)
    document = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                "mriseg_version": __version__, **payload}
    try:
        with atomic_path(path) as temporary:
            torch.save(document, temporary)
    except RuntimeError as error:  # torch reports a missing folder or a full disk as RuntimeError
        raise BadInputError(path, f"cannot write checkpoint: {_first_line(error)}") from error
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`BadInputError` for a missing, truncated or corrupt file, a file
    from another tool, an incompatible format version, or a pickle that would need
    to execute code to load (``weights_only=True`` refuses it). The returned dict
    also holds ``path``, the file it came from, for later error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "checkpoint not found" if not path.exists() else "not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise BadInputError(path, f"cannot read: {error.strerror or error}") from error
    if head and not head.startswith(TORCH_SAVE_MAGICS):
        # Neither torch.save's zip archive nor a pickle: a text file, an image, a NIfTI ...
        raise BadInputError(path, "not a checkpoint: neither a torch.save archive nor a pickle "
                                  f"(the file starts with {head!r}); pass a run folder or its best.pt")
    if head.startswith(TORCH_SAVE_MAGICS[0]):
        _check_archive(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is noise next to our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            document = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BadInputError(path, "refused to load: the file holds Python objects that would "
                                  f"execute code (only tensors and plain types are allowed): "
                                  f"{_first_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - random bytes make the unpickler raise IndexError, struct.error, ...
        raise BadInputError(path, f"not a readable checkpoint (truncated or corrupt?): "
                                  f"{_first_line(error)}") from error
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise BadInputError(path, f"not an mriseg checkpoint (no format: \"{CHECKPOINT_FORMAT}\"); "
                                  "was it written by another tool?")
    version = document.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise BadInputError(path, f"checkpoint format_version {version!r} is not supported by mriseg "
                                  f"{__version__} (expects {CHECKPOINT_FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in document]
    model_info = document.get("model")
    if isinstance(model_info, dict):
        missing += [f"model.{key}" for key in REQUIRED_MODEL_KEYS if key not in model_info]
    elif "model" not in missing:
        missing.append("model")
    if missing:
        raise BadInputError(path, f"checkpoint is missing {', '.join(missing)}")
    document["path"] = str(path)
    return document


def _check_archive(path: Path) -> None:
    """Refuse a torch.save archive whose stored CRC-32s do not match its bytes: torch.load does not
    check them, so flipped bits in the weights would load and predict without a word."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise BadInputError(path, f"not a readable checkpoint (truncated or corrupt?): {_first_line(error)}") from error
    if damaged is not None:
        raise BadInputError(path, f"checkpoint is corrupt: {damaged} does not match its checksum "
                                  "(a damaged copy? copy it again)")


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network described by a loaded checkpoint and load its weights (in eval mode)."""
    from mriseg.inference.context import set_slice_context
    from mriseg.models import build_model

    source = checkpoint.get("path", "checkpoint")
    model_info = checkpoint["model"]
    try:
        model = build_model(model_info["name"], model_info["in_channels"], model_info["out_channels"],
                            spatial_dims=model_info["spatial_dims"], **(model_info.get("options") or {}))
    except (MrisegError, KeyError, TypeError, ValueError) as error:  # e.g. a name not in the registry
        raise BadInputError(source, f"cannot rebuild model {model_info['name']!r}: {_first_line(error)}") from error
    context = model_info.get("context", 0)
    if not isinstance(context, int) or context < 0 or (context and model_info["spatial_dims"] != 2):
        raise BadInputError(source, f"checkpoint model context {context!r} is not a number of slices of a 2D model")
    set_slice_context(model, context)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise BadInputError(source, f"weights do not fit model {model_info['name']!r}: "
                                    f"{_first_line(error)}") from error
    return model.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def fold_folder(out: Path, fold: int) -> Path:
    """The run folder of fold ``fold`` inside a cross-validation's folder ``out``."""
    return out / f"{FOLD_PREFIX}{fold}"


def fold_index(run: Path) -> int | None:
    """k of a ``fold_<k>`` run folder, None for any other name."""
    digits = run.name[len(FOLD_PREFIX):]
    return int(digits) if run.name.startswith(FOLD_PREFIX) and digits.isdigit() else None


def fold_folders(out: Path) -> list[Path]:
    """The fold runs (``fold_<k>`` folders) inside ``out``, in fold order."""
    runs = [p for p in out.glob(f"{FOLD_PREFIX}*") if p.is_dir() and fold_index(p) is not None]
    return sorted(runs, key=fold_index)
