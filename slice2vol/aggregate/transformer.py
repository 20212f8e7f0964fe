"""A small slice transformer: slices are tokens that know where they are.

Each slice feature is projected to ``d_model`` and gets a sinusoidal encoding of its coordinate
along the plane axis (mm, centred per bag, see :func:`~slice2vol.aggregate.base.slice_coordinates`)
plus a learned plane embedding; a CLS token reads out the volume. Attention weights exposed are
the last layer's CLS-to-slice attention, averaged over heads.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from slice2vol.aggregate.base import AGGREGATORS
from slice2vol.aggregate.trainer import PLANE_IDS, Batch, TorchAggregator, split_planes, union_planes


def sinusoidal_encoding(coords: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """(...,) coordinates in mm -> (..., dim) encoding; periods from 2*pi mm to ``max_period`` mm."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period / (2 * math.pi)) * torch.arange(half, device=coords.device) / max(1, half - 1))
    angles = coords.unsqueeze(-1) * freqs
    enc = torch.cat([torch.sin(angles), torch.cos(angles)], -1)
    return enc if dim % 2 == 0 else torch.cat([enc, torch.zeros_like(enc[..., :1])], -1)


class SliceTransformerModule(nn.Module):
    """Batch ``plane -> PaddedPlane`` -> ((B, d_model) CLS embeddings, plane -> (B, S_p) attention)."""

    def __init__(self, in_dim: int, d_model: int = 128, depth: int = 2, heads: int = 4,
                 dropout: float = 0.1, max_period: float = 1000.0) -> None:
        super().__init__()
        # dropout on the d_model tokens, not on the (B, S, in_dim) input (a mask per input feature of
        # every slice dominated the CPU training time)
        self.proj = nn.Sequential(nn.Linear(in_dim, d_model), nn.Dropout(dropout))
        self.plane_embed = nn.Embedding(len(PLANE_IDS), d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.normal_(self.cls, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.d_model, self.max_period, self.out_dim = d_model, max_period, d_model

    def forward(self, batch: Batch):
        x, mask, coords, ids, sizes = union_planes(batch)
        tokens = self.proj(x) + sinusoidal_encoding(coords, self.d_model, self.max_period) + self.plane_embed(ids)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], 1)  # True = ignore
        for layer in self.layers[:-1]:
            tokens = layer(tokens, src_key_padding_mask=pad)
        last = self.layers[-1]
        normed = last.norm1(tokens)
        _, weights = last.self_attn(normed[:, :1], normed, normed, key_padding_mask=pad,
                                    need_weights=True, average_attn_weights=True)
        tokens = last(tokens, src_key_padding_mask=pad)
        cls_attention = weights[:, 0, 1:]  # (B, S_tot): CLS -> slices (CLS -> itself dropped)
        cls_attention = cls_attention / cls_attention.sum(1, keepdim=True).clamp_min(1e-12)
        return self.norm(tokens[:, 0]), split_planes(cls_attention, sizes)


@AGGREGATORS.register("transformer")
class SliceTransformer(TorchAggregator):
    """Slice transformer aggregator with slice-position encoding.

    Args:
        d_model: token width = output dimension.
        depth: encoder layers.
        heads: attention heads.
        max_period: longest period (mm) of the position encoding.
        **kwargs: shared training options, see :class:`TorchAggregator`.
    """

    has_attention = True

    def __init__(self, d_model: int = 128, depth: int = 2, heads: int = 4, max_period: float = 1000.0,
                 planes: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(planes=planes, **kwargs)
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.d_model, self.depth, self.heads, self.max_period = d_model, depth, heads, max_period

    def _build_module(self, in_dim, planes, token_dim=None, scaler=None) -> nn.Module:
        return SliceTransformerModule(in_dim, self.d_model, self.depth, self.heads, self.dropout, self.max_period)
