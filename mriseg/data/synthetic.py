"""Synthetic brain MRI with tumours, written in the real on-disk formats.

Each case is a head phantom built from smooth random fields: scalp, skull, cerebrospinal
fluid, grey and white matter, two lateral ventricles, and (in most cases) a tumour with a
necrotic core, an enhancing rim and surrounding oedema. Every tissue has its own intensity
in each modality (T1, T1 post-contrast, T2, FLAIR), followed by partial-volume blur, a smooth
multiplicative bias field and Rician noise. Case ``i`` depends only on ``(seed, i)``, so a
dataset is reproducible and growing ``--cases`` keeps the earlier cases unchanged.

Formats: ``lgg`` writes kaggle_3m folders (RGB TIF slices of pre-contrast, FLAIR and
post-contrast, 0/255 mask TIFs of the whole FLAIR abnormality); ``brats`` writes BraTS
2018-2021 folders (skull-stripped ``_t1 _t1ce _t2 _flair`` int16 NIfTI and a ``_seg`` with
labels 0 background, 1 necrosis, 2 oedema, 4 enhancing tumour).

:func:`default_dataset` is the embedded dataset that ``mriseg train`` (no DATA) uses: generated
and preprocessed once into ``$MRISEG_HOME``. ``mriseg demo`` writes its own cases into its folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mriseg import log
from mriseg import options as checks
from mriseg.files import folder_in_place, temporary_folder_beside
from mriseg.errors import BadInputError, MrisegError

# Tissue indices of the phantom.
BACKGROUND, SCALP, SKULL, CSF, GREY, WHITE, OEDEMA, NECROSIS, ENHANCING = range(9)

# Mean intensity of each tissue (rows, in the order above) in each modality (columns).
MODALITIES = ("t1", "t1ce", "t2", "flair")
TISSUE_INTENSITY = np.array([
    # t1    t1ce  t2    flair
    [0.00, 0.00, 0.00, 0.00],  # background (air)
    [0.85, 0.85, 0.55, 0.55],  # scalp and fat
    [0.08, 0.08, 0.06, 0.06],  # skull
    [0.18, 0.18, 1.00, 0.12],  # cerebrospinal fluid
    [0.50, 0.50, 0.62, 0.60],  # grey matter
    [0.72, 0.72, 0.45, 0.48],  # white matter
    [0.42, 0.42, 0.85, 0.88],  # oedema
    [0.20, 0.20, 0.92, 0.45],  # necrotic core
    [0.50, 1.00, 0.70, 0.72],  # enhancing rim
], dtype=np.float32)

LGG_CHANNELS = ("t1", "flair", "t1ce")  # kaggle_3m order: pre-contrast, FLAIR, post-contrast
BRATS_FIELD_OF_VIEW_MM = (240.0, 240.0, 155.0)
DEFAULT_SIZES = {"lgg": (24, 256, 256), "brats": (128, 128, 80)}
NO_TUMOUR_EVERY = 6  # cases 5, 11, 17, ... have no tumour

# The embedded default: small enough to train a 2D U-Net on 2 CPU cores in minutes.
DEFAULT_DATASET = {
    "lgg": {"cases": 16, "size": (20, 128, 128), "seed": 0, "preprocess": {"norm": "zscore", "dtype": "float16"}},
    "brats": {"cases": 8, "size": (64, 64, 48), "seed": 0, "preprocess": {"norm": "zscore", "dtype": "float16"}},
}
DEFAULT_DATASET_VERSION = 1  # bump whenever the phantoms or the spec change: the name keys the cache


@dataclass
class Phantom:
    """One synthetic case on a (z, y, x) grid, z running inferior to superior."""

    tissue: np.ndarray   # uint8 tissue index per voxel
    images: np.ndarray   # (4, z, y, x) float32 in MODALITIES order, roughly 0..1.2
    brain: np.ndarray    # bool, the skull-stripped region
    has_tumour: bool


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, cells: int) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about ``cells`` periods per axis.

    Random values on a coarse grid, spread to every voxel by separable Gaussian weights
    (one small matrix product per axis: far cheaper than spline zooming).
    """
    field = rng.standard_normal(tuple(max(2, min(cells, n)) for n in shape)).astype(np.float32)
    for axis, n in enumerate(shape):
        knots = field.shape[axis]
        positions = np.linspace(0, knots - 1, n, dtype=np.float32)[:, None]
        weights = np.exp(-0.5 * ((positions - np.arange(knots, dtype=np.float32)) / 0.6) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=1), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-6)


def make_phantom(shape: tuple[int, int, int], rng: np.random.Generator, tumour: bool,
                 z_range: tuple[float, float] = (-0.85, 0.85)) -> Phantom:
    """Build one head on a (z, y, x) grid; ``z_range`` is the head's extent the slices cover."""
    from skimage.filters import gaussian

    depth, height, width = shape
    z, y, x = np.meshgrid(np.linspace(*z_range, depth, dtype=np.float32),
                          np.linspace(-1, 1, height, dtype=np.float32),
                          np.linspace(-1, 1, width, dtype=np.float32), indexing="ij")
    # Head: an ellipsoid, longer front to back, with a slightly uneven outline.
    axes = np.array([0.95, 0.90, 0.76]) * rng.uniform(0.93, 1.05, 3)
    head_r = np.sqrt((z / axes[0]) ** 2 + (y / axes[1]) ** 2 + (x / axes[2]) ** 2)
    head_r *= 1 + 0.02 * _smooth_field(shape, rng, 4)
    folds = _smooth_field(shape, rng, 10)  # gyral folding of the grey-white boundary
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[head_r < 1.0] = SCALP
    tissue[head_r < 0.93] = SKULL
    tissue[head_r < 0.86] = CSF
    brain_r = head_r * (1 + 0.015 * folds)
    tissue[brain_r < 0.83] = GREY
    tissue[brain_r < 0.70 + 0.05 * folds] = WHITE
    # Lateral ventricles: two ellipsoids either side of the midline, size varying between cases.
    scale = rng.uniform(0.7, 1.3)
    for side in (-1, 1):
        ventricle = (((x - side * 0.11 * scale) / (0.07 * scale)) ** 2 + ((y + 0.02) / (0.28 * scale)) ** 2
                     + ((z - 0.12) / (0.16 * scale)) ** 2)
        tissue[ventricle < 1] = CSF
    brain = brain_r < 0.86
    if tumour:
        _add_tumour(tissue, (z, y, x), brain, rng)
    means = TISSUE_INTENSITY[tissue]  # (z, y, x, 4)
    texture = 1 + 0.04 * _smooth_field(shape, rng, 16)
    bias = np.exp(0.12 * _smooth_field(shape, rng, 3))
    images = np.empty((len(MODALITIES), *shape), dtype=np.float32)
    for m in range(len(MODALITIES)):
        clean = gaussian(means[..., m] * texture, sigma=0.6, preserve_range=True) * bias
        noise_sigma = 0.025
        real = clean + rng.normal(0, noise_sigma, shape).astype(np.float32)
        imaginary = rng.normal(0, noise_sigma, shape).astype(np.float32)
        images[m] = np.sqrt(real ** 2 + imaginary ** 2) * (head_r < 1.02)  # Rician magnitude; air is 0
    return Phantom(tissue=tissue, images=images, brain=brain, has_tumour=tumour)


def _add_tumour(tissue: np.ndarray, grid: tuple[np.ndarray, ...], brain: np.ndarray,
                rng: np.random.Generator) -> None:
    """Paint oedema, enhancing rim and necrotic core around a random centre inside the brain."""
    z, y, x = grid
    shape = tissue.shape
    centre = np.array([rng.uniform(-0.35, 0.35), rng.uniform(-0.45, 0.45), rng.uniform(-0.4, 0.4)])
    centre[2] += np.sign(centre[2] or 1) * 0.1  # off the midline, in one hemisphere
    radius = rng.uniform(0.12, 0.24)
    distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / radius
    # exp() keeps the distortion positive: a negative factor would let a lobe run off unbounded.
    core_r = distance * np.exp(0.15 * _smooth_field(shape, rng, 5))
    oedema_r = distance * np.exp(0.25 * _smooth_field(shape, rng, 6))
    oedema_extent = rng.uniform(1.25, 1.7)
    in_brain = brain & (tissue != CSF)
    tissue[(oedema_r < oedema_extent) & in_brain] = OEDEMA
    tissue[(core_r < 1.0) & brain] = ENHANCING
    tissue[(core_r < rng.uniform(0.4, 0.65)) & brain] = NECROSIS


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _has_tumour(index: int) -> bool:
    return index % NO_TUMOUR_EVERY != NO_TUMOUR_EVERY - 1


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Scale each channel so its 99.5th percentile inside the head maps to 220, like kaggle_3m."""
    out = np.empty(images.shape, dtype=np.uint8)
    for c, channel in enumerate(images):
        inside = channel[channel > 0.05]
        top = np.percentile(inside, 99.5) if inside.size else 1.0
        out[c] = np.clip(channel / top * 220.0, 0, 255).astype(np.uint8)
    return out


def _write_lgg_case(folder: Path, case_id: str, phantom: Phantom) -> None:
    import tifffile

    channels = _to_uint8(phantom.images[[MODALITIES.index(m) for m in LGG_CHANNELS]])
    whole_tumour = np.isin(phantom.tissue, (OEDEMA, NECROSIS, ENHANCING))
    for n in range(phantom.tissue.shape[0]):
        rgb = np.ascontiguousarray(np.moveaxis(channels[:, n], 0, -1))
        tifffile.imwrite(folder / f"{case_id}_{n + 1}.tif", rgb, photometric="rgb")
        tifffile.imwrite(folder / f"{case_id}_{n + 1}_mask.tif", (whole_tumour[n] * 255).astype(np.uint8))


def _write_brats_case(folder: Path, case_id: str, phantom: Phantom) -> None:
    import nibabel as nib

    # NIfTI voxel order (x, y, z) with BraTS's LPS-style affine: axis 2 runs inferior -> superior.
    shape_xyz = phantom.tissue.shape[::-1]
    spacing = [fov / n for fov, n in zip(BRATS_FIELD_OF_VIEW_MM, shape_xyz)]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[1, 3] = spacing[1] * (shape_xyz[1] - 1)

    def save(array: np.ndarray, suffix: str) -> None:
        image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
        image.header.set_qform(affine, code=1)
        image.header.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
        nib.save(image, str(folder / f"{case_id}_{suffix}.nii.gz"))

    for m, name in enumerate(MODALITIES):
        skull_stripped = np.where(phantom.brain, phantom.images[m], 0.0)
        save(np.round(skull_stripped * 1000).astype(np.int16), name)
    seg = np.zeros(phantom.tissue.shape, dtype=np.uint8)
    seg[phantom.tissue == NECROSIS] = 1
    seg[phantom.tissue == OEDEMA] = 2
    seg[phantom.tissue == ENHANCING] = 4
    save(seg, "seg")


def case_id_for(layout: str, index: int) -> str:
    """kaggle_3m-like patient ids (``TCGA_SY_0001_19990101``) or BraTS-like ids (``BraTS2021_S0001``)."""
    return f"TCGA_SY_{index + 1:04d}_19990101" if layout == "lgg" else f"BraTS2021_S{index + 1:04d}"


def write_synthetic(out: str | Path, layout: str = "lgg", cases: int = 16, seed: int = 0,
                    size: tuple[int, ...] | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``cases`` synthetic cases under ``out`` (``mriseg synth``); returns the case folders.

    ``size`` is the spatial grid: lgg ``(slices, H, W)`` or ``(H, W)``; brats ``(X, Y, Z)`` in
    NIfTI voxel order. Each case is written to a temporary folder and renamed into place.

    Raises:
        MrisegError: unknown layout, bad size, or a case folder exists and ``overwrite`` is False.
    """
    if layout not in DEFAULT_SIZES:
        raise MrisegError(f"--layout must be lgg or brats for synthetic data, got '{layout}'")
    checks.number("cases", cases, integer=True, low=1, high=100_000)
    checks.number("seed", seed, integer=True, low=0, high=2**32 - 1)
    size = tuple(size) if size else DEFAULT_SIZES[layout]
    if layout == "lgg" and len(size) == 2:
        size = (DEFAULT_SIZES["lgg"][0], *size)
    if len(size) != 3:
        raise MrisegError(f"--size {','.join(map(str, size))}: give 3 numbers (lgg: SLICES,H,W or H,W; brats: X,Y,Z)")
    if min(size) < 4 or max(size) > 2048:
        raise MrisegError(f"--size {','.join(map(str, size))}: each number must lie in 4..2048")
    checks.require_memory(f"--size {','.join(map(str, size))}", 40.0 * float(np.prod(size)))
    grid = size if layout == "lgg" else size[::-1]  # phantom grid is (z, y, x)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(out, "exists and is not a folder; synth writes a folder of cases")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(out, f"cannot create the folder: {error.strerror or error}") from None
    folders = []
    ids = [case_id_for(layout, i) for i in range(cases)]
    existing = [i for i in ids if (out / i).exists()]
    if existing and not overwrite:
        raise MrisegError(f"{out / existing[0]}: exists; pass --overwrite to replace the synthetic cases")
    for index in log.progress(range(cases), description="synth"):
        case_id = ids[index]
        phantom = make_phantom(grid, _case_rng(seed, index), tumour=_has_tumour(index))
        final = out / case_id
        try:
            with folder_in_place(final) as temporary:
                (_write_lgg_case if layout == "lgg" else _write_brats_case)(temporary, case_id, phantom)
        except BadInputError as error:  # a full disk, a read-only folder: one line, no half-written case
            raise BadInputError(out, f"synthetic case {case_id}: {error.problem}") from None
        folders.append(final)
    return folders


def mriseg_home() -> Path:
    """Where mriseg keeps generated data: ``$MRISEG_HOME``, default ``~/.cache/mriseg``."""
    return Path(os.environ.get("MRISEG_HOME") or Path.home() / ".cache" / "mriseg")


def default_dataset(layout: str = "lgg") -> Path:
    """The embedded synthetic dataset as a preprocessed cache; generated on first use.

    lgg: 16 patients of 20 slices at 128x128 (seed 0), z-scored, float16. brats: 8 cases of
    64x64x48. The cache is ``$MRISEG_HOME/datasets/synthetic-<layout>-v1``, its source files
    are beside it in ``synthetic-<layout>-v1-raw``. Safe when several processes call it at once:
    one builds under a lock, into a temporary folder renamed into place; the others wait and reuse it.
    """
    from mriseg.data.cache import build_cache, open_cache
    from mriseg.data.preprocess import PreprocessParams

    if layout not in DEFAULT_DATASET:
        raise MrisegError(f"no default dataset for layout '{layout}' (choose lgg or brats)")
    spec = DEFAULT_DATASET[layout]
    root = mriseg_home() / "datasets"
    name = f"synthetic-{layout}-v{DEFAULT_DATASET_VERSION}"
    cache = root / name
    if (cache / "manifest.json").is_file():
        return cache
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock"):
        if (cache / "manifest.json").is_file():
            return cache
        log.info(f"generating the default synthetic {layout} dataset in {cache} (once)")
        raw = root / f"{name}-raw"
        work = temporary_folder_beside(cache)
        try:
            write_synthetic(raw, layout=layout, cases=spec["cases"], seed=spec["seed"], size=spec["size"],
                            overwrite=True)
            build_cache(raw, work, PreprocessParams(**spec["preprocess"]), layout=layout)
            open_cache(work)
            os.replace(work, cache)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return cache


class _file_lock:
    """An exclusive advisory lock on a file (``fcntl.flock``); a no-op where fcntl is missing."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_file_lock":
        self.handle = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except ImportError:  # Windows: the atomic rename still keeps the cache consistent
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()  # closing releases the lock
