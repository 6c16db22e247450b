"""Inference speed of ``mriseg predict``'s engines, measured side by side in one run.

1. 3D sliding window: mriseg's ``sliding_window_predict`` against MONAI's
   ``sliding_window_inference`` on the same volume with the same network, patch, overlap,
   windows per batch and Gaussian weighting. Runs alternate (mriseg, MONAI, mriseg, ...) so
   that load on a shared machine hits both alike; the median time of each is reported with
   their ratio and the largest absolute difference between the two outputs.
2. 2D slice-wise: volumes per second for a 155-slice volume through a 2D U-Net.

Needs MONAI for part 1: ``pip install -e ".[bench]"``.

    python benchmarks/predict.py                    # CPU defaults
    python benchmarks/predict.py --device cuda --size 240,240,155 --features 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from mriseg.models import build_model
from mriseg.inference import slicewise as slicewise_predict
from mriseg.inference import sliding_window as sliding_window_predict


def timed(run) -> tuple[float, torch.Tensor]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def compare_sliding_window(args: argparse.Namespace, device: torch.device) -> None:
    from monai.inferers import sliding_window_inference

    size = tuple(int(s) for s in args.size.split(","))
    patch = (args.patch,) * 3
    torch.manual_seed(0)
    # --engine-only swaps the U-Net for a 1x1x1 convolution, leaving the engines' own overhead.
    network = (torch.nn.Conv3d(2, 3, 1) if args.engine_only
               else build_model("unet3d", 2, 3, spatial_dims=3, features=args.features)).to(device).eval()
    model_name = "1x1x1 conv" if args.engine_only else f"unet3d (features {args.features})"
    volume = torch.randn(2, *size, device=device)
    def ours() -> torch.Tensor:
        return sliding_window_predict(network, volume, patch, args.overlap, args.batch_size)

    def monai() -> torch.Tensor:
        return sliding_window_inference(volume[None], patch, args.batch_size, network, overlap=args.overlap,
                                        mode="gaussian")[0]

    times: dict[str, list[float]] = {"mriseg": [], "MONAI": []}
    outputs: dict[str, torch.Tensor] = {}
    for run in (ours, monai):  # untimed: the first pass builds oneDNN's kernels for every shape
        timed(run)
    for repeat in range(args.repeats):
        # Alternate which goes first, so that a slow spell on a shared machine hits both alike.
        order = [("mriseg", ours), ("MONAI", monai)][::1 if repeat % 2 == 0 else -1]
        for name, run in order:
            seconds, outputs[name] = timed(run)
            times[name].append(seconds)
    difference = (outputs["mriseg"] - outputs["MONAI"]).abs().max().item()
    print(f"3D sliding window, {model_name}, volume {size}, patch {patch}, "
          f"overlap {args.overlap}, {args.batch_size} windows per batch, gaussian, {args.repeats} runs each:")
    for name, values in times.items():
        print(f"  {name:6s} min {min(values):.2f} s   median {statistics.median(values):.2f} s")
    print(f"  ratio mriseg/MONAI: min {min(times['mriseg']) / min(times['MONAI']):.3f}   median "
          f"{statistics.median(times['mriseg']) / statistics.median(times['MONAI']):.3f}   "
          f"max |difference| {difference:.2e}")


def slicewise_throughput(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    network = build_model("unet", 3, 1, spatial_dims=2, features=args.features_2d).to(device).eval()
    volume = torch.randn(3, args.slices, args.slice_size, args.slice_size, device=device)
    timed(lambda: slicewise_predict(network, volume[:, :args.batch_size_2d], 0, args.batch_size_2d))  # warm-up
    times = [timed(lambda: slicewise_predict(network, volume, 0, args.batch_size_2d))[0]
             for _ in range(args.repeats_2d)]
    seconds = statistics.median(times)
    print(f"2D slice-wise, unet (features {args.features_2d}), {args.slices} slices of "
          f"{args.slice_size}x{args.slice_size}, batch {args.batch_size_2d}, {args.repeats_2d} runs:")
    print(f"  {seconds:.2f} s per volume = {1 / seconds:.3f} volumes/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="128,128,128", help="3D volume D,H,W")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2, help="3D windows per forward pass")
    parser.add_argument("--features", type=int, default=4, help="unet3d width")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--slice-size", type=int, default=240)
    parser.add_argument("--features-2d", type=int, default=8, help="2D unet width (the registry default is 32)")
    parser.add_argument("--batch-size-2d", type=int, default=16)
    parser.add_argument("--repeats-2d", type=int, default=1)
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--engine-only", action="store_true",
                        help="3D part only, with a 1x1x1 convolution instead of the U-Net")
    args = parser.parse_args()
    device = torch.device(args.device)
    processor = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {processor}")
    if not args.skip_3d:
        compare_sliding_window(args, device)
    if not args.engine_only:
        slicewise_throughput(args, device)


if __name__ == "__main__":
    main()
