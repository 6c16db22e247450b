"""``mriseg synth``, ``mriseg preprocess`` and ``mriseg models``: the data and the model zoo."""

from __future__ import annotations

from typing import Optional

import typer

from mriseg.cli.common import app, examples, print_json


@app.command(epilog=examples("mriseg synth data/synth-lgg --layout lgg --cases 16 --size 20,128,128",
                             "mriseg synth data/synth-brats --layout brats --cases 4 --seed 1"))
def synth(
    out: str = typer.Argument(..., help="Folder to write the synthetic cases into."),
    layout: str = typer.Option("lgg", help="lgg (kaggle_3m TIF slices) | brats (BraTS 2021 NIfTI).",
                               rich_help_panel="Data"),
    cases: int = typer.Option(16, help="Number of cases (patients).", rich_help_panel="Data"),
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
    workers: int = typer.Option(1, help="Cases processed in parallel.", rich_help_panel="Output"),
    force: bool = typer.Option(False, help="Rebuild the cache: redo every case (needed for a cache made with "
                               "other parameters).", rich_help_panel="Output"),
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
