"""What ``mriseg predict`` can be told (:class:`PredictOptions`, checked in one place) and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from mriseg.devices import choose_device
from mriseg import options as checks
from mriseg.data.preprocess import INTERPOLATIONS
from mriseg.inference import InferenceSettings



DEFAULT_OUT = Path("predictions")


NAMINGS = {"mriseg": "{case}_seg.nii.gz", "nnunet": "{case}.nii.gz", "brats": "{case}.nii.gz"}
"""``--naming``: the mask file of a NIfTI case (nnU-Net's evaluator and BraTS submissions want
``<case>.nii.gz``); ``mriseg evaluate`` matches all of them."""

SUBSETS = ("imagesTs", "imagesTr")


@dataclass
class PredictOptions:
    """Everything ``mriseg predict`` can be told besides its inputs and model (see the CLI help)."""

    out: Path = DEFAULT_OUT
    overlap: float = 0.5
    batch_size: int = 8
    patch_size: tuple[int, ...] | None = None
    tta: bool | None = None                      # None: the engine's rule (on for 2D, off for 3D)
    amp: bool | None = None                      # None: the device's default (mriseg.devices.choose_precision)
    channels_last: bool | None = None
    device: str = "auto"
    threshold: float | None = None               # None: the checkpoint's
    largest_component: bool | None = None        # None: the folds' cross-validated choice (else off)
    probabilities: bool = False
    overlay: bool = False
    overlay_modality: str | None = None
    all_slices: bool = False
    labels: Path | None = None
    gif: bool = False
    gif_fps: float = 10.0
    modalities: str | None = None
    overwrite: bool = False
    interpolation: str = "linear"
    naming: str | None = None                    # None: nnunet for nnU-Net/MSD inputs, else mriseg
    subset: str | None = None                    # nnU-Net/MSD dataset root: imagesTs (default if present) or imagesTr

    def check(self) -> None:
        """Every option's range, before any model is loaded or any input read."""
        checks.number("overlap", self.overlap, low=0.0, high=0.95)
        checks.number("batch_size", self.batch_size, integer=True, low=1, high=4096)
        checks.number("threshold", self.threshold, low=0.0, high=1.0, low_open=True, high_open=True, optional=True)
        checks.number("fps", self.gif_fps, low=0.1, high=100.0)
        checks.sizes("patch_size", self.patch_size, count=3)
        checks.choice("interpolation", self.interpolation, INTERPOLATIONS)
        if self.naming is not None:
            checks.choice("naming", self.naming, tuple(NAMINGS))
        if self.subset is not None:
            checks.choice("subset", self.subset, SUBSETS)
        choose_device(self.device)
        self.inference()

    def inference(self, patch_size: tuple[int, ...] | None = None) -> InferenceSettings:
        """The engine's settings (validated there)."""
        return InferenceSettings(patch_size=self.patch_size or patch_size, overlap=self.overlap,
                                 batch_size=self.batch_size, tta=self.tta, amp=self.amp,
                                 channels_last=self.channels_last, interpolation=self.interpolation)


@dataclass
class CaseResult:
    """What happened to one case; ``as_json()`` is the ``--json`` line."""

    case_id: str
    input: str
    status: str = "ok"
    outputs: dict[str, str] = field(default_factory=dict)
    volume_ml: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def as_json(self) -> dict:
        return {"case_id": self.case_id, "input": self.input, "status": self.status, "outputs": self.outputs,
                "volume_ml": None if self.volume_ml is None else round(self.volume_ml, 4),
                "seconds": round(self.seconds, 3), "error": self.error}
