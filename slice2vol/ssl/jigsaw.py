"""Jigsaw puzzles (Noroozi & Favaro 2016; 3D: Taleb et al. 2020): classify the tile permutation.

A sample is cut into ``grid ** d`` tiles (each randomly jittered inside its cell so edges do not give
the answer), the tiles are shuffled by one of ``num_permutations`` fixed permutations chosen for
large mutual Hamming distance, each tile is embedded by the shared backbone, and an MLP on the
concatenated embeddings predicts which permutation was used.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch

from slice2vol.ssl import METHODS
from slice2vol.ssl.backbones import Backbone
from slice2vol.ssl.base import SSLMethod, backbone_from_config, check_values, mlp
from slice2vol.ssl.losses import accuracy, classification_loss


def hamming_permutations(n_tiles: int, n_perms: int, seed: int = 0, n_candidates: int = 20000) -> np.ndarray:
    """Greedy maximal-minimum-Hamming-distance permutation set, shape (n_perms, n_tiles), row 0 = identity."""
    if n_perms > math.factorial(n_tiles):
        raise ValueError(f"only {math.factorial(n_tiles)} permutations of {n_tiles} tiles exist, asked {n_perms}")
    rng = np.random.default_rng(seed)
    if math.factorial(n_tiles) <= n_candidates:
        candidates = np.array(list(itertools.permutations(range(n_tiles))))
    else:
        candidates = np.unique(np.array([rng.permutation(n_tiles) for _ in range(n_candidates)]), axis=0)
    chosen = [np.arange(n_tiles)]
    min_dist = (candidates != chosen[0]).sum(1)
    while len(chosen) < n_perms:
        best = np.flatnonzero(min_dist == min_dist.max())
        pick = candidates[rng.choice(best)]
        chosen.append(pick)
        min_dist = np.minimum(min_dist, (candidates != pick).sum(1))
    return np.stack(chosen)


class Jigsaw(SSLMethod):
    """Permutation classification over jittered tiles.

    Args:
        backbone: built for the tile size (``tile_size(input_size, grid, jitter)``).
        spatial_dims, in_channels, input_size: training sample geometry.
        grid: tiles per side (2 in 3D = 8 tiles, 3 in 2D = 9 tiles are the usual choices).
        num_permutations: classes.
        jitter: fraction of a cell side left for the random tile offset.
        hidden: MLP head width.
        perm_seed: seed of the permutation set (part of the method, not of the run).
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 grid: int = 2, num_permutations: int = 24, jitter: float = 0.125, hidden: int = 512,
                 perm_seed: int = 0) -> None:
        # a jitter of 1 leaves tiles of no size; one permutation is no classification task
        check_values("jigsaw", whole={"grid": (grid, 2), "num_permutations": (num_permutations, 2), "hidden": (hidden, 1),
                                      "perm_seed": (perm_seed, 0)},
                     real={"jitter": (jitter, 0.0, 1.0)}, open_high=("jitter",))
        super().__init__(backbone, spatial_dims, in_channels, input_size)
        self.grid, self.jitter = grid, jitter
        self.cell = tuple(s // grid for s in self.input_size)
        self.tile = tile_size(self.input_size, grid, jitter)
        n_tiles = grid ** spatial_dims
        perms = torch.from_numpy(hamming_permutations(n_tiles, num_permutations, perm_seed))
        self.register_buffer("permutations", perms.long(), persistent=True)
        self.head = mlp(n_tiles * backbone.embed_dim, hidden, num_permutations)

    def tiles(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, n_tiles, C, *tile) in C order of the cell grid, each randomly offset in its cell."""
        out = []
        for cell_index in itertools.product(range(self.grid), repeat=self.spatial_dims):
            slices = [slice(None), slice(None)]
            for axis, c in enumerate(cell_index):
                free = self.cell[axis] - self.tile[axis]
                offset = int(torch.randint(0, free + 1, ()).item())
                start = c * self.cell[axis] + offset
                slices.append(slice(start, start + self.tile[axis]))
            out.append(batch[tuple(slices)])
        return torch.stack(out, dim=1)

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        b = batch.shape[0]
        tiles = self.tiles(batch)
        labels = torch.randint(0, len(self.permutations), (b,)).to(batch.device)
        order = self.permutations[labels]  # (B, n_tiles): position i shows tile order[i]
        shuffled = tiles[torch.arange(b, device=batch.device)[:, None], order]
        feats = self.backbone(shuffled.flatten(0, 1)).view(b, -1)
        logits = self.head(feats)
        return classification_loss(logits, labels), {"acc": accuracy(logits, labels)}


def tile_size(input_size: Sequence[int], grid: int, jitter: float) -> tuple[int, ...]:
    """Side of a jittered tile: ``floor(cell * (1 - jitter))`` per axis."""
    return tuple(max(1, int((s // grid) * (1 - jitter))) for s in input_size)


_DEFAULTS = {2: {"grid": 3, "num_permutations": 64}, 3: {"grid": 2, "num_permutations": 24}}


@METHODS.register("jigsaw", dims=(2, 3), kind="pretext")
def build(cfg) -> Jigsaw:
    params = {**_DEFAULTS[cfg.spatial_dims], **cfg.method_params}
    # the backbone is sized for the tile: grid and jitter are checked before it is built
    check_values("jigsaw", whole={"grid": (params["grid"], 2)}, real={"jitter": (params.get("jitter", 0.125), 0.0, 1.0)},
                 open_high=("jitter",))
    tile = tile_size(cfg.input_size, params["grid"], params.get("jitter", 0.125))
    return Jigsaw(backbone_from_config(cfg, img_size=tile), cfg.spatial_dims, cfg.in_channels, cfg.input_size,
                  **params)
