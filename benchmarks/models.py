"""Parameters and forward+backward time per sample for every mriseg model, side by side with
MONAI's closest network at the same width (BasicUNet, AttentionUnet, BasicUNetPlusPlus).

    python benchmarks/models.py                 # CPU, 2D 2x3x128x128, 3D 2x3x48x48x48 (tiny3d 2x4x48x48x47)
    python benchmarks/models.py --device cuda --size 256 --batch 8
    python benchmarks/models.py --json

MONAI is only needed here (``pip install -e ".[bench]"``); without it the mriseg rows are still
measured. Timings of a pair are interleaved (A, B, A, B, ...) and the median is reported, so
load that comes and goes hits both sides alike; the ratio is mriseg time / MONAI time. The
GFLOP columns count the convolution and matmul work of a forward+backward pass (torch's
FlopCounterMode), so "ratio per GFLOP" compares speed per unit of work where the two networks of
a pair differ in design (MONAI's AttentionUnet has one convolution per decoder level, the U-Net
of Oktay et al. two).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mriseg.models import build_model, count_parameters  # noqa: E402


def monai_counterparts(spatial_dims: int, in_channels: int, out_channels: int) -> dict[str, Callable[[], nn.Module]]:
    """MONAI networks at mriseg's default width (features 32, 64, 128, 256, 512), by mriseg name."""
    try:
        from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus
    except ImportError:
        return {}
    widths = (32, 64, 128, 256, 512)
    return {
        "unet": lambda: BasicUNet(spatial_dims, in_channels, out_channels, features=(*widths, 32)),
        "attention-unet": lambda: AttentionUnet(spatial_dims, in_channels, out_channels, channels=widths,
                                                strides=(2, 2, 2, 2)),
        "unetpp": lambda: BasicUNetPlusPlus(spatial_dims, in_channels, out_channels, features=(*widths, 32),
                                            deep_supervision=True),
    }


def training_step(model: nn.Module, x: torch.Tensor) -> None:
    output = model(x)
    heads = output if isinstance(output, (list, tuple)) else [output]
    sum(head.float().mean() for head in heads).backward()
    model.zero_grad(set_to_none=True)


def training_gflop(model: nn.Module, x: torch.Tensor) -> float:
    """Convolution and matmul GFLOP of one forward+backward pass per sample (a multiply-add counts 2),
    counted by torch's FlopCounterMode: the work a model asks for, whatever its speed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        training_step(model, x)
    return counter.get_total_flops() / x.shape[0] / 1e9


def time_steps(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Seconds for one forward+backward pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    training_step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(models: dict[str, nn.Module], x: torch.Tensor, device: torch.device, repeats: int,
            warmup: int) -> dict[str, float]:
    """Median seconds per sample of each model, the models' runs interleaved."""
    for model in models.values():
        model.to(device).train()
        for _ in range(warmup):
            training_step(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(time_steps(model, x, device))
    return {name: statistics.median(values) / x.shape[0] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="2D input size (square)")
    parser.add_argument("--size-3d", type=int, default=48, help="3D input size (cube; tiny3d uses depth size-1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--models", default="unet,attention-unet,unetpp,resunet,gruunet,unet3d,tiny3d")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    rows = []
    for name in args.models.split(","):
        spatial_dims = 3 if name in ("unet3d", "tiny3d") else 2
        in_channels, out_channels = (4, 1) if name == "tiny3d" else (3, 1)
        if spatial_dims == 2:
            size = (args.size, args.size)
        else:
            size = (args.size_3d, args.size_3d, args.size_3d - 1 if name == "tiny3d" else args.size_3d)
        x = torch.randn(args.batch, in_channels, *size, device=device)
        candidates = {"mriseg": build_model(name, in_channels, out_channels, spatial_dims=spatial_dims)}
        counterpart = monai_counterparts(spatial_dims, in_channels, out_channels).get(name)
        if counterpart is not None:
            candidates["monai"] = counterpart()
        seconds = measure(candidates, x, device, args.repeats, args.warmup)
        gflop = {side: training_gflop(model, x) for side, model in candidates.items()}
        row = {"model": name, "input": [args.batch, in_channels, *size],
               "params": count_parameters(candidates["mriseg"]), "gflop_per_sample": gflop["mriseg"],
               "ms_per_sample": 1000 * seconds["mriseg"]}
        if "monai" in candidates:
            row.update(monai_model=type(candidates["monai"]).__name__,
                       monai_params=count_parameters(candidates["monai"]), monai_gflop_per_sample=gflop["monai"],
                       monai_ms_per_sample=1000 * seconds["monai"], ratio=seconds["mriseg"] / seconds["monai"],
                       # time per unit of work: below 1, mriseg does each FLOP faster
                       ratio_per_gflop=(seconds["mriseg"] / gflop["mriseg"]) / (seconds["monai"] / gflop["monai"]))
        rows.append(row)
        for model in candidates.values():
            model.cpu()

    if args.json:
        print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, indent=1))
        return
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved forward+backward passes")
    print("| model | input | params | GFLOP/sample | ms/sample | MONAI model | MONAI params | MONAI GFLOP/sample "
          "| MONAI ms/sample | ratio | ratio per GFLOP |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        monai = (f"{row['monai_model']} | {row['monai_params']:,} | {row['monai_gflop_per_sample']:.2f} | "
                 f"{row['monai_ms_per_sample']:.1f} | {row['ratio']:.2f} | {row['ratio_per_gflop']:.2f}"
                 if "ratio" in row else "- | - | - | - | - | -")
        print(f"| {row['model']} | {'x'.join(map(str, row['input']))} | {row['params']:,} | "
              f"{row['gflop_per_sample']:.2f} | {row['ms_per_sample']:.1f} | {monai} |")


if __name__ == "__main__":
    main()
