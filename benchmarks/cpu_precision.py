"""Training and inference step time per precision and memory format, every model, side by side.

For each model: one training step (forward, loss, backward, Adam) and one inference batch in
four settings, interleaved round by round so load hits all alike: float32, bfloat16 autocast,
channels-last, and bfloat16 + channels-last. Prints the median time of each and its speed-up
over float32, and which setting ``mriseg`` picks by default on this machine
(:func:`mriseg.devices.choose_precision`).

    python benchmarks/cpu_precision.py                       # every model, CPU, torch's threads
    python benchmarks/cpu_precision.py --models unet,unet3d --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mriseg.devices import choose_precision
from mriseg.losses import build_loss
from mriseg.models import build_model

SETTINGS = {"fp32": (False, False), "bf16": (True, False), "channels-last": (False, True),
            "bf16+channels-last": (True, True)}

# (model, spatial dims, input shape without the batch, batch, model options)
CASES = {
    "unet": (2, (2, 128, 128), 8, {}),
    "attention-unet": (2, (2, 128, 128), 8, {}),
    "resunet": (2, (2, 128, 128), 8, {}),
    "unetpp": (2, (2, 128, 128), 8, {}),
    "gruunet": (2, (2, 64, 64), 4, {}),
    "unet3d": (3, (2, 64, 64, 64), 2, {"features": 16}),
    "tiny3d": (3, (4, 48, 48, 47), 2, {}),
}


def step_runner(name: str, amp: bool, channels_last: bool, training: bool):
    dims, shape, batch, options = CASES[name]
    torch.manual_seed(0)
    network = build_model(name, shape[0], 1, spatial_dims=dims, **options)
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    if channels_last:
        network = network.to(memory_format=memory_format)
    images = torch.randn(batch, *shape)
    if channels_last:
        images = images.contiguous(memory_format=memory_format)
    loss_fn = build_loss("bce-dice", "sigmoid")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    def train_once() -> None:
        with autocast:
            outputs = network(images)
        outputs = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        target = (torch.rand(outputs.shape) > 0.8).float()
        loss_fn(outputs.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_once() -> None:
        with torch.inference_mode(), autocast:
            network.eval()(images)

    return train_once if training else infer_once


def measure(name: str, repeats: int, training: bool) -> dict[str, float]:
    runners = {label: step_runner(name, *flags, training=training) for label, flags in SETTINGS.items()}
    for run in runners.values():
        run()  # warm-up: allocator, oneDNN kernels
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, run in runners.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--inference", action="store_true", help="time inference batches instead of training")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = choose_precision(torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; mriseg's default here: {chosen.describe()}")
    kind = "inference batch" if args.inference else "training step"
    print(f"\n{kind}, median of {args.repeats} (ms); speed-up over fp32 in brackets\n")
    print("| model | input | " + " | ".join(SETTINGS) + " |")
    print("|---|---|" + "---:|" * len(SETTINGS))
    for name in args.models.split(","):
        dims, shape, batch, _ = CASES[name]
        result = measure(name, args.repeats, training=not args.inference)
        cells = [f"{result[label] * 1000:.0f} ({result['fp32'] / result[label]:.2f}x)" for label in SETTINGS]
        print(f"| {name} | {batch}x{'x'.join(map(str, shape))} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
