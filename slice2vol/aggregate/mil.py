"""Gated attention-based multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018).

Each slice is an instance: ``h_s = ReLU(W x_s)``, attention ``a_s = softmax_s(w^T (tanh(V h_s) *
sigmoid(U h_s)))`` and the volume embedding is ``z = sum_s a_s h_s``. The slices of all chosen
planes form one bag, so the attention says which slices, of which plane, mattered.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from slice2vol.aggregate.base import AGGREGATORS
from slice2vol.aggregate.trainer import Batch, TorchAggregator, masked_softmax, split_planes, union_planes


class GatedAttentionPool(nn.Module):
    """Gated attention over a padded set: x (B, S, H), mask (B, S) -> ((B, H), weights (B, S))."""

    def __init__(self, dim: int, attn_dim: int = 64, gated: bool = True) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.V(h))
        if self.U is not None:
            gate = gate * torch.sigmoid(self.U(h))
        weights = masked_softmax(self.w(gate).squeeze(-1), mask)
        return torch.einsum("bs,bsh->bh", weights, h), weights


class AttentionMILModule(nn.Module):
    """Slice embedding + gated attention pooling; input a batch ``plane -> PaddedPlane``.

    Returns ((B, hidden) embeddings, ``plane -> (B, S_p)`` attention weights).
    """

    def __init__(self, in_dim: int, hidden: int = 128, attn_dim: int = 64, gated: bool = True,
                 dropout: float = 0.25) -> None:
        super().__init__()
        # dropout after the projection (Ilse et al.'s and CLAM's order), not on the (B, S, in_dim) input:
        # drawing a mask for every input feature of every slice was ~40% of the training time on CPU
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionPool(hidden, attn_dim, gated)
        self.out_dim = hidden

    def forward(self, batch: Batch):
        x, mask, _, _, sizes = union_planes(batch)
        z, weights = self.pool(self.embed(x), mask)
        return z, split_planes(weights, sizes)


@AGGREGATORS.register("mil")
class AttentionMIL(TorchAggregator):
    """Gated attention-MIL aggregator; ``attention(bags)`` gives each slice's weight.

    Args:
        hidden: slice embedding size = output dimension.
        attn_dim: attention network width.
        gated: gated (Ilse et al.'s best variant) or plain tanh attention.
        **kwargs: shared training options, see :class:`TorchAggregator`.
    """

    has_attention = True

    def __init__(self, hidden: int = 128, attn_dim: int = 64, gated: bool = True,
                 planes: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(planes=planes, **kwargs)
        self.hidden, self.attn_dim, self.gated = hidden, attn_dim, gated

    def _build_module(self, in_dim, planes, token_dim=None, scaler=None) -> nn.Module:
        return AttentionMILModule(in_dim, self.hidden, self.attn_dim, self.gated, self.dropout)
