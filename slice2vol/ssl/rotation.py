"""Rotation prediction (Gidaris et al. 2018): classify which 90-degree rotation was applied.

2D: 4 classes (0, 90, 180, 270 degrees). 3D: 10 classes — the identity and the three non-trivial
quarter turns about each of the three axes. Inputs must be square/cubic so shapes do not change.
"""

from __future__ import annotations

from typing import Sequence

import torch

from slice2vol.ssl import METHODS
from slice2vol.ssl.backbones import Backbone
from slice2vol.ssl.base import SSLMethod, backbone_from_config, check_values, mlp
from slice2vol.ssl.losses import accuracy, classification_loss


def rotation_classes(spatial_dims: int) -> list[tuple[int, tuple[int, int]]]:
    """(k quarter turns, spatial plane) per class; class 0 is the identity."""
    if spatial_dims == 2:
        return [(k, (0, 1)) for k in range(4)]
    classes = [(0, (0, 1))]
    for plane in ((1, 2), (0, 2), (0, 1)):  # about x, y, z
        classes += [(k, plane) for k in (1, 2, 3)]
    return classes


def rotate(sample: torch.Tensor, k: int, plane: tuple[int, int]) -> torch.Tensor:
    """Rotates one sample (C, *spatial) by ``k`` quarter turns in spatial ``plane``."""
    return torch.rot90(sample, k, dims=(plane[0] + 1, plane[1] + 1)) if k else sample


class Rotation(SSLMethod):
    """Backbone embedding -> MLP -> rotation class.

    Args:
        backbone: any :class:`Backbone`.
        spatial_dims, in_channels, input_size: training sample geometry (all sides equal).
        hidden: MLP head width.
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 hidden: int = 256) -> None:
        check_values("rotation", whole={"hidden": (hidden, 1)})
        super().__init__(backbone, spatial_dims, in_channels, input_size)
        if len(set(self.input_size)) != 1:
            raise ValueError(f"rotation needs square/cubic inputs, got {self.input_size}")
        self.classes = rotation_classes(spatial_dims)
        self.head = mlp(backbone.embed_dim, hidden, len(self.classes))

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        labels = torch.randint(0, len(self.classes), (batch.shape[0],))
        rotated = torch.stack([rotate(x, *self.classes[int(c)]) for x, c in zip(batch, labels)])
        labels = labels.to(batch.device)
        logits = self.head(self.backbone(rotated))
        return classification_loss(logits, labels), {"acc": accuracy(logits, labels)}


@METHODS.register("rotation", dims=(2, 3), kind="pretext")
def build(cfg) -> Rotation:
    return Rotation(backbone_from_config(cfg), cfg.spatial_dims, cfg.in_channels, cfg.input_size,
                    **cfg.method_params)
