"""Small building blocks shared by the networks, parameterised by ``spatial_dims``.

In the style of MONAI's ``basic_unet.py``: one class per idea, 2D and 3D from the same
code. Shapes in docstrings use ``N`` for the batch, ``C`` for channels and ``*S`` for the
spatial size (``H, W`` in 2D, ``D, H, W`` in 3D).

Every network here is a :class:`StagedNetwork`: an ordered chain of named stages. A stage
takes one tuple of tensors ``(activation, *skips)`` and returns the next such tuple; encoder
stages push skip tensors, decoder stages pop them, and the last stage returns ``(logits,)``.
The model's ``forward`` is literally that chain, so ``pipeline_stages()`` (used by the
benchmark to put stages on different devices) cannot drift away from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from torch import nn

from mriseg.errors import MrisegError

Carry = tuple  # the tuple of tensors passed from stage to stage


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def conv_transpose_layer(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


def batch_norm_layer(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


def max_pool_layer(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]


def interpolation_mode(spatial_dims: int) -> str:
    """The linear interpolation mode of ``F.interpolate`` for this many spatial axes."""
    return {2: "bilinear", 3: "trilinear"}[spatial_dims]


class ConvNormAct(nn.Sequential):
    """Convolution, optional batch norm, activation: ``(N, C_in, *S) -> (N, C_out, *S')``.

    With a norm the convolution has no bias (the norm's shift replaces it), as in Buda's U-Net.
    ``padding=0`` gives the 2015 U-Net's valid convolutions (``S' = S - kernel + 1``).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: Optional[int] = None, norm: bool = True, act: Optional[nn.Module] = None):
        padding = kernel_size // 2 if padding is None else padding
        layers: list[nn.Module] = [conv_layer(spatial_dims)(in_channels, out_channels, kernel_size,
                                                            padding=padding, bias=not norm)]
        if norm:
            layers.append(batch_norm_layer(spatial_dims)(out_channels))
        layers.append(act if act is not None else nn.ReLU(inplace=True))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct`: ``(N, C_in, *S) -> (N, C_out, *S)`` (``S - 4`` when valid)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, padding: Optional[int] = None,
                 norm: bool = True):
        super().__init__(ConvNormAct(spatial_dims, in_channels, out_channels, padding=padding, norm=norm),
                         ConvNormAct(spatial_dims, out_channels, out_channels, padding=padding, norm=norm))


def center_crop(tensor: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing spatial axes of ``tensor`` to ``spatial_size``, keeping the centre."""
    slices = [slice(None), slice(None)]
    for have, want in zip(tensor.shape[2:], spatial_size):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return tensor[tuple(slices)]


class UpConcat(nn.Module):
    """Up-sample, merge with the skip, convolve: ``(N, C_in, *S), (N, C_skip, *2S) -> (N, C_out, *2S)``.

    The 2x2 transposed convolution halves the channels (``C_in -> C_up``). An optional
    ``gate`` reweights the skip first (attention U-Net); with ``crop`` the skip is centre-cropped
    to the up-sampled size (2015 U-Net, valid convolutions). Concatenation order is
    ``(up, skip)`` unless ``skip_first``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int,
                 up_channels: Optional[int] = None, block: Optional[nn.Module] = None,
                 gate: Optional[nn.Module] = None, crop: bool = False, skip_first: bool = False):
        super().__init__()
        up_channels = in_channels // 2 if up_channels is None else up_channels
        self.up = conv_transpose_layer(spatial_dims)(in_channels, up_channels, kernel_size=2, stride=2)
        self.gate = gate
        self.crop = crop
        self.skip_first = skip_first
        self.block = block if block is not None else DoubleConv(spatial_dims, up_channels + skip_channels,
                                                                out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        if self.crop:
            skip = center_crop(skip, up.shape[2:])
        if self.gate is not None:
            skip = self.gate(up, skip)
        merged = torch.cat((skip, up) if self.skip_first else (up, skip), dim=1)
        return self.block(merged)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): reweights a skip by coefficients in [0, 1].

    ``alpha = sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x)))))`` with 1x1 convolutions;
    ``g (N, C_g, *S)`` is the up-sampled coarser signal, ``x (N, C_x, *S)`` the skip;
    returns ``x * alpha`` with ``alpha (N, 1, *S)``. The gating signal is taken after the
    up-convolution, so ``g`` and ``x`` share a grid (as in MONAI's ``AttentionUnet``) instead of
    the paper's strided ``W_x`` and resampled coefficients.
    """

    def __init__(self, spatial_dims: int, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        self.project_gate = nn.Sequential(conv(gate_channels, inter_channels, 1, bias=False), norm(inter_channels))
        self.project_skip = nn.Sequential(conv(skip_channels, inter_channels, 1, bias=False), norm(inter_channels))
        self.relu = nn.ReLU(inplace=True)
        self.psi = nn.Sequential(conv(inter_channels, 1, 1, bias=False), norm(1), nn.Sigmoid())

    def coefficients(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The attention map ``(N, 1, *S)``, values in [0, 1]."""
        return self.psi(self.relu(self.project_gate(gate) + self.project_skip(skip)))

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip * self.coefficients(gate, skip)


class EncoderStage(nn.Module):
    """``(x, *skips) -> (y, *skips, y)`` with ``y = block(pool(x))``; the stage's output is also a skip."""

    def __init__(self, block: nn.Module, pool: Optional[nn.Module] = None):
        super().__init__()
        self.pool = pool
        self.block = block

    def forward(self, carry: Carry) -> Carry:
        x, *skips = carry
        if self.pool is not None:
            x = self.pool(x)
        y = self.block(x)
        return (y, *skips, y)


class BottleneckStage(EncoderStage):
    """``(x, *skips) -> (block(pool(x)), *skips)``: like an encoder stage, but pushes no skip."""

    def forward(self, carry: Carry) -> Carry:
        x, *skips = carry
        if self.pool is not None:
            x = self.pool(x)
        return (self.block(x), *skips)


class DecoderStage(nn.Module):
    """``(x, *skips, skip) -> (up_concat(x, skip), *skips)``; with a ``head``, ``-> (head(...),)``."""

    def __init__(self, up_concat: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.up_concat = up_concat
        self.head = head

    def forward(self, carry: Carry) -> Carry:
        x, *skips, skip = carry
        y = self.up_concat(x, skip)
        if self.head is not None:
            return (self.head(y),)
        return (y, *skips)


# A size rule returns None when a model accepts a spatial size, else what is wrong. Every rule here
# holds axis by axis; its ``axis_ok(axis, size)`` attribute says whether one axis's size is accepted
# (training uses it to pick the largest patch a model takes).
SizeRule = Callable[[Sequence[int]], Optional[str]]


def divisible_by(factor: int) -> SizeRule:
    """Size rule: every spatial size must be a positive multiple of ``factor``."""

    def axis_ok(axis: int, size: int) -> bool:
        return size >= factor and size % factor == 0

    def problem(spatial_size: Sequence[int]) -> Optional[str]:
        if all(axis_ok(axis, size) for axis, size in enumerate(spatial_size)):
            return None
        nearest = [max(factor, round(size / factor) * factor) for size in spatial_size]
        return (f"each spatial size must be a multiple of {factor} (the total down-sampling); "
                f"got {tuple(spatial_size)}, e.g. {tuple(nearest)} would work")

    problem.axis_ok = axis_ok  # type: ignore[attr-defined]
    return problem


class StagedNetwork(nn.Module):
    """A segmentation network that is an ordered chain of named stages (see the module docstring).

    Input ``(N, in_channels, *S)``, output raw logits ``(N, out_channels, *S')``; ``S' = S``
    except for valid-convolution variants. A wrong channel count, rank or spatial size raises
    :class:`MrisegError` before any computation, naming the model and what would fit.
    """

    def __init__(self, name: str, spatial_dims: int, in_channels: int, stages: dict[str, nn.Module],
                 size_rule: SizeRule):
        super().__init__()
        self.name = name
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.stages = nn.ModuleDict(stages)
        self.size_rule = size_rule

    def check_input(self, x: torch.Tensor) -> None:
        expected_rank = self.spatial_dims + 2
        if x.dim() != expected_rank:
            raise MrisegError(f"{self.name}: expected a {expected_rank}-D input (N, C, "
                              f"{'D, H, W' if self.spatial_dims == 3 else 'H, W'}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise MrisegError(f"{self.name}: expected {self.in_channels} input channels, got {x.shape[1]} "
                              f"(shape {tuple(x.shape)})")
        problem = self.size_rule(tuple(x.shape[2:]))
        if problem is not None:
            raise MrisegError(f"{self.name}: {problem}")

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        self.check_input(x)
        carry: Carry = (x,)
        for stage in self.stages.values():
            carry = stage(carry)
        return carry[0]

    def pipeline_stages(self) -> list[tuple[str, nn.Module]]:
        """The ordered ``(name, stage)`` pairs; chaining them on ``(x,)`` gives ``(model(x),)``.

        Names start with ``enc``, ``bottleneck`` or ``dec``. The stages are the model's own
        sub-modules (no copies): moving a stage to a device moves those weights.
        """
        return list(self.stages.items())


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_running_stats(module: nn.Module) -> int:
    """Elements of batch-norm running means and variances (Keras' "non-trainable params")."""
    return sum(buffer.numel() for name, buffer in module.named_buffers()
               if name.endswith(("running_mean", "running_var")))
