"""U-Net in two variants.

``variant="buda"`` (default): the network of Buda et al. 2019 (the seeds' LGG reference program),
itself the U-Net of Ronneberger et al. 2015 with same-padding: four max-poolings and a
bottleneck, two 3x3 conv-BN-ReLU per block with bias-free convolutions, 2x2 transposed-conv
up-sampling, a 1x1 head. ``(N, C_in, *S) -> (N, C_out, *S)``, ``S`` a multiple of 16.
For in=3, out=1, 32 features it has 7,763,041 parameters.

``variant="original"``: Ronneberger et al., "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI 2015: valid convolutions (no padding, no batch norm, biased
convolutions) and crop-and-concatenate, for overlap-tile inference. ``S = 124 + 16k`` (k >= 4)
gives ``S' = S - 184``: 572 -> 388 as in the paper. The paper's width is 64 features (the default
for this variant).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import nn

from mriseg.errors import MrisegError
from mriseg.models.blocks import (AttentionGate, BottleneckStage, DecoderStage, DoubleConv, EncoderStage, StagedNetwork,
                                  UpConcat, conv_layer, divisible_by, max_pool_layer)

VARIANTS = ("buda", "original")


def valid_unet_axis_ok(axis: int, size: int) -> bool:
    return size >= 188 and (size - 124) % 16 == 0


def valid_unet_size_rule(spatial_size: Sequence[int]) -> Optional[str]:
    """The 2015 U-Net needs every size = 124 + 16k, k >= 4, so that each pooling sees an even size."""
    if all(valid_unet_axis_ok(axis, size) for axis, size in enumerate(spatial_size)):
        return None
    nearest = [max(188, 124 + 16 * round((size - 124) / 16)) for size in spatial_size]
    return (f"with valid convolutions each spatial size must be 124 + 16k with k >= 4 "
            f"(188, 204, ..., 572, ...); got {tuple(spatial_size)}, e.g. {tuple(nearest)} would work "
            f"(output is 184 smaller)")


valid_unet_size_rule.axis_ok = valid_unet_axis_ok  # type: ignore[attr-defined]


def unet_stages(spatial_dims: int, in_channels: int, out_channels: int, features: int, original: bool = False,
                attention: bool = False) -> dict[str, nn.Module]:
    """The stages of a U-Net with widths ``features * (1, 2, 4, 8, 16)``.

    ``original``: valid convolutions without batch norm, crop-and-concatenate (2015 paper);
    ``attention``: an :class:`AttentionGate` on each skip (Oktay et al. 2018).
    """
    padding = 0 if original else None
    norm = not original
    widths = [features * 2 ** level for level in range(5)]
    pool = max_pool_layer(spatial_dims)
    stages: dict[str, nn.Module] = {}
    previous = in_channels
    for level in range(4):
        stages[f"enc{level + 1}"] = EncoderStage(
            DoubleConv(spatial_dims, previous, widths[level], padding=padding, norm=norm),
            pool=pool(2) if level > 0 else None)
        previous = widths[level]
    stages["bottleneck"] = BottleneckStage(
        DoubleConv(spatial_dims, widths[3], widths[4], padding=padding, norm=norm), pool=pool(2))
    for level in reversed(range(4)):
        width = widths[level]
        block = DoubleConv(spatial_dims, 2 * width, width, padding=padding, norm=norm)
        gate = AttentionGate(spatial_dims, width, width, max(1, width // 2)) if attention else None
        head = conv_layer(spatial_dims)(widths[0], out_channels, kernel_size=1) if level == 0 else None
        up_concat = UpConcat(spatial_dims, widths[level + 1], width, width, block=block, gate=gate,
                             crop=original, skip_first=original)
        stages[f"dec{level + 1}"] = DecoderStage(up_concat, head=head)
    return stages


class UNet(StagedNetwork):
    """U-Net (Ronneberger et al. 2015; same-padding version as Buda et al. 2019).

    Stages: ``enc1..enc4`` (double conv, preceded by a 2x2 max-pool except in ``enc1``),
    ``bottleneck``, ``dec4..dec1`` (transposed conv, concat skip, double conv; ``dec1`` ends
    with the 1x1 head). Widths ``features * (1, 2, 4, 8, 16)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: Optional[int] = None,
                 variant: str = "buda"):
        if variant not in VARIANTS:
            raise MrisegError(f"unet: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        original = variant == "original"
        if features is None:
            features = 64 if original else 32
        stages = unet_stages(spatial_dims, in_channels, out_channels, features, original=original)
        name = "unet (original)" if original else "unet"
        super().__init__(name, spatial_dims, in_channels, stages,
                         valid_unet_size_rule if original else divisible_by(16))
        # Valid convolutions: the output is 184 voxels smaller per axis (572 -> 388), centred.
        self.output_margin = 184 if original else 0
