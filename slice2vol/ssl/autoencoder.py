"""Convolutional autoencoder (optionally denoising): encoder feature map -> decoder -> the input again."""

from __future__ import annotations

from typing import Sequence

import torch

from slice2vol.ssl import METHODS
from slice2vol.ssl.backbones import Backbone, ConvDecoder, probe_grid
from slice2vol.ssl.base import SSLMethod, backbone_from_config, check_values
from slice2vol.ssl.losses import reconstruction_loss


class AutoEncoder(SSLMethod):
    """Reconstructs its input through the backbone's last feature map (no skip connections).

    Args:
        backbone: any :class:`Backbone` (its feature map is the bottleneck).
        spatial_dims, in_channels, input_size: training sample geometry.
        loss: ``mse`` or ``l1``.
        noise_std: Gaussian noise added to the input only (denoising autoencoder); 0 = plain.
        decoder_min_width: channels of the last decoder stage.
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 loss: str = "mse", noise_std: float = 0.0, decoder_min_width: int = 16) -> None:
        check_values("autoencoder", whole={"decoder_min_width": (decoder_min_width, 1)},
                     real={"noise_std": (noise_std, 0.0, 1e3)}, choice={"loss": (loss, ("mse", "l1"))})
        super().__init__(backbone, spatial_dims, in_channels, input_size)
        grid, features = probe_grid(backbone, in_channels, self.input_size)
        self.decoder = ConvDecoder(spatial_dims, features, in_channels, grid, self.input_size, decoder_min_width)
        self.loss_kind, self.noise_std = loss, noise_std

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> reconstruction (B, C, *S)."""
        return self.decoder(self.backbone.feature_map(x))

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = batch + self.noise_std * torch.randn_like(batch) if self.noise_std > 0 else batch
        return reconstruction_loss(self.reconstruct(inputs), batch, self.loss_kind), {}


@METHODS.register("autoencoder", dims=(2, 3), kind="reconstruction")
def build(cfg) -> AutoEncoder:
    return AutoEncoder(backbone_from_config(cfg), cfg.spatial_dims, cfg.in_channels, cfg.input_size,
                       **cfg.method_params)
