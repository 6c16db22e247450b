"""The one device rule, shared by train, predict, evaluate and the demo.

``auto`` is the first CUDA GPU when there is one, else Apple's MPS when available, else the CPU.
Under torchrun a CUDA run takes the GPU of its local rank.
"""

from __future__ import annotations

import torch

from mriseg.errors import MrisegError

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def choose_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for ``--device requested`` (see the module docstring).

    Raises:
        MrisegError: the name is not a device, or that device is not available here.
    """
    name = str(requested).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise MrisegError(f"--device {requested!r} is not a device name ({DEVICE_HELP})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MrisegError(f"--device {requested}: CUDA is not available on this machine")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MrisegError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device.type == "mps":
        if not mps_available():
            raise MrisegError(f"--device {requested}: Apple MPS is not available on this machine")
        return device
    if device.type != "cpu" or device.index not in (None, 0):
        raise MrisegError(f"--device must be {DEVICE_HELP}, got {requested!r}")
    return torch.device("cpu")
