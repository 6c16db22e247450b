"""``mriseg predict``: parse the options, call :func:`mriseg.predict.predict`, print each case."""

from __future__ import annotations

from typing import Optional

import typer

from mriseg.cli.common import app, examples, print_json
from mriseg.log import console
from mriseg.options import parse_numbers


@app.command(epilog=examples(
    "mriseg predict volume.nii.gz",
    "mriseg predict data/brats/*/ --model runs/latest --overlay --gif",
    "find scans -name '*.nii.gz' | mriseg predict - --json --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"))
def predict(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, case or patient folders, 2D images, globs; "
                                                 "- reads one path per line from stdin."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", metavar="RUN", help="Run folder or .pt checkpoint "
                                              "(default: $MRISEG_MODEL, else runs/latest). Repeat it, or give a "
                                              "folder of folds (train --folds), for an ensemble that averages "
                                              "the probabilities.", rich_help_panel="Model and output"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder (default: ./predictions/).",
                                      rich_help_panel="Model and output"),
    overlap: float = typer.Option(0.5, help="3D models: overlap of sliding windows.",
                                  rich_help_panel="Inference"),
    patch_size: Optional[str] = typer.Option(None, "--patch-size",
                                             help="3D models: window D,H,W (default: the checkpoint's).",
                                             rich_help_panel="Inference"),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices (2D) or windows (3D) per forward pass.",
                                   rich_help_panel="Inference"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta",
                                       help="Average predictions over all axis flips. Default: on for 2D "
                                            "models, off for 3D (8 views; slow on a CPU).",
                                       rich_help_panel="Inference"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp",
                                       help="Mixed precision: bfloat16 (float16 on GPUs without it). Default: on "
                                            "for CPUs with native bfloat16, else off.", rich_help_panel="Inference"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Channels-last memory format (default: with the CPU's "
                                                      "bfloat16 default).", rich_help_panel="Inference"),
    interpolation: str = typer.Option("linear", "--interpolation",
                                      help="Back to the source grid: linear (probabilities, then decoded there) "
                                           "or nearest (labels).", rich_help_panel="Inference"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps.", rich_help_panel="Inference"),
    naming: Optional[str] = typer.Option(None, "--naming",
                                         help="NIfTI mask names: mriseg (<case>_seg.nii.gz), nnunet or brats "
                                              "(<case>.nii.gz). Default: nnunet for nnU-Net/MSD inputs, else mriseg.",
                                         rich_help_panel="Output"),
    subset: Optional[str] = typer.Option(None, "--subset",
                                         help="An nnU-Net/MSD dataset root: predict imagesTs (the default when "
                                              "present) or imagesTr.", rich_help_panel="Inference"),
    threshold: Optional[float] = typer.Option(None, help="Binary and region tasks: probability cut-off in (0, 1) "
                                              "(default: the checkpoint's, 0.5).",
                                    rich_help_panel="Post-processing"),
    largest_component: Optional[bool] = typer.Option(
        None, "--largest-component/--no-largest-component",
        help="Keep only the largest connected tumour blob. (default: what train --folds chose by "
             "cross-validation for a folder of folds, else off)", rich_help_panel="Post-processing"),
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
    fps: float = typer.Option(10.0, "--fps", help="GIF frames per second.", rich_help_panel="Pictures"),
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
        patch_size=parse_numbers(patch_size, "--patch-size", count=3), tta=tta, amp=amp, channels_last=channels_last,
        device=device,
        threshold=threshold,
        largest_component=largest_component, probabilities=probabilities, overlay=overlay,
        overlay_modality=overlay_modality, all_slices=all_slices, labels=Path(labels) if labels is not None else None,
        gif=gif, gif_fps=fps, modalities=modalities, overwrite=overwrite, interpolation=interpolation,
        naming=naming, subset=subset)
    options.check()  # every option's range, before the model is loaded

    def report(result: predict_module.CaseResult) -> None:
        if json_output:
            print_json(result.as_json())
        elif result.status == "ok":
            info(f"{result.case_id}: {result.outputs.get('mask')} ({result.volume_ml:.2f} mL, {result.seconds:.1f} s)")
        if result.status != "ok":
            console.print(f"error: {result.error}", markup=False, style="red", soft_wrap=True)

    chosen = (model if len(model) > 1 else model[0]) if model else None
    results = predict_module.predict(inputs, model=chosen, options=options,
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
