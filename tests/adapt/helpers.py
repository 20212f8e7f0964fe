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


def calibrate_norms(encoder, seed: int = 0, side: int = 32) -> None:
    """Batch-norm statistics measured on random slices (one train-mode pass, cumulative averages), random affine
    terms. Why: at its own init a random torchvision MobileNetV2 shrinks every input to ~1e-9 (its outputs for
    any two inputs agree within 2e-7), so an equivalence check on it passes for any input, an all-zeros volume
    included; calibrated statistics keep each layer at unit scale and the outputs input-dependent."""
    gen = torch.Generator().manual_seed(seed)
    net = encoder.model
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    net.train()
    with torch.no_grad():
        net(normalise(encoder, torch.rand(16, 1, side, side, generator=gen)))
    net.eval()


def cnn_encoder(key: str, seed: int = 0):
    """A randomly initialised 2D CNN encoder in eval mode whose batch norms are calibrated (input-dependent)."""
    torch.manual_seed(seed)
    encoder = build_encoder(key, weights="random")
    calibrate_norms(encoder, seed)
    return encoder.eval()


def assert_input_dependent(model, volume: torch.Tensor, expected: torch.Tensor) -> None:
    """The check that the model reproduces ``expected`` on ``volume`` can fail: an all-zeros volume and the
    volume flipped along every axis give outputs far from ``expected`` (a network that ignores its input would not)."""
    scale = expected.abs().max()
    with torch.no_grad():
        for other in (torch.zeros_like(volume), volume.flip(2, 3, 4)):  # all zeros; the slice turned 180 degrees
            assert (model(other) - expected).abs().max() > 0.05 * scale


def normalise(encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) replicated and normalised, without the 2D resize/crop."""
    mean = torch.tensor(encoder.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(encoder.info.std).view(1, -1, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


def assert_reproduces(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    """``got`` equals ``expected`` within ``tolerance`` of the output's scale (float32 sums over 3x more kernel
    taps differ by ~3e-5 of the scale on unit-scale activations)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=tolerance * scale, rtol=tolerance)
