"""SimCLR: two MRI-augmented views of each crop/slice (or two crops of each subject), NT-Xent on projected embeddings."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from slice2vol.ssl import METHODS
from slice2vol.ssl.augment import MRIAugment
from slice2vol.ssl.backbones import Backbone
from slice2vol.ssl.base import SSLMethod, backbone_from_config, check_values
from slice2vol.ssl.distributed import gather_with_grad
from slice2vol.ssl.losses import nt_xent


class SimCLR(SSLMethod):
    """Contrastive learning of the backbone embedding (Chen et al. 2020).

    Args:
        backbone: any :class:`Backbone`.
        spatial_dims, in_channels, input_size: training sample geometry (views have this size).
        temperature: NT-Xent temperature.
        proj_hidden, proj_dim: projection head sizes (the head is dropped after training).
        augment: keyword arguments of :class:`~slice2vol.ssl.augment.MRIAugment`.
        positives: ``views`` = two augmented views of the same crop (Chen et al.); ``subject`` = one
            augmented view of each of two different crops of the same subject (the batch holds them in
            consecutive pairs: ``data.crops_per_subject: 2``), so what the two views share is the
            subject — its anatomy, tissue contrast, age — not the crop's position or content.
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 temperature: float = 0.1, proj_hidden: int = 512, proj_dim: int = 128,
                 augment: dict[str, Any] | None = None, positives: str = "views") -> None:
        # NT-Xent divides cosine similarities (in [-1, 1]) by the temperature: 0 or less has no meaning
        check_values("simclr", whole={"proj_hidden": (proj_hidden, 1), "proj_dim": (proj_dim, 1)},
                     real={"temperature": (temperature, 0.0, 100.0)}, open_low=("temperature",))
        super().__init__(backbone, spatial_dims, in_channels, input_size)
        if positives not in ("views", "subject"):
            raise ValueError(f"simclr: positives must be 'views' or 'subject', got {positives!r}")
        self.positives = positives
        # SimCLR's head: Linear-BN-ReLU-Linear. The batch norm also rules out the collapsed solution
        # (all embeddings equal, loss stuck at log(2B - 1)) that a plain MLP head reached on CPU runs.
        self.projector = nn.Sequential(nn.Linear(backbone.embed_dim, proj_hidden), nn.BatchNorm1d(proj_hidden),
                                       nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.temperature = temperature
        self.augment = MRIAugment(spatial_dims, self.input_size, **(augment or {}))

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.shape[0] < 2:
            raise ValueError("SimCLR needs a batch of at least 2 samples (the others are the negatives)")
        if self.positives == "subject":
            if batch.shape[0] % 2:
                raise ValueError("simclr positives=subject needs consecutive pairs of crops (data.crops_per_subject: 2)")
            z = self.projector(self.backbone(self.augment(batch)))
            z1, z2 = z[0::2], z[1::2]
        else:
            views = torch.cat([self.augment(batch), self.augment(batch)])
            z = self.projector(self.backbone(views))
            z1, z2 = z.chunk(2)
        with torch.no_grad():  # top-1 retrieval of the other view within this batch, a readable progress signal
            a = torch.nn.functional.normalize(z1.float(), dim=1)
            b = torch.nn.functional.normalize(z2.float(), dim=1)
            acc = float(((a @ b.t()).argmax(1) == torch.arange(len(a), device=a.device)).float().mean())
        loss = nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.temperature)  # negatives of every rank
        return loss, {"view_acc": acc}


@METHODS.register("simclr", dims=(2, 3), kind="contrastive")
def build(cfg) -> SimCLR:
    return SimCLR(backbone_from_config(cfg), cfg.spatial_dims, cfg.in_channels, cfg.input_size,
                  **cfg.method_params)
