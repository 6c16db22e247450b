"""``mriseg train``: parse the options, call :func:`mriseg.train.train`, print."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import typer

from mriseg.cli.common import app, examples, print_json
from mriseg.errors import MrisegError
from mriseg.losses import LOSS_HELP
from mriseg.options import parse_numbers


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
                                                help="Model options: JSON or key=value,... e.g. features=16. "
                                                     "(default: the model's; features=16 for the 2D unet on a CPU)",
                                                rich_help_panel="Model"),
    dims: Optional[int] = typer.Option(None, "--dims", help="2: slices of volumes; 3: patches. (default: 2)",
                                       rich_help_panel="Model"),
    context: Optional[int] = typer.Option(None, "--context", rich_help_panel="Model",
                                          help="2D models: K neighbouring slices on each side as extra input "
                                               "channels (2.5D), in training, validation and prediction alike. "
                                               "(default: 0)"),
    task: Optional[str] = typer.Option(None, "--task", help="auto, binary, multiclass or regions. (default: auto)",
                                       rich_help_panel="Task and loss"),
    ignore_index: Optional[int] = typer.Option(None, "--ignore-index", rich_help_panel="Task and loss",
                                               help="Label ignored by multi-class losses. (default: 255)"),
    loss: Optional[str] = typer.Option(None, "--loss", help=f"{LOSS_HELP}. (default: dice-ce)",
                                       rich_help_panel="Task and loss"),
    bce_weight: Optional[float] = typer.Option(None, "--bce-weight", help="BCE share of bce-dice. (default: 0.5)",
                                               rich_help_panel="Task and loss"),
    augment: Optional[str] = typer.Option(None, "--augment", help="default, none, or e.g. flip,rotate=15,scale=0.05,"
                                                                  "elastic=4,intensity,dropout=0.25 (a random "
                                                                  "modality zeroed); default,dropout adds to the "
                                                                  "defaults. (default: default)",
                                          rich_help_panel="Data and sampling"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="(default: 50; with --time, as many as fit)",
                                         rich_help_panel="Optimisation"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Wall-clock budget, e.g. 15m, 4h, 3:50:00: the "
                                             "epochs and the lr schedule are fitted to it, and best.pt/last.pt are "
                                             "written before it ends.", rich_help_panel="Optimisation"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per process. (default: 16; 8 for the 2D unet on a CPU)",
                                             rich_help_panel="Data and sampling"),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch",
                                                  help="(default: 2D: training slices / batch; 3D: 8 patches per case)",
                                                  rich_help_panel="Data and sampling"),
    patch_size: Optional[str] = typer.Option(None, "--patch-size", help="Training window: 3D patch (e.g. 128,128,128) or 2D crop (e.g. 128,128). (default: 3D: the "
                                                  "median volume up to 128; 2D: whole slices, padded to a size the network takes)",
                                             rich_help_panel="Data and sampling"),
    uniform_share: Optional[float] = typer.Option(None, "--uniform-share",
                                                  help="2D: share of slice draws made uniformly. (default: 0.1)",
                                                  rich_help_panel="Data and sampling"),
    foreground_share: Optional[float] = typer.Option(None, "--foreground-share",
                                                     help="Share of 3D patches / 2D crops centred on tumour. (default: 0.33)",
                                                     rich_help_panel="Data and sampling"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, adamw or sgd. (default: adam)",
                                            rich_help_panel="Optimisation"),
    lr: Optional[float] = typer.Option(None, "--lr", help="(default: 1e-3; 3e-3 for the 2D unet on a CPU)", rich_help_panel="Optimisation"),
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
    split: Optional[str] = typer.Option(None, "--split", help='JSON file {"train": [ids], "val": [ids]}, or '
                                        "nnU-Net's splits_final.json (a list of folds; --fold picks one).",
                                        rich_help_panel="Validation"),
    folds: Optional[int] = typer.Option(None, "--folds", help="K-fold cross-validation by patient: one run "
                                        "per fold in OUT/fold_0 ..., trained in turn (--time is shared among "
                                        "them); predict/evaluate take OUT as their ensemble.",
                                        rich_help_panel="Validation"),
    fold: Optional[int] = typer.Option(None, "--fold", help="Train only this fold (0..K-1) into OUT/fold_K, "
                                       "e.g. one Slurm array task per fold. (default: every fold)",
                                       rich_help_panel="Validation"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. (default: auto)",
                                         rich_help_panel="Devices and speed"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision: bf16, or fp16 with a grad "
                                                                    "scaler where bf16 is missing. (default: on "
                                                                    "for CPUs with native bf16, else off)",
                                       rich_help_panel="Devices and speed"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Channels-last memory format. (default: with "
                                                      "the CPU's bf16 default)",
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
        "model_options": _model_options(model_options), "spatial_dims": dims, "context": context, "task": task,
        "ignore_index": ignore_index, "loss": loss, "bce_weight": bce_weight, "augment": augment, "epochs": epochs,
        "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
        "patch_size": parse_numbers(patch_size, "--patch-size"), "uniform_share": uniform_share,
        "foreground_share": foreground_share, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
        "momentum": momentum, "nesterov": nesterov, "schedule": schedule, "warmup_epochs": warmup_epochs,
        "lr_patience": lr_patience, "lr_factor": lr_factor, "clip_grad": clip_grad, "patience": patience,
        "val_fraction": val_fraction, "split": split, "folds": folds, "fold": fold, "device": device, "amp": amp,
        "channels_last": channels_last, "compile": compile_model, "workers": workers, "seed": seed,
        "log_every": log_every, "time_limit": time_limit, "size": parse_numbers(size, "--size", count=(2, 3)), "modalities": modalities,
    }
    given = {key: value for key, value in settings.items() if value is not None and value != {}}
    summary = train(data, model=model, out=out, resume=resume, overwrite=overwrite, **given)
    if as_json and os.environ.get("RANK", "0") == "0":
        print_json(summary)


@app.command("plan", epilog=examples("mriseg plan cache/brats --time 15m",
                                     "mriseg plan cache/brats --time 2h --device cuda --json"))
def plan_command(
    data: str = typer.Argument(..., help="Preprocess cache (what mriseg train would read)."),
    time_limit: str = typer.Option(..., "--time", help="Wall-clock budget, e.g. 5m, 15m, 4h."),
    model: Optional[str] = typer.Option(None, "--model", help="Network name, taken as given."),
    dims: Optional[int] = typer.Option(None, "--dims", help="2 or 3, taken as given."),
    model_options: Optional[str] = typer.Option(None, "--model-options", help="e.g. features=32, taken as given."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Taken as given."),
    context: Optional[int] = typer.Option(None, "--context", help="2.5D neighbouring slices, taken as given."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="As train's. (default: 0.2)"),
    patch_size: Optional[str] = typer.Option(None, "--patch-size", help="Training window, taken as given."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. (default: auto)"),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Print the recipe mriseg train DATA --time T would choose, and why, without training (with
    --folds K each fold plans for its share of T: pass that share)."""
    from mriseg.train import plan_training

    settings = {"spatial_dims": dims, "model_options": _model_options(model_options), "batch_size": batch_size,
                "context": context, "val_fraction": val_fraction,
                "patch_size": parse_numbers(patch_size, "--patch-size"), "device": device}
    plan = plan_training(data, time_limit, model=model,
                         **{key: value for key, value in settings.items() if value is not None and value != {}})
    if as_json:
        print_json(plan.to_dict())
        return
    for reason in plan.reasons:
        print(reason)
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print("measured: " + ", ".join(f"{key} {value}" for key, value in plan.measured.items()))
