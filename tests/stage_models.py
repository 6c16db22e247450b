"""Small networks that follow the model-stage contract (docs/architecture.md), for benchmark tests.

They stand in for the registry's U-Nets so the tests stay fast: two levels,
BatchNorm, and a skip tensor that crosses the encoder/decoder cut and is
concatenated in the decoder (so its gradient comes back non-contiguous).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class _Encoder(nn.Module):
    """(x,) -> (features, skip): features at half resolution, skip at full resolution."""

    def __init__(self, in_channels: int, features: int):
        super().__init__()
        self.block = conv_block(in_channels, features)

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        skip = self.block(tensors[0])
        return nn.functional.max_pool2d(skip, 2), skip


class _Bottleneck(nn.Module):
    """(features, skip) -> (features, skip): the skip passes through untouched."""

    def __init__(self, features: int):
        super().__init__()
        self.block = conv_block(features, 2 * features)

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        features, skip = tensors
        return self.block(features), skip


class _Decoder(nn.Module):
    """(features, skip) -> (logits,): up-sample, concatenate the skip, convolve, 1x1 head."""

    def __init__(self, features: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(2 * features, features, 2, stride=2)
        self.block = conv_block(2 * features, features)
        self.head = nn.Conv2d(features, out_channels, 1)

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        features, skip = tensors
        merged = torch.cat([skip, self.up(features)], dim=1)
        return (self.head(self.block(merged)),)


class TinyStagedUNet(nn.Module):
    """A two-level 2D U-Net cut into enc1 | bottleneck | dec1 stages."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, features: int = 4):
        super().__init__()
        self.enc1 = _Encoder(in_channels, features)
        self.bottleneck = _Bottleneck(features)
        self.dec1 = _Decoder(features, out_channels)

    def pipeline_stages(self) -> list[tuple[str, nn.Module]]:
        return [("enc1", self.enc1), ("bottleneck", self.bottleneck), ("dec1", self.dec1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = (x,)
        for _, stage in self.pipeline_stages():
            tensors = stage(tensors)
        return tensors[0]


class NoStages(nn.Module):
    """A model without pipeline_stages(): the benchmark must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def tiny_unet() -> nn.Module:
    return TinyStagedUNet()


def no_stages() -> nn.Module:
    return NoStages()
