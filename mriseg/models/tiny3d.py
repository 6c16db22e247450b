"""The compact 3D U-Net of seed 000 (a TensorFlow 2.6 thesis model for BraTS), layer for layer.

Built for one input size: ``(N, 4, 240, 240, 155)`` (the seed's ``240x240x155x4`` volume,
channels first, spatial axes kept in the seed's order). Every layer of the seed's table is
here with its kernel, stride and padding; batch norm comes *before* each convolution, as in
the seed. It accepts any ``H, W`` that are multiples of 8 (>= 16) and any depth ``D = 4k - 1``
(k >= 2), the sizes for which its valid and strided convolutions line up with the skips.

Counted like Keras (batch-norm running statistics included) it has 154,037 parameters:
encoder 32,664, decoder 121,373; 153,149 trainable plus 888 running-statistics elements.

Deviations from the seed (see docs/models.md): the last layer returns raw logits (the seed's
ReLU made its sigmoid/BCE output meaningless below 0.5); batch norm uses Keras' defaults
(``eps=1e-3``, momentum 0.99) to match the seed's behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from mriseg.models.blocks import Carry, StagedNetwork


def keras_batch_norm(channels: int) -> nn.BatchNorm3d:
    """BatchNormalization with Keras' defaults (eps 1e-3, running average keeps 99%)."""
    return nn.BatchNorm3d(channels, eps=1e-3, momentum=0.01)


def conv_relu(in_channels: int, out_channels: int, kernel_size: tuple[int, int, int], stride: int = 1,
              same: bool = False) -> nn.Sequential:
    """Keras ``Conv3D(..., activation="relu")``; ``same`` pads odd kernels to keep the size."""
    padding = tuple(k // 2 for k in kernel_size) if same else 0
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
                         nn.ReLU(inplace=True))


def conv_transpose_relu(in_channels: int, out_channels: int, kernel_size: tuple[int, int, int],
                        same: bool = False, relu: bool = True) -> nn.Sequential:
    """Keras ``Conv3DTranspose`` with stride 1: valid grows each axis by ``kernel - 1``."""
    padding = tuple(k // 2 for k in kernel_size) if same else 0
    layers: list[nn.Module] = [nn.ConvTranspose3d(in_channels, out_channels, kernel_size, padding=padding)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def tiny3d_axis_ok(axis: int, size: int) -> bool:
    """H and W (axes 0, 1): multiples of 8, at least 16; depth (axis 2): 4k - 1, at least 7."""
    return size >= 16 and size % 8 == 0 if axis < 2 else size >= 7 and size % 4 == 3


def tiny3d_size_rule(spatial_size: Sequence[int]) -> Optional[str]:
    height, width, depth = spatial_size
    if all(tiny3d_axis_ok(axis, size) for axis, size in enumerate(spatial_size)):
        return None
    suggestion = (max(16, round(height / 8) * 8), max(16, round(width / 8) * 8), max(7, round((depth + 1) / 4) * 4 - 1))
    return (f"needs H and W multiples of 8 (>= 16) and depth 4k - 1 (7, 11, ..., 155); "
            f"got {tuple(spatial_size)}, e.g. {suggestion} would work")


tiny3d_size_rule.axis_ok = tiny3d_axis_ok  # type: ignore[attr-defined]


class Tiny3dEncoder1(nn.Module):
    """Seed layers 1-7: ``(x,) -> (f1, f1)``, f1 ``(N, 16, H-2, W-2, D-1)``."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            keras_batch_norm(in_channels), conv_relu(in_channels, 8, (3, 3, 3), same=True),
            keras_batch_norm(8), conv_relu(8, 16, (3, 3, 3), same=True),
            keras_batch_norm(16), conv_relu(16, 16, (3, 3, 2)),
            keras_batch_norm(16))

    def forward(self, carry: Carry) -> Carry:
        features = self.layers(carry[0])
        return (features, features)


class Tiny3dEncoder2(nn.Module):
    """Seed layers 8-9 (stride 2): ``(f1, f1) -> (f2, f1, f2)``, f2 ``(N, 32, H/2-2, W/2-2, (D-1)/2)``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(conv_relu(16, 32, (3, 3, 1), stride=2), keras_batch_norm(32))

    def forward(self, carry: Carry) -> Carry:
        x, f1 = carry
        f2 = self.layers(x)
        return (f2, f1, f2)


class Tiny3dEncoder3(nn.Module):
    """Seed layers 10-12: ``(f2, f1, f2) -> (pooled, f1, f2, f3)``, f3 ``(N, 64, H/4-2, W/4-2, (D+1)/4)``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(conv_relu(32, 64, (3, 3, 1), stride=2), keras_batch_norm(64))
        self.pool = nn.MaxPool3d((2, 2, 1))

    def forward(self, carry: Carry) -> Carry:
        x, f1, f2 = carry
        f3 = self.layers(x)
        return (self.pool(f3), f1, f2, f3)


class Tiny3dDecoder1(nn.Module):
    """Seed layers 13-16: ``(x, f1, f2, f3) -> (cat(f3, up(x)), f1, f2)`` with 128 channels."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(keras_batch_norm(64), nn.Upsample(scale_factor=(2, 2, 1), mode="nearest"),
                                    conv_transpose_relu(64, 64, (3, 3, 1), same=True))

    def forward(self, carry: Carry) -> Carry:
        x, f1, f2, f3 = carry
        return (torch.cat((f3, self.layers(x)), dim=1), f1, f2)


class Tiny3dDecoder2(nn.Module):
    """Seed layers 17-23: ``(x, f1, f2) -> (cat(f2, ...), f1)`` with 48 channels."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            keras_batch_norm(128), nn.Upsample(scale_factor=(2, 2, 2), mode="nearest"),
            conv_transpose_relu(128, 32, (3, 3, 1)), conv_relu(32, 32, (3, 3, 3)),
            keras_batch_norm(32), conv_transpose_relu(32, 16, (3, 3, 2)))

    def forward(self, carry: Carry) -> Carry:
        x, f1, f2 = carry
        return (torch.cat((f2, self.layers(x)), dim=1), f1)


class Tiny3dDecoder3(nn.Module):
    """Seed layers 24-31: ``(x, f1) -> (logits,)``, logits ``(N, out_channels, H, W, D)``."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.up = nn.Sequential(keras_batch_norm(48), nn.Upsample(scale_factor=(2, 2, 2), mode="nearest"),
                                conv_transpose_relu(48, 16, (3, 3, 1)))
        self.head = nn.Sequential(
            keras_batch_norm(32), conv_transpose_relu(32, 8, (3, 3, 1)), conv_transpose_relu(8, 4, (1, 1, 5)),
            nn.Conv3d(4, out_channels, (1, 1, 4)))  # the seed's ReLU here is removed: raw logits

    def forward(self, carry: Carry) -> Carry:
        x, f1 = carry
        return (self.head(torch.cat((f1, self.up(x)), dim=1)),)


class Tiny3d(StagedNetwork):
    """Seed 000's compact 3D U-Net: ``(N, C_in, H, W, D) -> (N, C_out, H, W, D)``.

    Stages ``enc1..enc3`` are the seed's ``unet_encoder`` and ``dec1..dec3`` its ``unet_decoder``,
    cut at the concatenations, so the seed's two-GPU split is the ``enc``/``dec`` boundary.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        stages: dict[str, nn.Module] = {
            "enc1": Tiny3dEncoder1(in_channels), "enc2": Tiny3dEncoder2(), "enc3": Tiny3dEncoder3(),
            "dec1": Tiny3dDecoder1(), "dec2": Tiny3dDecoder2(), "dec3": Tiny3dDecoder3(out_channels),
        }
        super().__init__("tiny3d", spatial_dims, in_channels, stages, tiny3d_size_rule)
