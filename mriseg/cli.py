"""The ``mriseg`` command line: parse arguments, call the library, print.

Every command is a thin wrapper over a function in the library; nothing here
computes anything. Errors the user can fix (:class:`~mriseg.errors.MrisegError`)
become one line on stderr and exit code 2, unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Optional

import typer

from mriseg import __version__
from mriseg.errors import MrisegError
from mriseg.log import console

app = typer.Typer(
    name="mriseg",
    help="Brain MRI tumour segmentation: preprocess, train, predict, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False}


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

# --- preprocess --------------------------------------------------------------

# --- models ------------------------------------------------------------------

# --- train -------------------------------------------------------------------

# --- predict -----------------------------------------------------------------

@app.command()
def predict(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, case or patient folders, 2D images, globs; "
                                                 "- reads one path per line from stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Run folder or .pt checkpoint "
                                        "[default: $MRISEG_MODEL, else runs/latest]."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder [default: ./predictions/]."),
    overlap: float = typer.Option(0.5, min=0.0, max=0.95, help="3D models: overlap of sliding windows."),
    patch_size: Optional[str] = typer.Option(None, "--patch-size",
                                             help="3D models: window D,H,W [default: the checkpoint's]."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Slices (2D) or windows (3D) per forward pass."),
    tta: bool = typer.Option(False, "--tta", help="Average predictions over all axis flips."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision (float16 on CUDA, bfloat16 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="Binary and region tasks: probability cut-off."),
    largest_component: bool = typer.Option(False, "--largest-component",
                                           help="Keep only the largest connected tumour blob."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write the soft maps."),
    overlay: bool = typer.Option(False, "--overlay", help="PNG per tumour slice: prediction red, truth green."),
    overlay_modality: Optional[str] = typer.Option(None, "--overlay-modality",
                                                   help="Channel drawn under outlines [default: flair if present]."),
    all_slices: bool = typer.Option(False, "--all-slices", help="Overlays and GIFs of every slice."),
    labels: Optional[str] = typer.Option(None, "--labels", help="True labels to outline (file, or folder of "
                                          "files named after the cases) [default: labels found beside the input]."),
    gif: bool = typer.Option(False, "--gif", help="One animated GIF per volume through its slices."),
    fps: float = typer.Option(10.0, "--fps", min=0.1, help="GIF frames per second."),
    modalities: Optional[str] = typer.Option(None, "--modalities",
                                             help="File-name map for case folders, e.g. flair=Flair_,t1ce=T1c_."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: take every n-th input from the i-th "
                                        "(0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per case on stdout."),
) -> None:
    """Segment MRI volumes or images with a trained model; masks keep the input's geometry."""
    # Imported here so that `mriseg --help` and other commands do not pay for importing torch.
    from pathlib import Path

    from mriseg import predict as predict_module
    from mriseg.log import info

    options = predict_module.PredictOptions(
        out=Path(out) if out is not None else predict_module.DEFAULT_OUT, overlap=overlap, batch_size=batch_size, patch_size=_parse_patch_size(patch_size), tta=tta,
        amp=amp, device=device, threshold=threshold, largest_component=largest_component,
        probabilities=probabilities, overlay=overlay, overlay_modality=overlay_modality, all_slices=all_slices,
        labels=Path(labels) if labels is not None else None, gif=gif, gif_fps=fps, modalities=modalities, overwrite=overwrite)

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
    if results and failed == len(results):
        raise MrisegError(f"all {failed} case(s) failed; nothing was written")
    if failed:
        info(f"{failed} of {len(results)} case(s) failed (see the errors above)")
        raise typer.Exit(1)
    if not results:
        info("nothing to do: this shard holds no inputs")


def _parse_patch_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise MrisegError(f"--patch-size must be numbers like 128,128,128, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise MrisegError(f"--patch-size needs three positive numbers (D,H,W), got {text!r}")
    return size

# --- evaluate ----------------------------------------------------------------

# --- benchmark ---------------------------------------------------------------

# --- demo --------------------------------------------------------------------


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
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        console.print("interrupted", style="red")
        sys.exit(130)
