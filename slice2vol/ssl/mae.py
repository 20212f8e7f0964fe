"""Masked autoencoder (He et al. 2022) with 2D/3D patches, on MONAI's ``MaskedAutoEncoderViT``.

The backbone config must be ``vit``; its ``patch_size``, ``hidden_size``, ``mlp_dim``, ``num_layers``
and ``num_heads`` size the encoder, ``method_params`` the decoder and the mask ratio. The kept encoder
(:class:`MAEEncoder`) runs on all patches, without masking, and mean-pools the patch tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from slice2vol.ssl import METHODS
from slice2vol.ssl.backbones import Backbone
from slice2vol.ssl.base import SSLMethod, check_values
from slice2vol.ssl.losses import masked_reconstruction_loss, patchify


class MAEEncoder(Backbone):
    """The encoder half of a MONAI ``MaskedAutoEncoderViT`` (shares its parameters).

    Attributes:
        grid: patch grid of the fixed input size.
    """

    def __init__(self, mae: nn.Module, spatial_dims: int, in_channels: int, img_size: Sequence[int],
                 patch_size: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_embedding, self.blocks = mae.patch_embedding, mae.blocks
        self.cls_token = mae.cls_token
        self.grid = tuple(s // patch_size for s in img_size)
        self.spatial_dims, self.in_channels, self.fixed_size = spatial_dims, in_channels, tuple(img_size)
        self.embed_dim = self.feature_dim = hidden_size

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x)  # (B, N, D), positions added
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens)[:, 1:]  # blocks end with the final LayerNorm
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)


class MAE(SSLMethod):
    """Hides ``mask_ratio`` of the patches and predicts their voxels from the visible ones.

    Args:
        spatial_dims, in_channels, input_size: training sample geometry (sides divisible by the patch).
        patch_size, hidden_size, mlp_dim, num_layers, num_heads: ViT encoder.
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: light decoder.
        mask_ratio: fraction of patches hidden.
        norm_pix: per-patch normalised targets.
    """

    def __init__(self, spatial_dims: int, in_channels: int, input_size: Sequence[int], patch_size: int = 16,
                 hidden_size: int = 384, mlp_dim: int = 1536, num_layers: int = 6, num_heads: int = 6,
                 decoder_hidden_size: int = 192, decoder_mlp_dim: int = 768, decoder_num_layers: int = 2,
                 decoder_num_heads: int = 6, mask_ratio: float = 0.75, norm_pix: bool = True) -> None:
        from monai.networks.nets import MaskedAutoEncoderViT

        sizes = {"patch_size": patch_size, "hidden_size": hidden_size, "mlp_dim": mlp_dim, "num_layers": num_layers,
                 "num_heads": num_heads, "decoder_hidden_size": decoder_hidden_size,
                 "decoder_mlp_dim": decoder_mlp_dim, "decoder_num_layers": decoder_num_layers,
                 "decoder_num_heads": decoder_num_heads}
        # a mask ratio of 0 leaves no target, 1 leaves the encoder nothing to see
        check_values("mae", whole={k: (v, 1) for k, v in sizes.items()}, real={"mask_ratio": (mask_ratio, 0.0, 1.0)},
                     open_low=("mask_ratio",), open_high=("mask_ratio",))
        input_size = tuple(input_size)
        if any(s % patch_size for s in input_size):
            raise ValueError(f"MAE: input size {input_size} must be divisible by patch_size {patch_size}")
        mae = MaskedAutoEncoderViT(in_channels, input_size, patch_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
                                   num_layers=num_layers, num_heads=num_heads, masking_ratio=mask_ratio,
                                   decoder_hidden_size=decoder_hidden_size, decoder_mlp_dim=decoder_mlp_dim,
                                   decoder_num_layers=decoder_num_layers, decoder_num_heads=decoder_num_heads,
                                   spatial_dims=spatial_dims, qkv_bias=True)
        encoder = MAEEncoder(mae, spatial_dims, in_channels, input_size, patch_size, hidden_size)
        super().__init__(encoder, spatial_dims, in_channels, input_size)
        self.mae = mae
        self.patch_size, self.norm_pix = patch_size, norm_pix

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        pred, mask = self.mae(batch)  # (B, N, C * p^d), (B, N) with 1 = masked
        target = patchify(batch, self.patch_size)
        return masked_reconstruction_loss(pred, target, mask, self.norm_pix), {}


_ENCODER_KEYS = ("patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads")


@METHODS.register("mae", dims=(2, 3), kind="reconstruction")
def build(cfg) -> MAE:
    if cfg.backbone.name != "vit":
        raise ValueError(f"mae needs backbone.name: vit, got {cfg.backbone.name!r}")
    params = {k: v for k, v in cfg.backbone.params.items() if k in _ENCODER_KEYS}
    ignored = sorted(set(cfg.backbone.params) - set(_ENCODER_KEYS))
    if ignored:
        raise ValueError(f"mae: backbone params {ignored} are not used; known: {list(_ENCODER_KEYS)}")
    return MAE(cfg.spatial_dims, cfg.in_channels, cfg.input_size, **params, **cfg.method_params)
