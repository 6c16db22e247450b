"""The run folder: config.json, metrics.jsonl, train.log, last.pt / best.pt, curves.png.

Only rank 0 writes. ``--resume`` reads the folder back and checks each part against the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mriseg import __version__, log
from mriseg.checkpoint import load_checkpoint
from mriseg.errors import BadInputError, MrisegError
from mriseg.train.options import RESUME_OVERRIDABLE, TrainOptions


class RunFolder:
    """What rank 0 writes: config.json, metrics.jsonl, train.log, checkpoints, curves.png, TensorBoard."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.metrics = self.log_file = self.tensorboard = None
        self.records: list[dict[str, Any]] = []
        self.last_plot = 0.0

    def open(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        metrics_path = self.path / "metrics.jsonl"
        if resume_step is not None and metrics_path.exists():  # drop lines written after the checkpoint
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
            self.records = [json.loads(line) for line in kept]
        self.metrics = metrics_path.open("a")
        self.log_file = (self.path / "train.log").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.path / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        log.info(message)
        if self.log_file:
            self.log_file.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")
            self.log_file.flush()

    def record(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(entry)
        self.metrics.write(json.dumps(entry) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])

    def plot(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.last_plot < 60):
            return
        from mriseg.viz import plot_training_curves
        plot_training_curves(self.records, self.path / "curves.png")
        self.last_plot = time.monotonic()

    def close(self) -> None:
        for handle in (self.metrics, self.log_file, self.tensorboard):
            if handle is not None:
                handle.close()
        self.metrics = self.log_file = self.tensorboard = None


def resolve_run_dir(out: str | Path | None, model: str, resume: bool, overwrite: bool) -> Path:
    """The run folder: ``--out``, or ``runs/<model>-<timestamp>`` (or ``runs/latest`` when resuming)."""
    if out is None:
        if resume:
            latest = Path("runs") / "latest"
            if not latest.exists():
                raise MrisegError("--resume without --out needs runs/latest; name the run folder with --out")
            return latest.resolve()
        return Path("runs") / f"{model}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(out)
    if path.exists() and not path.is_dir():  # --overwrite replaces runs, never a file that is in the way
        raise BadInputError(path, "--out is a file; a run writes a folder: choose another --out")
    if resume:
        if not (path / "last.pt").is_file():
            raise BadInputError(path, "nothing to resume: no last.pt in this run folder")
        return path
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise BadInputError(path, "run folder exists and is not empty; pass --resume to continue it "
                                  "or --overwrite to replace it")
    return path


def read_run_config(path: Path) -> dict[str, Any]:
    """The run's config.json, which ``--resume`` takes its settings from."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
            raise ValueError("no 'options' object")
    except (OSError, ValueError) as error:
        raise BadInputError(path, f"cannot read the run's config.json to resume ({error})") from error
    return saved


# What last.pt holds beyond best.pt: the state --resume continues from.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "step_in_epoch", "global_step", "epochs_without_gain")


def resumed_options(run_dir: Path, settings: dict[str, Any], is_writer: bool) -> tuple[TrainOptions, Any, dict]:
    """The options, data and checkpoint of a run to resume, each checked against the others."""
    config_path = run_dir / "config.json"
    saved = read_run_config(config_path)
    ignored = sorted(k for k in settings if k not in RESUME_OVERRIDABLE and settings[k] != saved["options"].get(k))
    if ignored and is_writer:
        log.warn(f"--resume keeps the run's own settings; ignoring {', '.join(ignored)}")
    merged = {**saved["options"], **{k: v for k, v in settings.items() if k in RESUME_OVERRIDABLE}}
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    try:
        options = TrainOptions(**{k: v for k, v in merged.items() if k in known})
        options.patch_size = tuple(options.patch_size) if options.patch_size else None
        options.size = tuple(options.size) if options.size else None
        options.check()
    except (MrisegError, TypeError, ValueError) as error:
        raise BadInputError(config_path, f"options cannot be resumed: {error}") from None
    data = saved.get("data")
    if data is not None and not isinstance(data, str):
        raise BadInputError(config_path, f"'data' is {data!r}, not a path")
    last = run_dir / "last.pt"
    checkpoint = load_checkpoint(last)
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    if missing:
        raise BadInputError(last, f"holds no training state ({', '.join(missing)} missing): is it a copy of "
                                  "best.pt? Resume needs the last.pt training wrote")
    model = checkpoint["model"]
    if model["name"] != options.model or (model.get("options") or {}) != options.model_options \
            or model["spatial_dims"] != options.spatial_dims:
        raise BadInputError(last, f"model {model['name']} {model.get('options') or {}} {model['spatial_dims']}D "
                                  f"differs from config.json's {options.model} {options.model_options} "
                                  f"{options.spatial_dims}D")
    return options, data, checkpoint


# The files a run writes in its folder (``--overwrite`` deletes them all before a new run starts).
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "train.log", "curves.png", "config.json", "summary.json")


def prepare_run_dir(path: Path, overwrite: bool, resume: bool) -> None:
    try:
        if overwrite and not resume:
            for name in RUN_OUTPUTS:  # an earlier run's files must not sit beside the new run's
                (path / name).unlink(missing_ok=True)
            shutil.rmtree(path / "tensorboard", ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        for partial in path.glob(".*.partial-*"):  # a checkpoint write that a SIGKILL stopped; only we write here
            partial.unlink(missing_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise BadInputError(path, f"run folder is not writable ({error.strerror or error})") from error


def point_latest_at(run_dir: Path) -> None:
    """Make ``runs/latest`` a symlink to the new run (atomically; a warning where symlinks fail)."""
    if run_dir.parent.name != "runs":
        return
    link = run_dir.parent / "latest"
    temporary = run_dir.parent / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name)
        os.replace(temporary, link)
    except OSError as error:
        log.warn(f"could not point {link} at {run_dir.name}: {error}")


def library_versions() -> dict[str, str]:
    return {"mriseg": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda or "none"}


def open_training_data(data: str | Path | None, run_dir: Path, options: TrainOptions, is_writer: bool):
    """The cache to train on: DATA itself, a cache built from raw DATA in RUN_DIR/cache, or the
    embedded synthetic default. Returns ``(cache, description)``."""
    from mriseg.data.cache import build_cache, open_cache
    from mriseg.data.preprocess import PreprocessParams

    if data is None:
        from mriseg.data.synthetic import default_dataset

        # 3D training wants whole volumes with depth: the BraTS-layout default (LGG stacks are 20 slices).
        layout = "brats" if options.spatial_dims == 3 else "lgg"
        data = default_dataset(layout=layout)
        description = f"no DATA given: training on the embedded synthetic {layout.upper()}-layout default ({data})"
    else:
        description = f"data: {data}"
    path = Path(data)
    if not path.exists():
        raise BadInputError(path, "no such file or folder")
    if (path / "manifest.json").is_file():
        given = [name for name, value in (("--size", options.size), ("--modalities", options.modalities)) if value]
        if given:  # they preprocess raw DATA; a cache is already preprocessed
            raise BadInputError(path, f"{' and '.join(given)} preprocess raw DATA, and this is a cache made by mriseg "
                                      "preprocess; run that again with them, or give the raw dataset")
        return open_cache(path), description
    cache_dir = run_dir / "cache"
    if is_writer and not (cache_dir / "manifest.json").is_file():
        log.info(f"{path} is not a cache: preprocessing it into {cache_dir}")
        build_cache(path, cache_dir, PreprocessParams(size=options.size), modalities=options.modalities)
    if dist.is_initialized():
        dist.barrier()
    return open_cache(cache_dir), description + f" (preprocessed into {cache_dir})"
