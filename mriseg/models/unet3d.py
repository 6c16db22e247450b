"""3D U-Net of Cicek et al., "3D U-Net: Learning Dense Volumetric Segmentation from Sparse
Annotation", MICCAI 2016, built exactly as in seed 001.

Each level has two 3x3x3 conv-BN-PReLU (biased convolutions, one PReLU slope per channel);
the first conv of a level keeps the width and the second doubles it (``f -> 2f`` at the top,
as in the paper's 32/64 channels). Three 2x2x2 max-poolings, 2x2x2 transposed convolutions
that keep the channel count, ``cat(skip, up)``, a 1x1x1 head.
``(N, C_in, D, H, W) -> (N, C_out, D, H, W)``, sizes multiples of 8. For in=3, out=3 and 32
initial features: 19,077,859 parameters (the seed's count; the paper reports 19,069,955).
"""

from __future__ import annotations

from torch import nn

from mriseg.models.blocks import (BottleneckStage, DecoderStage, EncoderStage, StagedNetwork, UpConcat,
                                  batch_norm_layer, conv_layer, divisible_by, max_pool_layer)


class ConvBnPReLU2(nn.Sequential):
    """``(N, C_in, *S) -> (N, C_out, *S)``: conv(C_in->C_mid)-BN-PReLU, conv(C_mid->C_out)-BN-PReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, middle_channels: int, out_channels: int):
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        super().__init__(
            conv(in_channels, middle_channels, 3, padding=1), norm(middle_channels), nn.PReLU(middle_channels),
            conv(middle_channels, out_channels, 3, padding=1), norm(out_channels), nn.PReLU(out_channels))


class UNet3D(StagedNetwork):
    """Cicek et al.'s 3D U-Net. Stages ``enc1..enc3``, ``bottleneck``, ``dec3..dec1`` (with head)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32):
        f = features
        pool = max_pool_layer(spatial_dims)

        def block(c_in: int, c_mid: int, c_out: int) -> ConvBnPReLU2:
            return ConvBnPReLU2(spatial_dims, c_in, c_mid, c_out)

        stages: dict[str, nn.Module] = {
            "enc1": EncoderStage(block(in_channels, f, 2 * f)),
            "enc2": EncoderStage(block(2 * f, 2 * f, 4 * f), pool=pool(2)),
            "enc3": EncoderStage(block(4 * f, 4 * f, 8 * f), pool=pool(2)),
            "bottleneck": BottleneckStage(block(8 * f, 8 * f, 16 * f), pool=pool(2)),
        }
        for level, (c_in, c_out) in zip((3, 2, 1), ((16 * f, 8 * f), (8 * f, 4 * f), (4 * f, 2 * f))):
            up_concat = UpConcat(spatial_dims, c_in, c_out, c_out, up_channels=c_in,
                                 block=block(c_in + c_out, c_out, c_out), skip_first=True)
            head = conv_layer(spatial_dims)(2 * f, out_channels, kernel_size=1) if level == 1 else None
            stages[f"dec{level}"] = DecoderStage(up_concat, head=head)
        super().__init__("unet3d", spatial_dims, in_channels, stages, divisible_by(8))
