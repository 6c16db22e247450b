"""Segmentation networks: ``build_model(name, in_channels, out_channels, spatial_dims, **options)``.

Every model returns raw logits (the loss and inference apply sigmoid/softmax), checks its
input size with a clear :class:`~mriseg.errors.MrisegError`, and can be cut into pipeline
stages (``model.pipeline_stages()``). ``MODELS`` lists them; docs/models.md describes each.
"""

from mriseg.models.blocks import StagedNetwork, count_parameters, count_running_stats
from mriseg.models.registry import MODELS, ModelInfo, build_model, describe_models, model_names, register
from mriseg.models.attention_unet import AttentionUNet
from mriseg.models.gruunet import GRUUNet
from mriseg.models.resunet import ResUNet
from mriseg.models.tiny3d import Tiny3d
from mriseg.models.unet import UNet
from mriseg.models.unet3d import UNet3D
from mriseg.models.unetpp import UNetPlusPlus

register(ModelInfo(
    "unet", UNet, dims=(2, 3),
    reference="Ronneberger et al., MICCAI 2015; same-padding version of Buda et al., Comput. Biol. Med. 2019",
    notes="4 poolings, conv-BN-ReLU, bias-free convs; variant='original' = 2015 valid convs + crop (572 -> 388)",
    default_shape=(3, 1, 2)))
register(ModelInfo(
    "attention-unet", AttentionUNet, dims=(2, 3),
    reference="Oktay et al., Attention U-Net, MIDL 2018",
    notes="the unet with an additive attention gate (coefficients in [0, 1]) on every skip",
    default_shape=(3, 1, 2)))
register(ModelInfo(
    "resunet", ResUNet, dims=(2, 3),
    reference="He et al., CVPR 2016 (ResNet-34) + U-Net decoder",
    notes="ResNet-34 encoder (BasicBlock 3, 4, 6, 3), any input channels; encoder_weights=PATH loads "
          "a local torchvision state dict",
    default_shape=(3, 1, 2)))
register(ModelInfo(
    "unetpp", UNetPlusPlus, dims=(2, 3),
    reference="Zhou et al., UNet++, DLMIA 2018",
    notes="nested dense skips; deep supervision: all 4 heads in training, mean (or last) in eval",
    default_shape=(3, 1, 2)))
register(ModelInfo(
    "unet3d", UNet3D, dims=(3,),
    reference="Cicek et al., MICCAI 2016 (as in seed 001)",
    notes="3 poolings, conv-BN-PReLU, biased convs, PReLU per channel",
    default_shape=(3, 3, 3)))
register(ModelInfo(
    "tiny3d", Tiny3d, dims=(3,),
    reference="seed 000 (TensorFlow thesis model for BraTS 240x240x155x4)",
    notes="layer for layer as the seed, raw logits (seed's final ReLU removed); H, W multiple of 8, depth 4k-1",
    default_shape=(4, 1, 3)))
register(ModelInfo(
    "gruunet", GRUUNet, dims=(2, 3),
    reference="Wollmann et al., GRUU-Net, Medical Image Analysis 2019 (as in seed 004)",
    notes="5x5 input conv, nine FRDUs (dense block + ConvGRU state at full resolution), residual block",
    default_shape=(3, 1, 2)))

__all__ = ["MODELS", "ModelInfo", "StagedNetwork", "build_model", "count_parameters", "count_running_stats",
           "describe_models", "model_names"]
