"""A light 3D head over patch tokens: slices stacked back into a 3D feature volume.

Per plane, the (S, gh*gw, Dt) patch tokens of a subject become a (Dt, S, gh, gw) feature volume
(slice axis first); a 1x1x1 convolution reduces the channels, a few 3x3x3 convolutions mix
neighbouring slices and patches, and a masked mean pools the result. Planes share the head and
their pooled vectors are averaged. Without cached tokens the slice features are used as a 1x1
grid, so the head degrades to 1D convolutions along the slice axis.

No normalisation layers: their statistics would mix real and padded slices, and a subject's
embedding must not depend on which other subjects share its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.aggregate.base import AGGREGATORS
from slice2vol.aggregate.trainer import Batch, TorchAggregator


class Head3DModule(nn.Module):
    """Batch ``plane -> PaddedPlane`` (tokens (B, S, T, Dt) or features) -> ((B, channels), None)."""

    def __init__(self, in_dim: int, channels: int = 32, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.drop = nn.Dropout3d(dropout)
        self.reduce = nn.Conv3d(in_dim, channels, 1)
        self.blocks = nn.ModuleList(nn.Conv3d(channels, channels, 3, padding=1) for _ in range(depth))
        self.out_dim = channels

    def forward(self, batch: Batch):
        pooled = []
        for pp in batch.values():
            if pp.tokens is not None:
                b, s, _, dt = pp.tokens.shape
                gh, gw = pp.token_grid
                vol = pp.tokens.reshape(b, s, gh, gw, dt).permute(0, 4, 1, 2, 3)  # (B, Dt, S, gh, gw)
            else:
                vol = pp.features.permute(0, 2, 1)[..., None, None]  # (B, D, S, 1, 1)
            m = pp.mask[:, None, :, None, None].to(vol.dtype)
            v = F.gelu(self.reduce(self.drop(vol))) * m
            for conv in self.blocks:
                # residual keeps the single-slice signal; re-masking keeps padding at zero
                v = (v + F.gelu(conv(v))) * m
            denom = m.sum((2, 3, 4)) * v.shape[3] * v.shape[4]
            pooled.append(v.sum((2, 3, 4)) / denom.clamp_min(1))
        return torch.stack(pooled, 0).mean(0), None


@AGGREGATORS.register("head3d")
class Head3D(TorchAggregator):
    """Trainable 3D convolutional head over the stacked patch tokens of each plane.

    Args:
        channels: width after the 1x1x1 reduction = output dimension.
        depth: number of residual 3x3x3 convolutions.
        **kwargs: shared training options, see :class:`TorchAggregator`.
    """

    wants_tokens = True

    def __init__(self, channels: int = 32, depth: int = 2, planes: Sequence[str] | None = None,
                 **kwargs) -> None:
        super().__init__(planes=planes, **kwargs)
        self.channels, self.depth = channels, depth

    def _build_module(self, in_dim, planes, token_dim=None, scaler=None) -> nn.Module:
        return Head3DModule(token_dim or in_dim, self.channels, self.depth, self.dropout)
