"""2D->3D weight adaptation: I3D inflation, ACS convolutions, ViT patch-embedding inflation.

Keys are ``<method>/<2d encoder key>``; the result is a native 3D encoder (``embed_dim``,
``forward((B, C, X, Y, Z) in [0, 1]) -> (B, D)``) that the benchmark embeds like any other:

    >>> model = build_adapted("inflate/timm/resnet18", weights="random")
    >>> model(torch.rand(2, 1, 64, 64, 64)).shape
    torch.Size([2, 512])
"""

from slice2vol.adapt.base import (
    ADAPTERS,
    Adapted3DEncoder,
    Adapted3DInfo,
    build_adapted,
    convert_modules,
    embed_adapted,
    network_of,
)
from slice2vol.adapt.inflate import InflatedConv3d, inflate_conv, inflate_encoder, inflate_network  # registers
from slice2vol.adapt.acs import ACSConv3d, acs_encoder, acs_network, acs_split  # registers
from slice2vol.adapt.vit3d import PatchEmbed3d, ViT3DTrunk, vit3d_encoder  # registers

__all__ = [
    "ADAPTERS", "ACSConv3d", "Adapted3DEncoder", "Adapted3DInfo", "InflatedConv3d", "PatchEmbed3d",
    "ViT3DTrunk", "acs_encoder", "acs_network", "acs_split", "build_adapted", "convert_modules", "embed_adapted",
    "inflate_conv", "inflate_encoder", "inflate_network", "network_of", "vit3d_encoder",
]
