"""The ``mriseg`` command line: parse arguments, call the library, print.

Every command is a thin wrapper over a function in the library; nothing here
computes anything. Errors the user can fix (:class:`~mriseg.errors.MrisegError`)
become one line on stderr and exit code 2, unless ``--debug`` is given.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer

from mriseg import __version__
from mriseg.errors import MrisegError
from mriseg.files import check_writable_folder
from mriseg.options import parse_numbers
from mriseg.log import console

app = typer.Typer(
    name="mriseg",
    help="Brain MRI tumour segmentation: preprocess, train, predict, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    epilog="Start with `mriseg demo` (a few minutes on a laptop CPU); `mriseg COMMAND --help` shows each command.",
)

_state: dict[str, Any] = {"debug": False}


def examples(*commands: str) -> str:
    """A help epilog listing example command lines (blank lines keep rich from joining them)."""
    return "Examples:\n\n" + "\n\n".join(f"  {command}" for command in commands)



def _version_callback(value: bool) -> None:
    if value:
        print(f"mriseg {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Brain MRI tumour segmentation: preprocess, train, predict, evaluate, benchmark."""
    _state["debug"] = debug


def print_json(payload: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


# Commands are added below, one section per command, in data-flow order.

# --- synth -------------------------------------------------------------------


@app.command(epilog=examples("mriseg synth data/synth-lgg --layout lgg --cases 16 --size 20,128,128",
                             "mriseg synth data/synth-brats --layout brats --cases 4 --seed 1"))
def synth(
    out: str = typer.Argument(..., help="Folder to write the synthetic cases into."),
    layout: str = typer.Option("lgg", help="lgg (kaggle_3m TIF slices) | brats (BraTS 2021 NIfTI).",
                               rich_help_panel="Data"),
    cases: int = typer.Option(16, min=1, help="Number of cases (patients).", rich_help_panel="Data"),
    seed: int = typer.Option(0, help="Random seed; case i depends only on (seed, i).", rich_help_panel="Data"),
    size: Optional[str] = typer.Option(None, help="lgg: SLICES,H,W or H,W (default 24,256,256); "
                                                  "brats: X,Y,Z (default 128,128,80).", rich_help_panel="Data"),
    overwrite: bool = typer.Option(False, help="Replace synthetic cases that already exist in OUT.",
                                   rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print the written case folders as JSON.",
                                     rich_help_panel="Output"),
) -> None:
    """Write synthetic brain MRI with tumours in the real on-disk formats (deterministic for a seed)."""
    from mriseg.data.preprocess import parse_size
    from mriseg.data.synthetic import write_synthetic
    from mriseg.log import info

    folders = write_synthetic(out, layout=layout, cases=cases, seed=seed, size=parse_size(size), overwrite=overwrite)
    if json_output:
        print_json({"out": out, "layout": layout, "cases": [str(f) for f in folders]})
    else:
        info(f"{out}: wrote {len(folders)} synthetic {layout} cases")


# --- preprocess --------------------------------------------------------------


@app.command(epilog=examples("mriseg preprocess data/synth-lgg cache/lgg --workers 2",
                             "mriseg preprocess kaggle_3m cache/lgg --size 128,128 --skip-bad",
                             "mriseg preprocess BraTS2021_Training cache/brats --crop --size 128,128,128 --json"))
def preprocess(
    source: str = typer.Argument(..., help="Dataset folder (lgg, brats, msd or pairs layout)."),
    out: str = typer.Argument(..., help="Cache folder to create or update."),
    layout: Optional[str] = typer.Option(None, help="lgg | brats | msd | pairs (detected when omitted).",
                                         rich_help_panel="Input"),
    modalities: Optional[str] = typer.Option(
        None, help="BraTS file-name map, e.g. flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass.",
        rich_help_panel="Input"),
    size: Optional[str] = typer.Option(None, help="Resize to H,W (in-plane) or D,H,W (nearest neighbour).",
                                       rich_help_panel="Preprocessing"),
    crop: bool = typer.Option(False, "--crop/--no-crop", help="Crop to the non-background bounding box first.",
                              rich_help_panel="Preprocessing"),
    norm: str = typer.Option("zscore", help="Per-channel normalisation: zscore | minmax | max | percentile.",
                             rich_help_panel="Preprocessing"),
    label_map: Optional[str] = typer.Option(None, help="Replace label values, e.g. 3:1 (BraTS 2013 -> 2017+).",
                                            rich_help_panel="Preprocessing"),
    dtype: str = typer.Option("float16", help="Image storage type: float16 | float32.",
                              rich_help_panel="Preprocessing"),
    workers: int = typer.Option(1, min=1, help="Cases processed in parallel.", rich_help_panel="Output"),
    force: bool = typer.Option(False, help="Rebuild a cache made with other parameters.", rich_help_panel="Output"),
    skip_bad: bool = typer.Option(False, help="Go on past bad cases and list them at the end.",
                                  rich_help_panel="Input"),
    allow_unlabelled: bool = typer.Option(False, help="Cache cases that have no label (images only).",
                                          rich_help_panel="Input"),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output"),
) -> None:
    """Turn a dataset into a fast .npy training cache (incremental: unchanged cases are skipped)."""
    from mriseg.data.cache import build_cache
    from mriseg.data.preprocess import PreprocessParams, parse_label_map, parse_size
    from mriseg.log import info

    params = PreprocessParams(size=parse_size(size), crop=crop, norm=norm, label_map=parse_label_map(label_map),
                              dtype=dtype)
    summary = build_cache(source, out, params, layout=layout, modalities=modalities, workers=workers,
                          force=force, skip_bad=skip_bad, require_labels=not allow_unlabelled)
    if json_output:
        print_json(summary.to_dict())
    else:
        info(f"{out}: {summary.total - len(summary.bad)} cases ({len(summary.written)} written, "
             f"{len(summary.skipped)} unchanged, {len(summary.bad)} bad)")


# --- models ------------------------------------------------------------------


@app.command("models", epilog=examples("mriseg models", "mriseg models --json"))
def models_command(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout."),
) -> None:
    """List the networks: name, dims, parameters at the default width, reference, notes."""
    from mriseg.models import describe_models

    entries = describe_models()
    if as_json:
        print_json(entries)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mriseg models (parameters at the default width)")
    for column in ("name", "dims", "parameters", "for (in, out)", "options", "reference", "notes"):
        table.add_column(column, justify="right" if column == "parameters" else "left", overflow="fold")
    for entry in entries:
        shape = entry["parameters_for"]
        table.add_row(entry["name"], ", ".join(f"{d}D" for d in entry["dims"]), f"{entry['parameters']:,}",
                      f"{shape['in_channels']}, {shape['out_channels']} ({shape['spatial_dims']}D)",
                      ", ".join(entry["options"]) or "-", entry["reference"], entry["notes"])
    Console().print(table)

# --- train -------------------------------------------------------------------


def _model_options(text: Optional[str]) -> dict[str, Any]:
    """``--model-options '{"features": 16}'`` or ``features=16,variant=buda``."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            return dict(json.loads(text))
        except (ValueError, TypeError) as error:
            raise MrisegError(f"--model-options is not a JSON object: {error}") from None
    options: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return options


@app.command("train", epilog=examples(
    "mriseg train --model attention-unet",
    "mriseg train cache/lgg --model unet --loss bce-dice --epochs 50 --out runs/lgg",
    "mriseg train --resume --out runs/lgg",
    "torchrun --standalone --nproc_per_node 4 -m mriseg train cache/brats --dims 3 --model unet3d "
    "--patch-size 128,128,128 --device cuda --amp"))
def train_command(
    data: Optional[str] = typer.Argument(None, help="Preprocess cache or raw dataset; none: the embedded "
                                                    "synthetic LGG-layout default."),
    model: Optional[str] = typer.Option(None, "--model", rich_help_panel="Model",
                                        help="Network name (mriseg models lists them). (default: unet)"),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder. (default: runs/<model>-<timestamp>, "
                                                          "with runs/latest pointing at it)",
                                      rich_help_panel="Run folder"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (or runs/latest) from last.pt.",
                                rich_help_panel="Run folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder.",
                                   rich_help_panel="Run folder"),
    model_options: Optional[str] = typer.Option(None, "--model-options",
                                                help="Model options: JSON or key=value,... e.g. features=16.",
                                                rich_help_panel="Model"),
    dims: Optional[int] = typer.Option(None, "--dims", help="2: slices of volumes; 3: patches. (default: 2)",
                                       rich_help_panel="Model"),
    task: Optional[str] = typer.Option(None, "--task", help="auto, binary, multiclass or regions. (default: auto)",
                                       rich_help_panel="Task and loss"),
    ignore_index: Optional[int] = typer.Option(None, "--ignore-index", rich_help_panel="Task and loss",
                                               help="Label ignored by multi-class losses. (default: 255)"),
    loss: Optional[str] = typer.Option(None, "--loss", help="dice, bce, bce-dice, soft-iou, ce, dice-ce, focal, "
                                                            "border-ce. (default: dice)",
                                       rich_help_panel="Task and loss"),
    bce_weight: Optional[float] = typer.Option(None, "--bce-weight", help="BCE share of bce-dice. (default: 0.5)",
                                               rich_help_panel="Task and loss"),
    augment: Optional[str] = typer.Option(None, "--augment", help="default, none, or e.g. flip,rotate=15,scale=0.05,"
                                                                  "elastic=4,intensity. (default: default)",
                                          rich_help_panel="Data and sampling"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="(default: 50)", rich_help_panel="Optimisation"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per process. (default: 16)",
                                             rich_help_panel="Data and sampling"),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch",
                                                  help="(default: 2D: training slices / batch; 3D: 8 patches per case)",
                                                  rich_help_panel="Data and sampling"),
    patch_size: Optional[str] = typer.Option(None, "--patch-size", help="3D patch, e.g. 128,128,128.",
                                             rich_help_panel="Data and sampling"),
    uniform_share: Optional[float] = typer.Option(None, "--uniform-share",
                                                  help="2D: share of slice draws made uniformly. (default: 0.1)",
                                                  rich_help_panel="Data and sampling"),
    foreground_share: Optional[float] = typer.Option(None, "--foreground-share",
                                                     help="3D: share of patches centred on tumour. (default: 0.33)",
                                                     rich_help_panel="Data and sampling"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, adamw or sgd. (default: adam)",
                                            rich_help_panel="Optimisation"),
    lr: Optional[float] = typer.Option(None, "--lr", help="(default: 1e-3)", rich_help_panel="Optimisation"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="(default: 0)",
                                                 rich_help_panel="Optimisation"),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum. (default: 0.9)",
                                             rich_help_panel="Optimisation"),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="SGD with Nesterov momentum.",
                                            rich_help_panel="Optimisation"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="plateau, step, cosine, poly or constant. "
                                                                    "(default: plateau)",
                                           rich_help_panel="Optimisation"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up. (default: 0)",
                                                  rich_help_panel="Optimisation"),
    lr_patience: Optional[int] = typer.Option(None, "--lr-patience", rich_help_panel="Optimisation",
                                              help="Plateau epochs before the lr drops. (default: 3)"),
    lr_factor: Optional[float] = typer.Option(None, "--lr-factor", help="Plateau lr factor. (default: 0.5)",
                                              rich_help_panel="Optimisation"),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this value.",
                                              rich_help_panel="Optimisation"),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stop after this many epochs without a "
                                                                    "better val Dice; 0 = never. (default: 10)",
                                           rich_help_panel="Optimisation"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of patients for validation. "
                                                                              "(default: 0.2)",
                                                 rich_help_panel="Validation"),
    split: Optional[str] = typer.Option(None, "--split", help='JSON file {"train": [ids], "val": [ids]}.',
                                        rich_help_panel="Validation"),
    folds: Optional[int] = typer.Option(None, "--folds", help="K-fold cross-validation by patient.",
                                        rich_help_panel="Validation"),
    fold: Optional[int] = typer.Option(None, "--fold", help="Which fold validates (0..K-1). (default: 0)",
                                       rich_help_panel="Validation"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. (default: auto)",
                                         rich_help_panel="Devices and speed"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision: bf16, or fp16 with a grad "
                                                                    "scaler where bf16 is missing.",
                                       rich_help_panel="Devices and speed"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Channels-last memory format.",
                                                 rich_help_panel="Devices and speed"),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model.",
                                                 rich_help_panel="Devices and speed"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers. (default: 0 on CPU, 4 on CUDA)",
                                          rich_help_panel="Devices and speed"),
    seed: Optional[int] = typer.Option(None, "--seed", help="(default: 0)", rich_help_panel="Devices and speed"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between log lines. (default: 10)",
                                            rich_help_panel="Run folder"),
    size: Optional[str] = typer.Option(None, "--size", help="Raw DATA only: preprocess to this size, e.g. 128,128.",
                                       rich_help_panel="Data and sampling"),
    modalities: Optional[str] = typer.Option(None, "--modalities",
                                             help="Raw DATA only: name map, e.g. flair=Flair,t1ce=T1c,seg=OT.",
                                             rich_help_panel="Data and sampling"),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout.",
                                 rich_help_panel="Run folder"),
) -> None:
    """Train a segmentation network; writes a run folder with checkpoints, metrics and curves."""
    from mriseg.train import train

    settings = {
        "model_options": _model_options(model_options), "spatial_dims": dims, "task": task,
        "ignore_index": ignore_index, "loss": loss, "bce_weight": bce_weight, "augment": augment, "epochs": epochs,
        "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
        "patch_size": parse_numbers(patch_size, "--patch-size"), "uniform_share": uniform_share,
        "foreground_share": foreground_share, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
        "momentum": momentum, "nesterov": nesterov, "schedule": schedule, "warmup_epochs": warmup_epochs,
        "lr_patience": lr_patience, "lr_factor": lr_factor, "clip_grad": clip_grad, "patience": patience,
        "val_fraction": val_fraction, "split": split, "folds": folds, "fold": fold, "device": device, "amp": amp,
        "channels_last": channels_last, "compile": compile_model, "workers": workers, "seed": seed,
        "log_every": log_every, "size": parse_numbers(size, "--size", count=(2, 3)), "modalities": modalities,
    }
    given = {key: value for key, value in settings.items() if value is not None and value != {}}
    summary = train(data, model=model, out=out, resume=resume, overwrite=overwrite, **given)
    if as_json and os.environ.get("RANK", "0") == "0":
        print_json(summary)


# --- predict -----------------------------------------------------------------

@app.command(epilog=examples(
    "mriseg predict volume.nii.gz",
    "mriseg predict data/brats/*/ --model runs/latest --overlay --gif",
    "find scans -name '*.nii.gz' | mriseg predict - --json --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"))
def predict(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, case or patient folders, 2D images, globs; "
                                                 "- reads one path per line from stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Run folder or .pt checkpoint "
                                        "(default: $MRISEG_MODEL, else runs/latest).",
                                        rich_help_panel="Model and output"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder (default: ./predictions/).",
                                      rich_help_panel="Model and output"),
    overlap: float = typer.Option(0.5, min=0.0, max=0.95, help="3D models: overlap of sliding windows.",
                                  rich_help_panel="Inference"),
    patch_size: Optional[str] = typer.Option(None, "--patch-size",
                                             help="3D models: window D,H,W (default: the checkpoint's).",
                                             rich_help_panel="Inference"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Slices (2D) or windows (3D) per forward pass.",
                                   rich_help_panel="Inference"),
    tta: bool = typer.Option(False, "--tta", help="Average predictions over all axis flips.",
                             rich_help_panel="Inference"),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision (float16 on CUDA, bfloat16 on CPU).",
                             rich_help_panel="Inference"),
    interpolation: str = typer.Option("linear", "--interpolation",
                                      help="Back to the source grid: linear (probabilities, then decoded there) "
                                           "or nearest (labels).", rich_help_panel="Inference"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps.", rich_help_panel="Inference"),
    threshold: Optional[float] = typer.Option(None, help="Binary and region tasks: probability cut-off in (0, 1) "
                                              "(default: the checkpoint's, 0.5).",
                                    rich_help_panel="Post-processing"),
    largest_component: bool = typer.Option(False, "--largest-component",
                                           help="Keep only the largest connected tumour blob.",
                                           rich_help_panel="Post-processing"),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write the soft maps.",
                                       rich_help_panel="Post-processing"),
    overlay: bool = typer.Option(False, "--overlay", help="PNG per tumour slice: prediction red, truth green.",
                                 rich_help_panel="Pictures"),
    overlay_modality: Optional[str] = typer.Option(None, "--overlay-modality",
                                                   help="Channel drawn under outlines (default: flair if present).",
                                                   rich_help_panel="Pictures"),
    all_slices: bool = typer.Option(False, "--all-slices", help="Overlays and GIFs of every slice.",
                                    rich_help_panel="Pictures"),
    labels: Optional[str] = typer.Option(None, "--labels", help="True labels to outline (file, or folder of "
                                          "files named after the cases) (default: labels found beside the input).",
                                         rich_help_panel="Pictures"),
    gif: bool = typer.Option(False, "--gif", help="One animated GIF per volume through its slices.",
                             rich_help_panel="Pictures"),
    fps: float = typer.Option(10.0, "--fps", min=0.1, help="GIF frames per second.", rich_help_panel="Pictures"),
    modalities: Optional[str] = typer.Option(None, "--modalities",
                                             help="File-name map for case folders, e.g. flair=Flair_,t1ce=T1c_.",
                                             rich_help_panel="Model and output"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: take every n-th input from the i-th "
                                        "(0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.",
                                        rich_help_panel="Pipelines and clusters"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs.",
                                   rich_help_panel="Model and output"),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per case on stdout.",
                                     rich_help_panel="Pipelines and clusters"),
) -> None:
    """Segment MRI volumes or images with a trained model; masks keep the input's geometry."""
    # Imported here so that `mriseg --help` and other commands do not pay for importing torch.
    from pathlib import Path

    from mriseg import predict as predict_module
    from mriseg.log import info

    options = predict_module.PredictOptions(
        out=Path(out) if out is not None else predict_module.DEFAULT_OUT, overlap=overlap, batch_size=batch_size,
        patch_size=parse_numbers(patch_size, "--patch-size", count=3), tta=tta, amp=amp, device=device,
        threshold=threshold,
        largest_component=largest_component, probabilities=probabilities, overlay=overlay,
        overlay_modality=overlay_modality, all_slices=all_slices, labels=Path(labels) if labels is not None else None,
        gif=gif, gif_fps=fps, modalities=modalities, overwrite=overwrite, interpolation=interpolation)
    options.check()  # every option's range, before the model is loaded

    def report(result: predict_module.CaseResult) -> None:
        if json_output:
            print_json(result.as_json())
        elif result.status == "ok":
            info(f"{result.case_id}: {result.outputs.get('mask')} ({result.volume_ml:.2f} mL, {result.seconds:.1f} s)")
        if result.status != "ok":
            console.print(f"error: {result.error}", markup=False, style="red", soft_wrap=True)

    results = predict_module.predict(inputs, model=model, options=options,
                                     shard=predict_module.parse_shard(shard) if shard else None, on_result=report)
    failed = sum(result.status != "ok" for result in results)
    if results and failed == len(results):  # each failure already had its error line
        info(f"all {failed} case(s) failed; nothing was written")
        raise typer.Exit(2)
    if failed:
        info(f"{failed} of {len(results)} case(s) failed (see the errors above)")
        raise typer.Exit(1)
    if not results:
        info("nothing to do: this shard holds no inputs")



# --- evaluate ----------------------------------------------------------------

@app.command("evaluate", epilog=examples(
    "mriseg evaluate predictions/ labels/ --out evaluation/",
    "mriseg evaluate predictions/ BraTS2021_Validation/ --regions brats --json > summary.json",
    "mriseg evaluate --model runs/latest data/ --out evaluation/"))
def evaluate_command(
    paths: list[Path] = typer.Argument(..., metavar="PRED GT | DATA",
                                       help="Predicted masks and the truth (files or folders, matched by case "
                                            "id; GT may be a labelled dataset); with --model, one labelled DATA."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o",
                             help="Folder for metrics.csv, summary.json and dsc.png.", rich_help_panel="Output"),
    model: Optional[Path] = typer.Option(None, "--model",
                                         help="Run folder or checkpoint: predict DATA in memory and score it.",
                                         rich_help_panel="With --model"),
    regions: str = typer.Option("auto", "--regions",
                                help="auto | binary | labels | brats | brats2023 | msd | NAME=1,2;NAME=4 "
                                     "(auto: the dataset's or the checkpoint's regions, else binary).",
                                rich_help_panel="Scoring"),
    empty: str = typer.Option("score", "--empty",
                              help="Empty-mask policy. score: both empty -> Dice 1, distances 0; one empty -> "
                                   "Dice 0, distances the image diagonal (BraTS: 373.13 mm). ignore: also leave "
                                   "out cases whose truth is empty.",
                              rich_help_panel="Scoring"),
    strict: bool = typer.Option(False, "--strict", help="Case ids present on one side only are an error.",
                                rich_help_panel="Scoring"),
    modalities: Optional[str] = typer.Option(None, "--modalities",
                                             help="BraTS file-name map of the GT dataset, e.g. "
                                                  "flair=Flair_x,t1ce=T1c_x,seg=OTMultiClass.",
                                             rich_help_panel="Scoring"),
    device: str = typer.Option("auto", "--device", help="With --model: cpu, cuda, cuda:1 or auto.",
                               rich_help_panel="With --model"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="With --model: slices or patches per batch.",
                                   rich_help_panel="With --model"),
    tta: bool = typer.Option(False, "--tta", help="With --model: average predictions over flips.",
                             rich_help_panel="With --model"),
    largest_component: bool = typer.Option(False, "--largest-component",
                                           help="With --model: keep only the largest tumour blob.",
                                           rich_help_panel="With --model"),
    interpolation: str = typer.Option("linear", "--interpolation",
                                      help="With --model: back to the source grid, linear or nearest.",
                                      rich_help_panel="With --model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --out.",
                                   rich_help_panel="Output"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout.",
                                 rich_help_panel="Output"),
) -> None:
    """Per-volume Dice, IoU, HD95, ASSD, sensitivity, precision and volumes, with a Dice bar plot."""
    from mriseg.evaluate import evaluate, evaluate_model, results_table

    if model is not None:
        if len(paths) != 1:
            raise typer.BadParameter("with --model give one labelled DATA folder", param_hint="PRED GT | DATA")
        result = evaluate_model(model, paths[0], out, regions=regions, empty=empty, overwrite=overwrite,
                                modalities=modalities, device=device, batch_size=batch_size, tta=tta,
                                largest_component=largest_component, interpolation=interpolation)
    else:
        if len(paths) != 2:
            raise typer.BadParameter("give PRED and GT, or --model RUN_DIR DATA", param_hint="PRED GT | DATA")
        result = evaluate(paths[0], paths[1], out, regions=regions, empty=empty, strict=strict,
                          overwrite=overwrite, modalities=modalities)
    console.print(results_table(result))
    console.print(f"wrote {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'dsc.png'}", markup=False)
    if as_json:
        print_json(result.summary)


# --- benchmark ---------------------------------------------------------------



def _int_list(text: str, option: str) -> tuple[int, ...]:
    values = parse_numbers(text, option)
    if values is None:
        raise MrisegError(f"{option} needs at least one whole number, got {text!r}")
    return values


@app.command(epilog=examples(
    "mriseg benchmark --model unet --gpus 0,1 --micro-batches 2,4,8",
    "mriseg benchmark --model tiny3d --input-size 240,240,155 --batch-size 1 --gpus 0,1",
    "mriseg benchmark --model unet --devices cpu,cpu --steps 3 --timeline step.png"))
def benchmark(
    model: str = typer.Option("unet", "--model", help="Registry name of a model with pipeline stages.",
                              rich_help_panel="Model and input"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="CUDA devices, e.g. 0,1 (0 alone: single only; 0,0: "
                                       "pipeline machinery on one GPU).", rich_help_panel="Devices"),
    devices: Optional[str] = typer.Option(None, "--devices", help="Torch devices, e.g. cpu,cpu: one 1-thread "
                                          "process per device stands in for two GPUs.", rich_help_panel="Devices"),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per training step.",
                                   rich_help_panel="Model and input"),
    input_size: str = typer.Option("128,128", "--input-size", help="H,W (2D) or H,W,D (3D).",
                                   rich_help_panel="Model and input"),
    in_channels: Optional[int] = typer.Option(None, "--in-channels", rich_help_panel="Model and input",
                                              help="Input channels (default: 3 for 2D, 4 for 3D)."),
    out_channels: int = typer.Option(1, "--out-channels", help="Output channels.", rich_help_panel="Model and input"),
    features: Optional[int] = typer.Option(None, "--features", help="The model's width (default: the model's).",
                                           rich_help_panel="Model and input"),
    micro_batches: str = typer.Option("2,4,8", "--micro-batches", help="Micro-batch counts for the pipeline.",
                                      rich_help_panel="Pipeline"),
    split: str = typer.Option("encoder-decoder,balanced", "--split", help="Where to cut: encoder-decoder, balanced.",
                              rich_help_panel="Pipeline"),
    schedule: str = typer.Option("gpipe,1f1b", "--schedule", help="Pipeline schedules: gpipe, 1f1b.",
                                 rich_help_panel="Pipeline"),
    steps: int = typer.Option(5, "--steps", help="Timed steps per configuration (median, p10, p90).",
                              rich_help_panel="Timing"),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps before them.", rich_help_panel="Timing"),
    amp: bool = typer.Option(False, "--amp", help="bfloat16 autocast.", rich_help_panel="Model and input"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout.", rich_help_panel="Output"),
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="Draw one step of each split (PNG).",
                                            rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --timeline file.",
                                   rich_help_panel="Output"),
) -> None:
    """Time one device against a naive split, a pipeline and data parallelism across two."""
    from mriseg.benchmark import BenchmarkConfig, parse_devices, report_tables, run_benchmark
    from mriseg.viz import draw_benchmark_timeline

    if timeline is not None:
        if timeline.exists() and not overwrite:
            raise MrisegError(f"{timeline}: already exists; pass --overwrite to replace it")
        if timeline.suffix.lower() != ".png":
            raise MrisegError(f"{timeline}: --timeline writes a PNG picture; give a name ending in .png")
        check_writable_folder(timeline.parent)  # before minutes of measuring, not after
    config = BenchmarkConfig(
        model=model, devices=parse_devices(gpus, devices), batch_size=batch_size,
        input_size=_int_list(input_size, "--input-size"), in_channels=in_channels, out_channels=out_channels,
        features=features, micro_batches=_int_list(micro_batches, "--micro-batches"),
        splits=tuple(item.strip() for item in split.split(",")),
        schedules=tuple(item.strip().lower() for item in schedule.split(",")),
        steps=steps, warmup=warmup, amp=amp)
    report = run_benchmark(config)
    if timeline is not None:
        draw_benchmark_timeline(report, timeline)
    if as_json:
        print_json(report)
        return
    from rich.console import Console

    # Wide enough for the results table when stdout is a file or a pipe.
    stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    for renderable in report_tables(report):
        stdout.print(renderable)


# --- demo --------------------------------------------------------------------


@app.command(epilog=examples("mriseg demo", "mriseg demo --layout brats --out brats-demo --json"))
def demo(
    out: Path = typer.Option(Path("mriseg-demo"), "--out", "-o", help="Folder for everything the demo writes."),
    layout: str = typer.Option("lgg", "--layout", help="lgg (kaggle_3m TIF slices, tumour vs background) | "
                                                       "brats (NIfTI, four modalities, WT/TC/ET regions)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data and of training."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print what the demo measured as JSON on stdout."),
) -> None:
    """Run the whole job on synthetic data in a few minutes: synth, preprocess, train, predict, evaluate."""
    from mriseg.demo import run_demo
    from mriseg.log import info

    result = run_demo(out, layout=layout, overwrite=overwrite, seed=seed, device=device)
    if as_json:
        print_json(result.to_dict())
        return
    scores = ", ".join(f"{region} {dice:.3f}" for region, dice in result.test_dice.items())
    info(f"demo done in {result.seconds['total']:.0f} s: best mean per-volume validation Dice "
         f"{result.val_dice:.3f}; held-out cases: mean Dice {scores}")
    info("open these:")
    for what, path in result.files.items():
        info(f"  {path}  ({what})")
    info(f"segment your own scans: mriseg predict SCAN --model {out / 'run'}")


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one line and exit 2.

    Usage errors (unknown option, missing argument) are reported by typer itself
    with exit code 2; errors raised by the library for bad inputs are caught here.
    """
    try:
        app(prog_name="mriseg")
    except MrisegError as error:
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"error: {error}", markup=False, style="red", soft_wrap=True)
        sys.exit(error.exit_code)
    except OSError as error:
        # A full disk, a read-only or forbidden folder, wherever it is met: the user's to fix.
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"error: {error.filename or 'output'}: {error.strerror}", markup=False, style="red",
                      soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        console.print("interrupted", style="red")
        sys.exit(130)
