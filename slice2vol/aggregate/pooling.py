"""Parameter-free pooling of slice features: mean, max and generalised mean (GeM).

All slices of the chosen planes are pooled together (a plane with more kept slices weighs more);
use ``fusion`` to pool each plane separately and concatenate. No fit and no labels needed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from slice2vol.aggregate.base import AGGREGATORS, Aggregator
from slice2vol.aggregate.trainer import Batch, union_planes


def pool_array(x: np.ndarray, kind: str, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """(S, D) -> (D,) float32. GeM clamps to ``eps`` first, as in Radenović et al. (2018)."""
    x = x.astype(np.float64)
    if kind == "mean":
        out = x.mean(0)
    elif kind == "max":
        out = x.max(0)
    elif kind == "gem":
        out = np.power(np.power(np.clip(x, eps, None), p).mean(0), 1.0 / p)
    else:
        raise ValueError(f"unknown pooling {kind!r}")
    return out.astype(np.float32)


class MaskedPool(nn.Module):
    """Torch twin of :func:`pool_array` over padded batches (the branch of a trainable fusion).

    Batches hold standardised features; with ``mean``/``std`` (the standardiser's, shape (D,))
    pooling runs on the raw features and the result is standardised again, so GeM stays GeM.

    Input: a batch ``plane -> PaddedPlane``; output ((B, D), None).
    """

    def __init__(self, kind: str, in_dim: int, p: float = 3.0, eps: float = 1e-6,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        super().__init__()
        self.kind, self.p, self.eps, self.out_dim = kind, p, eps, in_dim
        self.raw = mean is not None
        if self.raw:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, batch: Batch):
        x, mask, _, _, _ = union_planes(batch)
        if self.raw:
            x = x * self.std + self.mean
        out = self._pool(x, mask)
        return ((out - self.mean) / self.std if self.raw else out), None

    def _pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).float()
        if self.kind == "mean":
            out = (x * m).sum(1) / m.sum(1).clamp_min(1)
        elif self.kind == "max":
            out = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        else:
            out = ((x.clamp_min(self.eps) ** self.p) * m).sum(1) / m.sum(1).clamp_min(1)
            out = out ** (1.0 / self.p)
        return out


class PoolingAggregator(Aggregator):
    """Base of the parameter-free poolers; ``transform`` works without ``fit``."""

    kind = "mean"

    def _pool(self, x: np.ndarray) -> np.ndarray:
        return pool_array(x, self.kind)

    def transform(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(N, D) pooled features of the selected planes' slices (raw, not standardised)."""
        norm, planes, _ = self._resolve_planes(bags)
        return np.stack([self._pool(np.concatenate([b[p].features for p in planes])) for b in norm])

    def _build_module(self, in_dim: int, planes: Sequence[str], token_dim: int | None = None,
                      scaler=None) -> nn.Module:
        stats = {} if scaler is None else {"mean": scaler.mean, "std": scaler.std}
        return MaskedPool(self.kind, in_dim, **stats)


@AGGREGATORS.register("mean")
class MeanPooling(PoolingAggregator):
    """Average of the slice features (the usual "average the slices" baseline)."""

    kind = "mean"


@AGGREGATORS.register("max")
class MaxPooling(PoolingAggregator):
    """Element-wise maximum over slices."""

    kind = "max"


@AGGREGATORS.register("gem")
class GeMPooling(PoolingAggregator):
    """Generalised mean ``(mean_s clamp(x, eps)^p)^(1/p)``: p=1 is mean, p -> inf is max.

    Args:
        p: the exponent.
        eps: clamp floor; GeM is meant for non-negative (post-ReLU) features.
    """

    kind = "gem"

    def __init__(self, p: float = 3.0, eps: float = 1e-6, planes: Sequence[str] | None = None) -> None:
        super().__init__(planes)
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}")
        self.p, self.eps = p, eps

    def _pool(self, x: np.ndarray) -> np.ndarray:
        return pool_array(x, "gem", self.p, self.eps)

    def _build_module(self, in_dim: int, planes: Sequence[str], token_dim: int | None = None,
                      scaler=None) -> nn.Module:
        stats = {} if scaler is None else {"mean": scaler.mean, "std": scaler.std}
        return MaskedPool("gem", in_dim, self.p, self.eps, **stats)

