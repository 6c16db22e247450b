"""``mriseg benchmark``: parse the options, call :func:`mriseg.benchmark.run_benchmark`, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mriseg.cli.common import app, examples, print_json
from mriseg.errors import MrisegError
from mriseg.files import check_writable_folder
from mriseg.options import parse_numbers


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
