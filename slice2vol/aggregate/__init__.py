"""Slice-to-volume aggregation: cached (S, D) slice features per plane -> one vector per subject.

Aggregators are scikit-learn-like estimators registered in :data:`AGGREGATORS`:

=============  =========  ==========================================================
name           trainable  what
=============  =========  ==========================================================
mean/max/gem   no         pooling over the slices of the chosen planes
mil            yes        gated attention-MIL (Ilse et al. 2018), attention exposed
transformer    yes        slice transformer with slice-position encoding, CLS token
fusion         depends    per-plane aggregation, then concatenation or plane attention
head3d         yes        3D convolutions over slice tokens stacked into a volume
=============  =========  ==========================================================

Trainable ones learn from labels (``fit(bags, y)``) or without (``fit(bags)``: contrastive
between two views of each subject). :func:`aggregate_store` runs one on a feature store and
writes volume embeddings; :func:`cross_validate_aggregator` evaluates one with subject-level CV.
"""

from slice2vol.aggregate.base import (
    AGGREGATORS,
    PLANE_ORDER,
    Aggregator,
    BagError,
    PlaneBag,
    as_bag,
    build_aggregator,
    check_bags,
)
from slice2vol.aggregate.trainer import TorchAggregator
from slice2vol.aggregate import fusion, head3d, mil, pooling, transformer  # noqa: F401,E402  (register)
from slice2vol.aggregate.evaluate import CVResult, cross_validate_aggregator
from slice2vol.aggregate.store import aggregate_store, load_attention, load_bags

__all__ = [
    "AGGREGATORS",
    "CVResult",
    "aggregate_store",
    "cross_validate_aggregator",
    "load_attention",
    "load_bags",
    "PLANE_ORDER",
    "Aggregator",
    "BagError",
    "PlaneBag",
    "TorchAggregator",
    "as_bag",
    "build_aggregator",
    "check_bags",
]
