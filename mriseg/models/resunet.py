"""U-Net with a ResNet-34 encoder (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), the seeds' "ResUnet" variant, written here without torchvision.

Encoder: ResNet-34 without its pooling and fc layer (7x7 stride-2 stem, 3x3 max-pool,
BasicBlock layers of 3, 4, 6, 3 blocks with 64, 128, 256, 512 channels): 21,284,672
parameters for 3 input channels. Decoder: U-Net style, transposed conv, concatenation with the
encoder feature of the same resolution, two conv-BN-ReLU; a last up-sampling block brings the
stem's half resolution back to the input's. ``(N, C_in, *S) -> (N, C_out, *S)``, ``S`` a multiple
of 32; any input channel count; 2D and 3D.

``encoder_weights=PATH`` loads a local torchvision-format ResNet-34 state dict (keys ``conv1.weight``,
``bn1.*``, ``layer1.0.conv1.weight``, ...; ``fc.*`` is ignored). Nothing is ever downloaded. For an
input channel count other than 3, the stem's RGB filters are averaged and repeated (scaled by
``3 / C_in``) so the response to a grey image is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mriseg.errors import BadInputError, MrisegError
from mriseg.models.blocks import (BottleneckStage, DecoderStage, DoubleConv, EncoderStage, StagedNetwork, UpConcat,
                                  batch_norm_layer, conv_layer, conv_transpose_layer, divisible_by, max_pool_layer)

ENCODER_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_LAYER = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block: ``(N, C_in, *S) -> (N, C_out, *S / stride)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=False),
                                            norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetStem(nn.Module):
    """``conv1`` (7x7, stride 2), ``bn1``, ReLU: ``(N, C_in, *S) -> (N, 64, *S/2)``."""

    def __init__(self, spatial_dims: int, in_channels: int):
        super().__init__()
        self.conv1 = conv_layer(spatial_dims)(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = batch_norm_layer(spatial_dims)(64)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def resnet_layer(spatial_dims: int, in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(spatial_dims, in_channels, out_channels, stride)]
    layers += [BasicBlock(spatial_dims, out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class FinalUpStage(nn.Module):
    """``(x,) -> (head(block(up(x))),)``: from the stem's half resolution back to the input's."""

    def __init__(self, spatial_dims: int, in_channels: int, width: int, out_channels: int):
        super().__init__()
        self.up = conv_transpose_layer(spatial_dims)(in_channels, width, kernel_size=2, stride=2)
        self.block = DoubleConv(spatial_dims, width, width)
        self.head = conv_layer(spatial_dims)(width, out_channels, kernel_size=1)

    def forward(self, carry: tuple) -> tuple:
        (x,) = carry
        return (self.head(self.block(self.up(x))),)


# torchvision key prefix -> where that module lives in ResUNet
TORCHVISION_PREFIXES = {"conv1.": "stages.enc1.block.conv1.", "bn1.": "stages.enc1.block.bn1.",
                        "layer1.": "stages.enc2.block.", "layer2.": "stages.enc3.block.",
                        "layer3.": "stages.enc4.block.", "layer4.": "stages.bottleneck.block."}


class ResUNet(StagedNetwork):
    """ResNet-34 encoder + U-Net decoder.

    Stages: ``enc1`` (stem, 1/2), ``enc2`` (max-pool + layer1, 1/4), ``enc3`` (layer2, 1/8),
    ``enc4`` (layer3, 1/16), ``bottleneck`` (layer4, 1/32), ``dec4..dec1`` (up to 1/2, each with
    the skip of its resolution), ``dec0`` (up to full size, 1x1 head). The ``enc*`` and
    ``bottleneck`` stages hold exactly ResNet-34's convolutional layers.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 encoder_weights: Optional[str] = None):
        widths = ENCODER_WIDTHS
        stages: dict[str, nn.Module] = {
            "enc1": EncoderStage(ResNetStem(spatial_dims, in_channels)),
            "enc2": EncoderStage(resnet_layer(spatial_dims, 64, widths[0], BLOCKS_PER_LAYER[0], stride=1),
                                 pool=max_pool_layer(spatial_dims)(3, stride=2, padding=1)),
            "enc3": EncoderStage(resnet_layer(spatial_dims, widths[0], widths[1], BLOCKS_PER_LAYER[1], stride=2)),
            "enc4": EncoderStage(resnet_layer(spatial_dims, widths[1], widths[2], BLOCKS_PER_LAYER[2], stride=2)),
            "bottleneck": BottleneckStage(resnet_layer(spatial_dims, widths[2], widths[3], BLOCKS_PER_LAYER[3],
                                                       stride=2)),
        }
        # skips, deepest first: layer3 (256), layer2 (128), layer1 (64), stem (64)
        for name, in_width, skip_width in (("dec4", 512, 256), ("dec3", 256, 128), ("dec2", 128, 64),
                                           ("dec1", 64, 64)):
            stages[name] = DecoderStage(UpConcat(spatial_dims, in_width, skip_width, max(skip_width, 64)))
        stages["dec0"] = FinalUpStage(spatial_dims, 64, features, out_channels)
        super().__init__("resunet", spatial_dims, in_channels, stages, divisible_by(32))
        if encoder_weights is not None:
            self.load_encoder_weights(encoder_weights)

    def load_encoder_weights(self, path: str | Path) -> None:
        """Load a torchvision-format ResNet-34 state dict from ``path`` into the encoder stages."""
        path = Path(path)
        if self.spatial_dims != 2:
            raise MrisegError("resunet: encoder_weights are 2D ResNet-34 weights; they need spatial_dims=2")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as error:
            raise BadInputError(path, "no such file") from error
        except Exception as error:  # torch raises many types for a file that is not a checkpoint
            raise BadInputError(path, f"cannot read as a PyTorch state dict: {error}") from error
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise BadInputError(path, "not a torchvision ResNet state dict (no 'conv1.weight' key)")
        renamed = {}
        for key, value in state.items():
            prefix = next((p for p in TORCHVISION_PREFIXES if key.startswith(p)), None)
            if prefix is not None:
                renamed[TORCHVISION_PREFIXES[prefix] + key[len(prefix):]] = value
        stem = renamed["stages.enc1.block.conv1.weight"]
        if stem.shape[1] != self.in_channels:
            renamed["stages.enc1.block.conv1.weight"] = (
                stem.mean(dim=1, keepdim=True).repeat(1, self.in_channels, 1, 1) * stem.shape[1] / self.in_channels)
        encoder_keys = {key for key in self.state_dict() if key.startswith(tuple(TORCHVISION_PREFIXES.values()))}
        missing, unexpected = sorted(encoder_keys - set(renamed)), sorted(set(renamed) - encoder_keys)
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise BadInputError(path, f"not a ResNet-34 state dict: {len(missing)} encoder weights missing, "
                                      f"{len(unexpected)} unexpected (e.g. {example})")
        try:
            self.load_state_dict(renamed, strict=False)
        except RuntimeError as error:
            raise BadInputError(path, f"weights do not fit ResNet-34: {str(error).strip().splitlines()[-1].strip()}") from error
