"""Steady-state training step time: ``mriseg train`` against a bare PyTorch loop, in one run.

Both sides use the same network (``build_model``), batch size, loss (``build_loss``) and
optimiser (Adam); the bare loop trains on batches already in memory, so the ratio is the cost
of everything mriseg adds (DataLoader from the memory-mapped cache, per-step metrics line,
loss check, lr schedule). mriseg's step time and data-wait time come from its own
metrics.jsonl. The two are measured alternately, ``--rounds`` times, and the fastest round of
each is compared, which keeps noise from other processes out of the ratio.

    python benchmarks/train_step.py                      # synthetic LGG default, CPU
    python benchmarks/train_step.py --device cuda --batch-size 32 --features 32 --amp
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mriseg.data.cache import open_cache  # noqa: E402
from mriseg.data.synthetic import default_dataset  # noqa: E402
from mriseg.losses import build_loss  # noqa: E402
from mriseg.models import build_model  # noqa: E402
from mriseg.devices import choose_device  # noqa: E402
from mriseg.train import train  # noqa: E402


def in_memory_batches(cache_path: Path, batch_size: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of random labelled slices, loaded up front (the bare loop's data)."""
    cache = open_cache(cache_path)
    rng = np.random.default_rng(seed)
    slices = []
    for case_id in cache.case_ids:
        image, label, axis = cache.image(case_id), cache.label(case_id), cache.record(case_id)["slice_axis"] or 0
        for index in range(label.shape[axis]):
            slices.append((np.take(image, index, axis=axis + 1), np.take(label, index, axis=axis)))
    batches = []
    for _ in range(count):
        chosen = [slices[i] for i in rng.integers(len(slices), size=batch_size)]
        images = torch.from_numpy(np.stack([c[0] for c in chosen]).astype(np.float32))
        labels = torch.from_numpy(np.stack([c[1] for c in chosen]).astype(np.float32)).unsqueeze(1)
        batches.append((images, labels))
    return batches


def bare_loop(args, in_channels: int, batches, device: torch.device) -> float:
    """Seconds per step of a plain forward / loss / backward / step loop, after warm-up."""
    torch.manual_seed(0)
    model = build_model("unet", in_channels, 1, spatial_dims=2, features=args.features).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss("dice", "sigmoid")
    amp_dtype = torch.bfloat16 if args.amp else None
    batches = [(images.to(device), labels.to(device)) for images, labels in batches]
    started = 0.0
    for step, (images, labels) in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        loss = loss_fn(output, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / (len(batches) - args.warmup)


def mriseg_loop(args, cache_path: Path, val_case: str, train_cases: list[str], work: Path,
                round_index: int) -> tuple[float, float]:
    """Seconds per step and data-wait share of ``mriseg train``, from its metrics.jsonl."""
    split = work / "split.json"
    split.write_text(json.dumps({"train": train_cases, "val": [val_case]}))
    run_dir = work / f"run{round_index}"
    train(cache_path, model="unet", out=run_dir, model_options={"features": args.features}, loss="dice",
          optimizer="adam", lr=1e-3, batch_size=args.batch_size, epochs=1, steps_per_epoch=args.warmup + args.steps,
          augment="none", split=str(split), device=args.device, amp=args.amp, workers=args.workers,
          log_every=10 ** 9)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [s for s in steps if s["kind"] == "step"][args.warmup:]
    step_time = sum(s["step_time"] for s in steady)
    return step_time / len(steady), sum(s["data_wait"] for s in steady) / step_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="preprocess cache (default: the synthetic LGG default, 128x128)")
    parser.add_argument("--features", type=int, default=16, help="U-Net width")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--workers", type=int, default=None, help="mriseg DataLoader workers (default: mriseg's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cache_path = Path(args.data) if args.data else default_dataset(layout="lgg")
    cache = open_cache(cache_path)
    device = choose_device(args.device, None)
    batches = in_memory_batches(cache_path, args.batch_size, args.warmup + args.steps)
    case_ids = cache.case_ids
    bare_times, mriseg_times, waits = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for round_index in range(args.rounds):
            bare_times.append(bare_loop(args, len(cache.modalities), batches, device))
            seconds, wait = mriseg_loop(args, cache_path, case_ids[-1], case_ids[:-1], Path(work), round_index)
            mriseg_times.append(seconds)
            waits.append(wait)
    best = int(np.argmin(mriseg_times))
    result = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "model": f"unet features={args.features}",
        "batch": f"{args.batch_size} x {len(cache.modalities)} x {'x'.join(map(str, batches[0][0].shape[2:]))}",
        "amp": args.amp, "steps_per_round": args.steps, "rounds": args.rounds,
        "bare_s_per_step": min(bare_times), "mriseg_s_per_step": mriseg_times[best],
        "ratio": mriseg_times[best] / min(bare_times), "mriseg_data_wait_share": waits[best],
        "all_rounds": {"bare": bare_times, "mriseg": mriseg_times, "data_wait_share": waits},
        "median_ratio": statistics.median(mriseg_times) / statistics.median(bare_times),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']} ({result['torch_threads']} threads), {result['model']}, batch {result['batch']}, "
          f"{args.steps} steps x {args.rounds} rounds")
    print(f"bare PyTorch loop   {result['bare_s_per_step'] * 1000:8.1f} ms/step")
    print(f"mriseg train        {result['mriseg_s_per_step'] * 1000:8.1f} ms/step   "
          f"(data wait {result['mriseg_data_wait_share'] * 100:.1f}% of the step)")
    print(f"ratio mriseg / bare {result['ratio']:8.3f}   (median over rounds {result['median_ratio']:.3f})")


if __name__ == "__main__":
    main()
