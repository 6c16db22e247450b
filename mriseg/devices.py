"""The one device rule and the one precision rule, shared by train, predict, evaluate and the demo.

``auto`` is the first CUDA GPU when there is one, else Apple's MPS when available, else the CPU.
Under torchrun a CUDA run takes the GPU of its local rank.

Precision (:func:`choose_precision`): on a CPU with native bfloat16 (AVX512-BF16 or AMX, as
oneDNN reports it) the default is bfloat16 autocast with channels-last tensors, measured 1.8-2.3x
faster per training step than float32 with Dice within noise (docs/performance.md); elsewhere
float32 in the default memory format. ``--amp``/``--no-amp`` and
``--channels-last``/``--no-channels-last`` override each half.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX); emulated bf16 is slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: float32), whether tensors are channels-last, and why."""

    dtype: torch.dtype | None
    channels_last: bool
    reason: str

    def describe(self) -> str:
        name = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]
        layout = "channels-last" if self.channels_last else "default memory format"
        return f"{name} {'autocast ' if self.dtype else ''}with {layout} ({self.reason})"

    def memory_format(self, spatial_dims: int) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d

    def apply(self, network: torch.nn.Module, spatial_dims: int) -> torch.nn.Module:
        """Put the network's convolution weights (rank ``spatial_dims + 2``) into this memory format,
        in place; other tensors keep theirs (``Module.to`` would fail on a 4-D tensor in 3-D format)."""
        if self.channels_last:
            memory_format = self.memory_format(spatial_dims)
            with torch.no_grad():
                for tensor in (*network.parameters(), *network.buffers()):
                    if tensor.dim() == spatial_dims + 2:
                        tensor.data = tensor.data.contiguous(memory_format=memory_format)
        return network


def choose_precision(device: torch.device, amp: bool | None = None,
                     channels_last: bool | None = None) -> Precision:
    """The precision and memory format for ``device``; ``None`` means choose (see the module docstring)."""
    native_cpu = device.type == "cpu" and cpu_has_native_bf16()
    if amp is None:
        amp = native_cpu
        reason = ("default: this CPU has native bfloat16" if native_cpu
                  else f"default on {'a CPU without native bfloat16' if device.type == 'cpu' else device.type}")
    else:
        reason = "--amp" if amp else "--no-amp"
    dtype = None
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp and device.type == "cpu":
        dtype = torch.bfloat16
        if not native_cpu:
            reason += "; this CPU has no native bfloat16, so it is emulated and may be slower"
    elif amp:
        reason += f"; autocast is not supported on {device.type}, float32 used"
    if channels_last is None:
        channels_last = native_cpu and dtype is not None
    else:
        reason += "; --channels-last" if channels_last else "; --no-channels-last"
    return Precision(dtype, channels_last, reason)
