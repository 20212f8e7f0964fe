"""Bags of slice features and the estimator interface every aggregator follows.

A *bag* is one subject's cached slices: ``plane -> PlaneBag`` where :class:`PlaneBag` holds the
(S, D) slice features and, when known, where each slice sits (positions in mm, indices) and its
patch tokens. Aggregators are scikit-learn-like estimators: parameters in ``__init__``,
``fit(bags, y=None) -> self``, ``transform(bags) -> (N, D')``, learned state ends in ``_``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from slice2vol.data.slicing import PLANES
from slice2vol.registry import Registry

AGGREGATORS: Registry = Registry("aggregator")

# Canonical plane order: outputs (concatenations, attention dicts) always follow it.
PLANE_ORDER: tuple[str, ...] = ("axial", "coronal", "sagittal")


class BagError(ValueError):
    """A bag (or list of bags) that an aggregator cannot use."""


@dataclass
class PlaneBag:
    """The cached slices of one plane of one subject.

    Attributes:
        features: float32 array of shape (S, D).
        positions: optional (S, 3) world coordinates (mm, RAS) of each slice centre.
        indices: optional (S,) slice index along the plane's axis.
        tokens: optional (S, T, Dt) patch tokens, T = gh * gw.
        token_grid: (gh, gw) of ``tokens``.
    """

    features: np.ndarray
    positions: np.ndarray | None = None
    indices: np.ndarray | None = None
    tokens: np.ndarray | None = None
    token_grid: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


Bag = dict  # plane -> PlaneBag


def as_plane_bag(value: Any, where: str) -> PlaneBag:
    """Accepts a PlaneBag, an (S, D) array or a mapping with ``features`` (+ positions, ...)."""
    if isinstance(value, PlaneBag):
        pb = value
    elif isinstance(value, Mapping):
        unknown = set(value) - {"features", "positions", "indices", "tokens", "token_grid"}
        if unknown or "features" not in value:
            raise BagError(f"{where}: a plane mapping needs 'features' (+ positions, indices, "
                           f"tokens, token_grid); got keys {sorted(value)}")
        pb = PlaneBag(**value)
    else:
        pb = PlaneBag(features=value)
    features = np.asarray(pb.features, dtype=np.float32)
    if features.ndim != 2:
        raise BagError(f"{where}: features must have shape (S, D), got {features.shape}")
    n = features.shape[0]
    if n == 0:
        raise BagError(f"{where}: empty bag (no slices); check min_foreground/stride of the cache")
    positions = indices = tokens = grid = None
    if pb.positions is not None:
        positions = np.asarray(pb.positions, dtype=np.float64)
        if positions.shape != (n, 3):
            raise BagError(f"{where}: positions must have shape ({n}, 3), got {positions.shape}")
    if pb.indices is not None:
        indices = np.asarray(pb.indices)
        if indices.shape != (n,):
            raise BagError(f"{where}: indices must have shape ({n},), got {indices.shape}")
    if pb.tokens is not None:
        tokens = np.asarray(pb.tokens, dtype=np.float32)
        grid = tuple(int(g) for g in pb.token_grid) if pb.token_grid is not None else None
        if tokens.ndim != 3 or tokens.shape[0] != n or grid is None or grid[0] * grid[1] != tokens.shape[1]:
            raise BagError(f"{where}: tokens must have shape ({n}, gh*gw, Dt) with token_grid "
                           f"(gh, gw); got {tokens.shape} and {pb.token_grid}")
    return PlaneBag(features, positions, indices, tokens, grid)


def as_bag(bag: Mapping[str, Any], where: str = "bag") -> Bag:
    """Normalises one subject's ``plane -> features`` mapping to ``plane -> PlaneBag``."""
    if not isinstance(bag, Mapping) or not bag:
        raise BagError(f"{where}: expected a non-empty mapping plane -> (S, D) features")
    out = {}
    for plane, value in bag.items():
        if plane not in PLANES:
            raise BagError(f"{where}: unknown plane {plane!r}; choose from {list(PLANES)}")
        out[plane] = as_plane_bag(value, f"{where}[{plane}]")
    return out


def check_bags(
    bags: Sequence[Mapping[str, Any]],
    planes: Sequence[str] | None = None,
    *,
    finite: bool = True,
) -> tuple[list[Bag], list[str], int]:
    """Validates a list of bags and resolves the planes to use.

    Args:
        bags: one mapping per subject.
        planes: planes to use; ``None`` = every plane all bags share.
        finite: refuse NaN/inf features (a silent NaN would poison every pooled vector).

    Returns:
        (bags as ``plane -> PlaneBag``, planes in canonical order, feature dimension D).

    Raises:
        BagError: no bags, missing planes, inconsistent dimensions, non-finite or empty bags.
    """
    if isinstance(bags, Mapping):
        raise BagError("expected a list of bags (one per subject), got a single mapping")
    if len(bags) == 0:
        raise BagError("no bags given")
    norm = [as_bag(b, f"bag {i}") for i, b in enumerate(bags)]
    if planes is None:
        common = set.intersection(*(set(b) for b in norm))
        if not common:
            raise BagError("the bags share no plane")
        use = [p for p in PLANE_ORDER if p in common]
    else:
        if isinstance(planes, str):
            planes = [planes]
        unknown = [p for p in planes if p not in PLANES]
        if unknown:
            raise BagError(f"unknown plane(s) {unknown}; choose from {list(PLANES)}")
        use = [p for p in PLANE_ORDER if p in set(planes)]
        for i, b in enumerate(norm):
            missing = [p for p in use if p not in b]
            if missing:
                raise BagError(f"bag {i}: missing plane(s) {missing} (has {sorted(b)})")
    dims = {b[p].features.shape[1] for b in norm for p in use}
    if len(dims) != 1:
        raise BagError(f"feature dimension differs between bags/planes: {sorted(dims)}")
    if finite:
        for i, b in enumerate(norm):
            for p in use:
                if not np.isfinite(b[p].features).all():
                    raise BagError(f"bag {i}[{p}]: non-finite (NaN/inf) features")
    return norm, use, dims.pop()


def slice_coordinates(pb: PlaneBag, plane: str) -> np.ndarray:
    """(S,) coordinate of each slice along its plane's axis, centred on the bag's middle.

    Millimetres when positions are known, else slice indices, else 0..S-1. Centring makes the
    coordinate independent of the scanner's world origin, so subjects are comparable.
    """
    if pb.positions is not None:
        coord = pb.positions[:, PLANES[plane]].astype(np.float64)
    elif pb.indices is not None:
        coord = pb.indices.astype(np.float64)
    else:
        coord = np.arange(len(pb), dtype=np.float64)
    return (coord - 0.5 * (coord.min() + coord.max())).astype(np.float32)


class Aggregator:
    """Base class: slice bags -> one vector per subject.

    Subclasses set ``requires_fit`` (trainable ones) and implement :meth:`transform`.
    """

    requires_fit: ClassVar[bool] = False
    #: supports ``attention(bags)``
    has_attention: ClassVar[bool] = False

    def __init__(self, planes: Sequence[str] | None = None) -> None:
        self.planes = planes

    # -- scikit-learn-like parameters ----------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        names: list[str] = []
        for klass in cls.__mro__:
            if klass is object or "__init__" not in vars(klass):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                    names.append(p.name)
        return names

    def get_params(self) -> dict:
        """Constructor parameters -> current values (JSON-able for provenance)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "Aggregator":
        known = self._param_names()
        for key, value in params.items():
            if key not in known:
                raise ValueError(f"{type(self).__name__}: unknown parameter {key!r}; known: {known}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- estimator API ---------------------------------------------------------------------------
    def fit(self, bags: Sequence[Mapping[str, Any]], y: Any = None) -> "Aggregator":
        """Parameter-free aggregators only validate the bags and remember the planes."""
        _, self.planes_, self.in_dim_ = check_bags(bags, self.planes)
        return self

    def transform(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Returns float32 array of shape (N, D')."""
        raise NotImplementedError

    def fit_transform(self, bags: Sequence[Mapping[str, Any]], y: Any = None) -> np.ndarray:
        return self.fit(bags, y).transform(bags)

    def attention(self, bags: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Per subject, ``plane -> (S,)`` slice weights summing to 1 over the bag."""
        raise NotImplementedError(f"{type(self).__name__} has no attention weights")

    def _build_module(self, in_dim: int, planes: Sequence[str], token_dim: int | None = None,
                      scaler: Any = None):
        """The torch module computing this aggregation on padded batches (used by fusion).

        The module maps a batch ``plane -> PaddedPlane`` to ((B, D'), attention dict or None) and
        has an ``out_dim`` attribute.
        """
        raise NotImplementedError(f"{type(self).__name__} has no torch module")

    def _resolve_planes(self, bags: Sequence[Mapping[str, Any]]) -> tuple[list[Bag], list[str], int]:
        """Fitted planes if fitted, else the constructor's (parameter-free use without fit)."""
        planes = getattr(self, "planes_", None) or self.planes
        norm, use, dim = check_bags(bags, planes)
        if getattr(self, "in_dim_", None) is not None and dim != self.in_dim_:
            raise BagError(f"feature dimension {dim} differs from the fitted {self.in_dim_}")
        return norm, use, dim


def build_aggregator(method: str, **params) -> Aggregator:
    """``AGGREGATORS.build`` with the import of every aggregator module done first."""
    import inspect

    import slice2vol.aggregate  # noqa: F401  (fills the registry)

    cls = AGGREGATORS.get(method)
    signature = inspect.signature(cls)
    if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = sorted(set(params) - set(signature.parameters))
        if unknown:
            allowed = [n for n in signature.parameters if n != "self"]
            raise ValueError(f"aggregator {method!r} takes no parameter(s) {unknown} "
                             f"(its parameters: {', '.join(allowed) or 'none'})")
    try:
        return cls(**params)
    except TypeError as err:  # a value of the wrong type (params.p=abc), found by the constructor's checks
        raise ValueError(f"aggregator {method!r}: bad parameter value(s) {params} ({err})") from None
