"""Attention U-Net: Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
MIDL 2018.

The U-Net of :mod:`mriseg.models.unet` (Buda's same-padding version) with an additive
attention gate on every skip connection: the skip is multiplied by coefficients in [0, 1]
computed from itself and the up-sampled decoder signal before concatenation
(:class:`~mriseg.models.blocks.AttentionGate`). ``(N, C_in, *S) -> (N, C_out, *S)``, ``S`` a
multiple of 16; 2D and 3D.
"""

from __future__ import annotations

from mriseg.models.blocks import StagedNetwork, divisible_by
from mriseg.models.unet import unet_stages


class AttentionUNet(StagedNetwork):
    """Stages as :class:`~mriseg.models.unet.UNet`; each ``dec`` stage gates its skip."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32):
        stages = unet_stages(spatial_dims, in_channels, out_channels, features, attention=True)
        super().__init__("attention-unet", spatial_dims, in_channels, stages, divisible_by(16))
