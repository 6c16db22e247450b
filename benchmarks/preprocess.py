"""Preprocessing speed, measured side by side in one run.

1. Nearest-neighbour resize of a 240x240x155x4 float32 volume to 128x128x128 (channels first,
   as in the cache) against
   a. the seeds' per-voxel Python loop (timed on a sub-volume, scaled by the voxel count),
   b. one fancy-indexing gather ``x[:, i[:, None, None], j[None, :, None], k[None, None, :]]``,
   c. ``np.copyto`` of an array of the output size: the memory-bound floor.
2. Loading one preprocessed case from the cache against decoding its source .nii.gz files
   and preprocessing them (the cost a cache saves every epoch).

Run: ``python benchmarks/preprocess.py`` (about a minute). ``--case FOLDER`` (with
``--modalities``) measures loading on a real BraTS case instead of a synthetic one.
Timings are the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mriseg.data.cache import build_cache, open_cache  # noqa: E402
from mriseg.data.preprocess import PreprocessParams, nearest_indices, preprocess_case, resize_nearest  # noqa: E402
from mriseg.data.readers import list_cases, read_case  # noqa: E402
from mriseg.data.synthetic import write_synthetic  # noqa: E402

IN_SHAPE = (240, 240, 155)
OUT_SHAPE = (128, 128, 128)
CHANNELS = 4
LOOP_SUBVOLUME = 16  # the loop is timed on a 16^3 output block and scaled up


def best_time(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def seed_loop(image: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """The seeds' resize: one Python iteration per output voxel on a channels-last volume."""
    result = np.zeros((*out_shape, image.shape[-1]), dtype=image.dtype)
    for i in range(out_shape[0]):
        for j in range(out_shape[1]):
            for k in range(out_shape[2]):
                result[i, j, k] = image[i * IN_SHAPE[0] // OUT_SHAPE[0], j * IN_SHAPE[1] // OUT_SHAPE[1],
                                        k * IN_SHAPE[2] // OUT_SHAPE[2]]
    return result


def resize_benchmark(repeat: int) -> dict[str, float]:
    volume = np.random.default_rng(0).normal(size=(CHANNELS, *IN_SHAPE)).astype(np.float32)
    channels_last = np.ascontiguousarray(np.moveaxis(volume, 0, -1))
    out = np.empty((CHANNELS, *OUT_SHAPE), dtype=np.float32)
    filler = np.ones_like(out)
    i, j, k = (nearest_indices(n, m) for n, m in zip(IN_SHAPE, OUT_SHAPE))
    reference = volume[:, i[:, None, None], j[None, :, None], k[None, None, :]]
    assert np.array_equal(resize_nearest(volume, OUT_SHAPE), reference)
    block = (LOOP_SUBVOLUME,) * 3
    loop_block = best_time(lambda: seed_loop(channels_last, block), max(1, repeat // 2))
    return {
        "copy_floor_s": best_time(lambda: np.copyto(out, filler), repeat),
        "vectorised_s": best_time(lambda: resize_nearest(volume, OUT_SHAPE), repeat),
        "fancy_gather_s": best_time(lambda: volume[:, i[:, None, None], j[None, :, None], k[None, None, :]], repeat),
        "seed_loop_s": loop_block * np.prod(OUT_SHAPE) / np.prod(block),
    }


def load_benchmark(case_folder: Path | None, modalities: str | None, repeat: int, work: Path) -> dict[str, float]:
    if case_folder is None:
        write_synthetic(work / "raw", layout="brats", cases=1, seed=0, size=IN_SHAPE)
        case_folder = work / "raw" / "BraTS2021_S0001"
    ref = list_cases(case_folder, layout="brats", modalities=modalities)[0]
    params = PreprocessParams(size=OUT_SHAPE, crop=True, dtype="float16")
    build_cache(case_folder, work / "cache", params, layout="brats", modalities=modalities)
    cache = open_cache(work / "cache")
    case_id = cache.case_ids[0]

    def from_source() -> None:
        preprocess_case(read_case(ref), params)

    def from_cache() -> None:
        np.load(work / "cache" / "cases" / case_id / "image.npy")
        np.load(work / "cache" / "cases" / case_id / "label.npy")

    from_cache()  # warm the page cache for both, so both read from memory
    from_source()
    return {"case": str(case_folder), "channels": len(ref.image_paths),
            "decode_and_preprocess_s": best_time(from_source, repeat),
            "cached_load_s": best_time(from_cache, repeat * 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best counts")
    parser.add_argument("--case", type=Path, help="a BraTS case folder to load (default: a synthetic one)")
    parser.add_argument("--modalities", help="--modalities map for --case")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    resize = resize_benchmark(args.repeat)
    with tempfile.TemporaryDirectory() as work:
        load = load_benchmark(args.case, args.modalities, max(2, args.repeat // 2), Path(work))
    ratios = {
        "vectorised_over_copy_floor": resize["vectorised_s"] / resize["copy_floor_s"],
        "seed_loop_over_vectorised": resize["seed_loop_s"] / resize["vectorised_s"],
        "fancy_gather_over_vectorised": resize["fancy_gather_s"] / resize["vectorised_s"],
        "source_over_cached_load": load["decode_and_preprocess_s"] / load["cached_load_s"],
    }
    if args.json:
        print(json.dumps({"resize": resize, "load": load, "ratios": ratios}, indent=1))
        return
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
          f"numpy {np.__version__}")
    print(f"resize {CHANNELS}x{'x'.join(map(str, IN_SHAPE))} float32 -> {'x'.join(map(str, OUT_SHAPE))} "
          f"(best of {args.repeat})")
    print("| method | time (ms) | ratio |")
    print("|---|---|---|")
    print(f"| np.copyto of the output size (floor) | {resize['copy_floor_s'] * 1e3:.1f} | 1.0 |")
    for name, key in (("mriseg resize_nearest", "vectorised_s"), ("one fancy-index gather", "fancy_gather_s"),
                      ("seeds' per-voxel loop (scaled from 16^3)", "seed_loop_s")):
        print(f"| {name} | {resize[key] * 1e3:.1f} | {resize[key] / resize['copy_floor_s']:.1f} |")
    print(f"\nseeds' loop / mriseg resize: {ratios['seed_loop_over_vectorised']:.0f}x")
    print(f"\nload one case ({load['channels']} channels, {load['case']})")
    print("| method | time (ms) |")
    print("|---|---|")
    print(f"| decode .nii.gz + preprocess | {load['decode_and_preprocess_s'] * 1e3:.1f} |")
    print(f"| np.load from the cache | {load['cached_load_s'] * 1e3:.1f} |")
    print(f"\ncached load is {ratios['source_over_cached_load']:.0f}x faster")


if __name__ == "__main__":
    main()
