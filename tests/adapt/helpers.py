"""Shared helpers of the 2D->3D adaptation tests: tiny encoders with non-trivial batch-norm statistics."""

from __future__ import annotations

import torch
import torch.nn as nn

from slice2vol.encoders import build_encoder

TINY_VIT = dict(img_size=32, model_kwargs=dict(depth=2))


def randomise_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every batch norm random running statistics and affine terms, so eval mode is not identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return net


def cnn_encoder(key: str, seed: int = 0):
    """A randomly initialised 2D CNN encoder in eval mode with random batch-norm statistics."""
    torch.manual_seed(seed)
    encoder = build_encoder(key, weights="random")
    randomise_norms(encoder.model, seed)
    return encoder.eval()


def normalise(encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) replicated and normalised, without the 2D resize/crop."""
    mean = torch.tensor(encoder.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(encoder.info.std).view(1, -1, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std
