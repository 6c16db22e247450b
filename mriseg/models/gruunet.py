"""GRUU-Net: Wollmann et al., "GRUU-Net: Integrated convolutional and gated recurrent neural
network for cell segmentation", Medical Image Analysis 2019, as described in seed 004.

A 5x5 input convolution, then nine full-resolution dense units (FRDUs) along a U: five going
down (1/2 ... 1/32) and four coming up (1/16 ... 1/2). Each FRDU merges the previous unit's
output ``o`` with the recurrent state ``h``, which lives at full resolution with ``features``
channels: ``o = ConvNorm(cat(o, pool(h)))``, ``o = DenseBlock(o)``, ``x = up(ConvNorm(o))``,
``h = ConvGRU(x, h)``. A residual conv block and a 3x3 classifier turn the final state into
logits. ``(N, C_in, *S) -> (N, C_out, *S)``, ``S`` a multiple of 32; 2D and 3D.

Widths follow the seed at ``features=32``: FRDU channels 64, 128, 256, 512, 512, 256, 128, 64,
32 (``features`` times 2, 4, 8, 16, 16, 8, 4, 2, 1), dense growth rate ``features`` with three
layers and bottleneck factor 2, ConvGRU state ``features`` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mriseg.models.blocks import (StagedNetwork, batch_norm_layer, conv_layer, divisible_by, interpolation_mode,
                                  max_pool_layer)

FRDU_WIDTH_FACTORS = (2, 4, 8, 16, 16, 8, 4, 2, 1)
DOWN_UNITS = 5  # the first five FRDUs go down, the last four come up


class DenseLayer(nn.Module):
    """DenseNet-BC layer: ``(N, C, *S) -> (N, C + growth, *S)`` (BN-ReLU-1x1, BN-ReLU-3x3, concat)."""

    def __init__(self, spatial_dims: int, in_channels: int, growth: int, bottleneck_factor: int = 2):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        middle = bottleneck_factor * growth
        self.layers = nn.Sequential(norm(in_channels), nn.ReLU(inplace=True), conv(in_channels, middle, 1, bias=False),
                                    norm(middle), nn.ReLU(inplace=True), conv(middle, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.layers(x)), dim=1)


class DenseBlock(nn.Sequential):
    """Three dense layers, a BN-ReLU-1x1 transition back to ``channels``, BN-ReLU (seed 004's DenseNet)."""

    def __init__(self, spatial_dims: int, channels: int, growth: int, layers: int = 3):
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        dense = [DenseLayer(spatial_dims, channels + i * growth, growth) for i in range(layers)]
        grown = channels + layers * growth
        super().__init__(*dense, norm(grown), nn.ReLU(inplace=True), conv(grown, channels, 1, bias=False),
                         norm(channels), nn.ReLU(inplace=True))


class ConvGRU(nn.Module):
    """Convolutional GRU cell: ``x (N, C_x, *S), h (N, C_h, *S) -> h' (N, C_h, *S)``.

    ``z = sigmoid(W_xz x + W_hz h)``, ``r = sigmoid(W_xr x + W_hr h)``,
    ``h~ = leaky_relu(W_x x + W_h (r * h))``, ``h' = (1 - z) h + z h~`` (3x3 convolutions).
    The three input convolutions are one convolution with three times the channels (same maths).
    """

    def __init__(self, spatial_dims: int, input_channels: int, state_channels: int):
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.input_gates = conv(input_channels, 3 * state_channels, 3, padding=1)
        self.state_gates = conv(state_channels, 2 * state_channels, 3, padding=1)
        self.candidate = conv(state_channels, state_channels, 3, padding=1)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x_update, x_reset, x_candidate = self.input_gates(x).chunk(3, dim=1)
        h_update, h_reset = self.state_gates(h).chunk(2, dim=1)
        update = torch.sigmoid(x_update + h_update)
        reset = torch.sigmoid(x_reset + h_reset)
        candidate = self.activation(x_candidate + self.candidate(reset * h))
        return h + update * (candidate - h)


class FRDU(nn.Module):
    """Full-resolution dense unit at scale ``1/factor``: ``(o, h) -> (o', h')``.

    ``o (N, C_in, *S/factor)``, ``h (N, C_h, *S)`` -> ``o' (N, C, *S/factor)``, ``h' (N, C_h, *S)``.
    The state is max-pooled down to ``o``'s grid (the paper found bilinear interpolation less
    stable) and the unit's output is interpolated back up for the GRU.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, state_channels: int, factor: int,
                 growth: int):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        self.pool_state = max_pool_layer(spatial_dims)(factor)
        self.merge = nn.Sequential(conv(in_channels + state_channels, channels, 1), norm(channels))
        self.dense = DenseBlock(spatial_dims, channels, growth)
        self.to_state = nn.Sequential(conv(channels, channels, 1), norm(channels))
        self.gru = ConvGRU(spatial_dims, channels, state_channels)
        self.mode = interpolation_mode(spatial_dims)

    def forward(self, o: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.dense(self.merge(torch.cat((o, self.pool_state(h)), dim=1)))
        x = F.interpolate(self.to_state(o), size=h.shape[2:], mode=self.mode, align_corners=False)
        return o, self.gru(x, h)


class FRDUStage(nn.Module):
    """``(o, h) -> (o', h')``: resample ``o`` (max-pool going down, interpolation coming up), one FRDU.

    The first stage also holds the 5x5 input convolution (``(x,) -> (o, h)``, ``h = o = input_conv(x)``);
    the last also holds the residual block and classifier (``-> (logits,)``).
    """

    def __init__(self, spatial_dims: int, unit: FRDU, down: bool, input_conv: nn.Module | None = None,
                 output: nn.Module | None = None):
        super().__init__()
        self.input_conv = input_conv
        self.unit = unit
        self.down = down
        self.pool = max_pool_layer(spatial_dims)(2)
        self.mode = interpolation_mode(spatial_dims)
        self.output = output

    def forward(self, carry: tuple) -> tuple:
        if self.input_conv is not None:
            o = h = self.input_conv(carry[0])
        else:
            o, h = carry
        o = self.pool(o) if self.down else F.interpolate(o, scale_factor=2, mode=self.mode, align_corners=False)
        o, h = self.unit(o, h)
        if self.output is not None:
            return (self.output(h),)
        return (o, h)


class ResidualClassifier(nn.Module):
    """``h + conv-BN-LeakyReLU(h)``, then a 3x3 classifier: ``(N, C_h, *S) -> (N, C_out, *S)``."""

    def __init__(self, spatial_dims: int, channels: int, out_channels: int):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        self.residual = nn.Sequential(conv(channels, channels, 3, padding=1), norm(channels), nn.LeakyReLU(0.2))
        self.classifier = conv(channels, out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h + self.residual(h))


class GRUUNet(StagedNetwork):
    """Stages ``enc1..enc4`` (FRDUs 1-4), ``bottleneck`` (FRDU 5, 1/32), ``dec1..dec4`` (FRDUs 6-9)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32):
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        input_conv = nn.Sequential(conv(in_channels, features, 5, padding=2), norm(features), nn.LeakyReLU(0.2))
        widths = [features * factor for factor in FRDU_WIDTH_FACTORS]
        scales = [2 ** (i + 1) for i in range(DOWN_UNITS)] + [2 ** (DOWN_UNITS - 1 - i) for i in range(4)]
        names = ["enc1", "enc2", "enc3", "enc4", "bottleneck", "dec1", "dec2", "dec3", "dec4"]
        stages: dict[str, nn.Module] = {}
        previous = features
        for index, (name, width, scale) in enumerate(zip(names, widths, scales)):
            unit = FRDU(spatial_dims, previous, width, features, scale, growth=features)
            stages[name] = FRDUStage(spatial_dims, unit, down=index < DOWN_UNITS,
                                     input_conv=input_conv if index == 0 else None,
                                     output=ResidualClassifier(spatial_dims, features, out_channels)
                                     if index == len(names) - 1 else None)
            previous = width
        super().__init__("gruunet", spatial_dims, in_channels, stages, divisible_by(2 ** DOWN_UNITS))
