"""Parameter-free pooling of slice features: mean, max and generalised mean (GeM).

All slices of the chosen planes are pooled together (a plane with more kept slices weighs more);
use ``fusion`` to pool each plane separately and concatenate. No fit and no labels needed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from slice2vol.aggregate.base import AGGREGATORS, Aggregator
from slice2vol.aggregate.trainer import Batch, union_planes


def gem_floor(scale: float, eps: float) -> float:
    """GeM's clamp floor for a bag whose largest |feature| is ``scale``: ``eps * min(1, scale)``.

    ``eps`` itself for features of normal scale (largest magnitude >= 1), so GeM is then the
    standard one; for tinier features (random-init BatchNorm nets give ~1e-8) the floor shrinks with
    them, where a fixed ``eps`` would lift every value to ``eps`` and give every subject the same vector.
    """
    return eps * min(1.0, scale)


def pool_array(x: np.ndarray, kind: str, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """Pools one bag of slice features.

    GeM is Radenović et al. (2018), ``(mean_s clamp(x, floor)^p)^(1/p)`` per dimension, with the
    floor of :func:`gem_floor` (``eps`` for features of normal scale). It is computed in float64 as
    ``m * (mean_s (clamp(x, floor) / m)^p)^(1/p)`` with ``m`` the per-dimension maximum of the
    clamped features: the same value, but the largest term of the mean is 1, so neither a large
    ``p`` nor tiny features underflow it to 0 (``p -> inf`` gives the max, as it should).

    Args:
        x: (S, D) slice features.
        kind: ``mean``, ``max`` or ``gem``.
        p: GeM exponent.
        eps: GeM clamp floor for features of normal scale.

    Returns:
        (D,) float32.
    """
    x = x.astype(np.float64)
    if kind == "mean":
        out = x.mean(0)
    elif kind == "max":
        out = x.max(0)
    elif kind == "gem":
        clamped = np.maximum(x, gem_floor(float(np.abs(x).max()) if x.size else 0.0, eps))
        peak = clamped.max(0)
        safe = np.where(peak > 0, peak, 1.0)  # a dimension that is 0 everywhere (floor 0) pools to 0
        out = peak * np.power(np.power(clamped / safe, p).mean(0), 1.0 / p)
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
        else:  # the scale-relative floor and max-normalised form of pool_array
            scale = x.detach().abs().masked_fill(~mask.unsqueeze(-1), 0).flatten(1).amax(1)  # (B,)
            floor = self.eps * scale.clamp_max(1.0)
            # padding set to 0 before the power: (99 / 1e-8)^p would be inf, and inf * 0 NaN
            clamped = torch.maximum(x, floor[:, None, None]).masked_fill(~mask.unsqueeze(-1), 0)
            peak = clamped.amax(1)  # (B, D), >= 0
            alive = peak > 0  # False only for an all-zero bag (floor 0)
            ratio = clamped / torch.where(alive, peak, torch.ones_like(peak)).unsqueeze(1)
            # 1 where a 0 would be raised to the power: 0^p has an infinite gradient for p < 1
            ratio = torch.where(alive.unsqueeze(1) & mask.unsqueeze(-1), ratio, torch.ones_like(ratio))
            mean = ((ratio ** self.p) * m).sum(1) / m.sum(1).clamp_min(1)
            out = peak * torch.where(alive, mean, torch.ones_like(mean)) ** (1.0 / self.p)
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

    The clamp floor is ``eps`` for features of normal scale and ``eps`` times the bag's largest
    |feature| when that is below 1 (see :func:`gem_floor`), so tiny features keep their signal; the
    pooling is computed stably for any finite ``p`` (see :func:`pool_array`).

    Args:
        p: the exponent (finite, > 0).
        eps: clamp floor (>= 0); GeM is meant for non-negative (post-ReLU) features.
    """

    kind = "gem"

    def __init__(self, p: float = 3.0, eps: float = 1e-6, planes: Sequence[str] | None = None) -> None:
        super().__init__(planes)
        for name, value in (("p", p), ("eps", eps)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"GeM {name} must be a number, got {value!r}")
        if not (math.isfinite(p) and p > 0):  # p=nan passed `p <= 0` and gave NaN embeddings
            raise ValueError(f"GeM exponent p must be > 0 and finite, got {p}")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"GeM clamp eps must be >= 0 and finite, got {eps}")
        self.p, self.eps = p, eps

    def _pool(self, x: np.ndarray) -> np.ndarray:
        return pool_array(x, "gem", self.p, self.eps)

    def _build_module(self, in_dim: int, planes: Sequence[str], token_dim: int | None = None,
                      scaler=None) -> nn.Module:
        stats = {} if scaler is None else {"mean": scaler.mean, "std": scaler.std}
        return MaskedPool("gem", in_dim, self.p, self.eps, **stats)

