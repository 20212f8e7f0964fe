"""SimCLR: two MRI-augmented views of each crop/slice, NT-Xent on projected embeddings."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from slice2vol.ssl import METHODS
from slice2vol.ssl.augment import MRIAugment
from slice2vol.ssl.backbones import Backbone
from slice2vol.ssl.base import SSLMethod, backbone_from_config
from slice2vol.ssl.losses import nt_xent


class SimCLR(SSLMethod):
    """Contrastive learning of the backbone embedding (Chen et al. 2020).

    Args:
        backbone: any :class:`Backbone`.
        spatial_dims, in_channels, input_size: training sample geometry (views have this size).
        temperature: NT-Xent temperature.
        proj_hidden, proj_dim: projection head sizes (the head is dropped after training).
        augment: keyword arguments of :class:`~slice2vol.ssl.augment.MRIAugment`.
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 temperature: float = 0.1, proj_hidden: int = 512, proj_dim: int = 128,
                 augment: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, spatial_dims, in_channels, input_size)
        # SimCLR's head: Linear-BN-ReLU-Linear. The batch norm also rules out the collapsed solution
        # (all embeddings equal, loss stuck at log(2B - 1)) that a plain MLP head reached on CPU runs.
        self.projector = nn.Sequential(nn.Linear(backbone.embed_dim, proj_hidden), nn.BatchNorm1d(proj_hidden),
                                       nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.temperature = temperature
        self.augment = MRIAugment(spatial_dims, self.input_size, **(augment or {}))

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.shape[0] < 2:
            raise ValueError("SimCLR needs a batch of at least 2 samples (the others are the negatives)")
        views = torch.cat([self.augment(batch), self.augment(batch)])
        z = self.projector(self.backbone(views))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():  # top-1 retrieval of the other view, a readable progress signal
            zn = torch.nn.functional.normalize(z.float(), dim=1)
            sim = zn[: len(z1)] @ zn[len(z1):].t()
            acc = float((sim.argmax(1) == torch.arange(len(z1), device=sim.device)).float().mean())
        return loss, {"view_acc": acc}


@METHODS.register("simclr", dims=(2, 3), kind="contrastive")
def build(cfg) -> SimCLR:
    return SimCLR(backbone_from_config(cfg), cfg.spatial_dims, cfg.in_channels, cfg.input_size,
                  **cfg.method_params)
