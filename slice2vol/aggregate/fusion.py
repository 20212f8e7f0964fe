"""Three-plane fusion: aggregate each plane on its own, then concatenate or attend across planes.

``base`` is any registered aggregator, applied to each plane separately (own weights per plane
when trainable). ``mode="concat"`` stacks the per-plane vectors (P * D'); ``mode="attention"``
learns gated attention over the planes (D') and exposes its weights under the key ``"planes"``.
Fusion of a parameter-free base by concatenation needs no fit.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from slice2vol.aggregate.base import AGGREGATORS, Aggregator, build_aggregator
from slice2vol.aggregate.mil import GatedAttentionPool
from slice2vol.aggregate.trainer import Batch, TorchAggregator


class FusionModule(nn.Module):
    """Per-plane branches + concatenation or plane attention.

    Input: a batch ``plane -> PaddedPlane`` holding every fused plane. Output: ((B, D_out),
    attention dict: the branches' per-slice weights and, in attention mode, ``"planes"`` (B, P)).
    """

    def __init__(self, branches: dict[str, nn.Module], mode: str, attn_dim: int = 64) -> None:
        super().__init__()
        self.planes = list(branches)
        self.branches = nn.ModuleDict(branches)
        dims = {b.out_dim for b in branches.values()}
        self.mode = mode
        if mode == "concat":
            self.out_dim = sum(b.out_dim for b in branches.values())
            self.pool = None
        else:
            if len(dims) != 1:
                raise ValueError(f"plane attention needs equal branch dimensions, got {dims}")
            self.out_dim = dims.pop()
            self.pool = GatedAttentionPool(self.out_dim, attn_dim)

    def forward(self, batch: Batch):
        outs, attention = [], {}
        for plane in self.planes:
            z, att = self.branches[plane]({plane: batch[plane]})
            outs.append(z)
            if att:
                attention.update(att)
        if self.mode == "concat":
            return torch.cat(outs, 1), (attention or None)
        stacked = torch.stack(outs, 1)  # (B, P, D)
        mask = torch.ones(stacked.shape[:2], dtype=torch.bool, device=stacked.device)
        z, weights = self.pool(stacked, mask)
        attention["planes"] = weights
        return z, attention


@AGGREGATORS.register("fusion")
class PlaneFusion(TorchAggregator):
    """Per-plane aggregation, then fusion across planes.

    Args:
        base: registered aggregator applied per plane (``mean``, ``gem``, ``mil``, ...).
        mode: ``concat`` or ``attention`` (across planes).
        base_params: constructor parameters of the base (e.g. ``{"hidden": 64}`` for ``mil``).
        attn_dim: width of the plane attention network.
        **kwargs: shared training options, see :class:`TorchAggregator` (used when trainable).
    """

    plane_subsets_ok = False

    def __init__(self, base: str = "mean", mode: str = "concat", base_params: dict | None = None,
                 attn_dim: int = 64, planes: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(planes=planes, **kwargs)
        if base == "fusion":
            raise ValueError("fusion cannot use fusion as its base")
        if mode not in ("concat", "attention"):
            raise ValueError(f"mode must be concat or attention, got {mode!r}")
        self.base, self.mode, self.base_params, self.attn_dim = base, mode, base_params, attn_dim
        AGGREGATORS.get(base)  # unknown names fail here, not at fit time

    @property
    def _base_cls(self) -> type:
        return AGGREGATORS.get(self.base)

    def _base(self) -> Aggregator:
        params = dict(self.base_params or {})
        if issubclass(self._base_cls, TorchAggregator):
            params.setdefault("dropout", self.dropout)
        return build_aggregator(self.base, **params)

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        return self.mode == "attention" or bool(self._base_cls.requires_fit)

    @property
    def has_attention(self) -> bool:  # type: ignore[override]
        return self.mode == "attention" or bool(self._base_cls.has_attention)

    @property
    def wants_tokens(self) -> bool:  # type: ignore[override]
        return bool(getattr(self._base_cls, "wants_tokens", False))

    def fit(self, bags: Sequence[Mapping[str, Any]], y: Any = None) -> "PlaneFusion":
        if not self.requires_fit:
            Aggregator.fit(self, bags)
            return self
        return super().fit(bags, y)

    def transform(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(N, P * D) for concatenation, (N, D') for plane attention."""
        if self.requires_fit:
            return super().transform(bags)
        norm, planes, _ = self._resolve_planes(bags)
        base = self._base()
        return np.concatenate([base.set_params(planes=[p]).transform(norm) for p in planes], 1)

    def _build_module(self, in_dim, planes, token_dim=None, scaler=None) -> nn.Module:
        branches = {}
        for plane in planes:
            base = self._base()
            branches[plane] = base._build_module(in_dim, [plane], token_dim, scaler=self.scaler_)
        return FusionModule(branches, self.mode, self.attn_dim)
