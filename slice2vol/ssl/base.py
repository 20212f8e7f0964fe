"""The interface every SSL method implements, and small shared heads."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from slice2vol.config import check_real, check_whole
from slice2vol.ssl.backbones import Backbone, build_backbone


class SSLMethod(nn.Module):
    """A backbone plus whatever the pretext task needs (heads, decoders, augmentations).

    Subclasses implement :meth:`training_step`. All randomness (views, masks, corruptions,
    pretext labels) must come from the global torch RNG so that the trainer's checkpoint of that
    state makes resumed runs exact.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        input_size: spatial size of a training sample.
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims, self.in_channels, self.input_size = spatial_dims, in_channels, tuple(input_size)

    @property
    def encoder(self) -> Backbone:
        """The network kept after pretraining: (B, C, *spatial) -> (B, embed_dim)."""
        return self.backbone

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One forward pass on clean samples (B, C, *input_size) -> (scalar loss, extra metrics)."""
        raise NotImplementedError

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`training_step`; calling the module (as DistributedDataParallel does) runs the step."""
        return self.training_step(batch)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> GELU -> Linear head."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def backbone_from_config(cfg, img_size: Sequence[int] | None = None) -> Backbone:
    """Builds ``cfg.backbone`` (an :class:`~slice2vol.ssl.config.SSLConfig`) for its dims and input size."""
    return build_backbone(cfg.backbone.name, cfg.spatial_dims, cfg.in_channels,
                          img_size or cfg.input_size, **cfg.backbone.params)


def check_values(method: str, *, whole: dict[str, tuple[object, int]] | None = None,
                 real: dict[str, tuple[object, float, float]] | None = None, open_low: Sequence[str] = (),
                 open_high: Sequence[str] = (), choice: dict[str, tuple[object, Sequence[str]]] | None = None) -> None:
    """Refuses method parameters out of range when the method is built, before any volume is read (a
    negative SimCLR temperature or a mask ratio of 1 used to train, or fail, only after data loading).

    Args:
        method: the method's key, named in the message (``simclr: method_params.temperature must ...``).
        whole: name -> (value, lowest allowed whole number).
        real: name -> (value, low, high); bounds closed unless the name is in ``open_low``/``open_high``.
        choice: name -> (value, allowed strings).

    Raises:
        ValueError: ``<method>: method_params.<name> must be ..., got <value>``.
    """
    try:
        for name, (value, low) in (whole or {}).items():
            check_whole(f"method_params.{name}", value, low)
        for name, (value, low, high) in (real or {}).items():
            check_real(f"method_params.{name}", value, low, high, low_open=name in open_low,
                       high_open=name in open_high)
        for name, (value, allowed) in (choice or {}).items():
            if value not in allowed:
                raise ValueError(f"method_params.{name} must be one of {list(allowed)}, got {value!r}")
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None


def check_params(method: str, params: dict, allowed: Sequence[str]) -> None:
    """Refuses unknown method parameters with the list of known ones."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{method}: unknown method_params {unknown}; known: {sorted(allowed)}")
