"""The interface every SSL method implements, and small shared heads."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

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


def check_params(method: str, params: dict, allowed: Sequence[str]) -> None:
    """Refuses unknown method parameters with the list of known ones."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{method}: unknown method_params {unknown}; known: {sorted(allowed)}")
