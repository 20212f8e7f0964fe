"""Native-3D (and 2D) self-supervised baselines, trainable on the user's own cohort.

One file per method — :mod:`autoencoder`, :mod:`simclr`, :mod:`mae`, :mod:`jigsaw`, :mod:`rotation`,
:mod:`genesis` — each registering a builder ``build(cfg: SSLConfig) -> SSLMethod`` in
:data:`METHODS`; the losses are pure functions in :mod:`losses`. :mod:`trainer` runs and checkpoints
a pretraining, :mod:`export` writes volume embeddings of a trained 3D encoder into the feature
store, and :mod:`encoder2d` registers trained 2D encoders as ``ssl2d/<method>`` encoders for the
slice caching job.

Example:
    >>> from slice2vol.ssl import SSLConfig, build_method
    >>> method = build_method(SSLConfig(method="rotation", spatial_dims=3))
    >>> method.encoder.embed_dim
"""

from __future__ import annotations

from slice2vol.registry import Registry

METHODS: Registry = Registry("ssl method")

from slice2vol.ssl.config import BackboneConfig, DataConfig, SSLConfig, TrainConfig  # noqa: E402
from slice2vol.ssl import autoencoder, genesis, jigsaw, mae, rotation, simclr  # noqa: E402,F401
from slice2vol.ssl import encoder2d  # noqa: E402,F401  - registers ssl2d/<method> encoders


def build_method(cfg: SSLConfig):
    """Builds the method ``cfg.method`` with its backbone (random initialisation, current torch seed).

    Raises:
        KeyError: unknown method (the message lists the known ones).
        ValueError: a method that does not support ``cfg.spatial_dims`` or bad parameters.
    """
    builder = METHODS.get(cfg.method)
    dims = METHODS.meta(cfg.method).get("dims", (2, 3))
    if cfg.spatial_dims not in dims:
        raise ValueError(f"{cfg.method}: spatial_dims={cfg.spatial_dims} not supported (supports {list(dims)})")
    try:
        return builder(cfg)
    except TypeError as err:
        raise ValueError(f"{cfg.method}: bad method_params {sorted(cfg.method_params)} ({err})") from None


__all__ = ["METHODS", "BackboneConfig", "DataConfig", "SSLConfig", "TrainConfig", "build_method"]
