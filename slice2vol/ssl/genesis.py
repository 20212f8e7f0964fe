"""Models-Genesis-style restoration (Zhou et al. 2019/2021): undo synthetic corruptions.

Each training sample is corrupted by, with the given probabilities: a random monotone (or inverted)
Bezier intensity curve, local voxel shuffling inside small boxes, and either in-painting (boxes
replaced with noise) or out-painting (everything outside a few boxes replaced with noise). The
encoder-decoder must restore the original. Corruptions are written for (C, *spatial) tensors of
any dimension and draw from the torch RNG. Inputs are expected in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch

from slice2vol.ssl import METHODS
from slice2vol.ssl.backbones import Backbone, ConvDecoder, probe_grid
from slice2vol.ssl.base import SSLMethod, backbone_from_config, check_values
from slice2vol.ssl.losses import reconstruction_loss


def _uniform(lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _randint(lo: int, hi: int) -> int:
    """Integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, max(lo, hi) + 1, ()))


def bezier_intensity(x: torch.Tensor, invert: bool | None = None, n_points: int = 256) -> torch.Tensor:
    """Maps intensities through a random cubic Bezier curve from (0, 0) to (1, 1) (or inverted).

    Args:
        x: (C, *spatial) in [0, 1].
        invert: use the decreasing curve; ``None`` draws it with probability 0.5.
    """
    p1, p2 = torch.rand(2), torch.rand(2)
    t = torch.linspace(0, 1, n_points)[:, None]
    curve = 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3  # p0 = (0, 0) drops out
    xs, ys = curve[:, 0].sort().values, curve[:, 1].sort().values
    if invert if invert is not None else _uniform() < 0.5:
        ys = ys.flip(0)
    xs, ys = xs.to(x.device, x.dtype), ys.to(x.device, x.dtype)
    v = x.clamp(0, 1)
    idx = torch.searchsorted(xs, v.contiguous()).clamp(1, n_points - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    w = ((v - x0) / (x1 - x0).clamp_min(1e-8)).clamp(0, 1)
    return y0 + w * (y1 - y0)


def _box(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> tuple[slice, ...]:
    """Random box with side in [lo, hi] per axis, fully inside ``shape``."""
    out = []
    for n, a, b in zip(shape, lo, hi):
        side = _randint(max(1, a), min(n, b))
        start = _randint(0, n - side)
        out.append(slice(start, start + side))
    return tuple(out)


def local_shuffle(x: torch.Tensor, n_blocks: int = 50, max_fraction: float = 0.125) -> torch.Tensor:
    """Shuffles voxels inside ``n_blocks`` random small boxes (side up to ``max_fraction`` of the image)."""
    out = x.clone()
    shape = x.shape[1:]
    hi = [max(1, int(n * max_fraction)) for n in shape]
    for _ in range(n_blocks):
        box = (slice(None), *_box(shape, [1] * len(shape), hi))
        block = out[box]
        flat = block.reshape(block.shape[0], -1)
        flat = flat[:, torch.randperm(flat.shape[1], device=x.device)]
        out[box] = flat.reshape(block.shape)
    return out


def in_paint(x: torch.Tensor, max_boxes: int = 5) -> torch.Tensor:
    """Fills 1..max_boxes boxes (sides 1/6 to 1/3 of the image) with uniform noise."""
    out = x.clone()
    shape = x.shape[1:]
    for i in range(max_boxes):
        if i and _uniform() >= 0.95:
            break
        box = (slice(None), *_box(shape, [n // 6 for n in shape], [n // 3 for n in shape]))
        out[box] = torch.rand(out[box].shape, device=x.device, dtype=x.dtype)
    return out


def out_paint(x: torch.Tensor, max_boxes: int = 5) -> torch.Tensor:
    """Replaces everything with noise except 1..max_boxes boxes (sides 3/7 to 4/7 of the image)."""
    out = torch.rand(x.shape, device=x.device, dtype=x.dtype)
    shape = x.shape[1:]
    for i in range(max_boxes):
        if i and _uniform() >= 0.95:
            break
        box = (slice(None), *_box(shape, [3 * n // 7 for n in shape], [4 * n // 7 for n in shape]))
        out[box] = x[box]
    return out


def corrupt(x: torch.Tensor, nonlinear_prob: float = 0.9, shuffle_prob: float = 0.5, paint_prob: float = 0.9,
            inpaint_rate: float = 0.2, shuffle_blocks: int = 50) -> torch.Tensor:
    """The Models Genesis corruption pipeline for one sample (C, *spatial)."""
    if _uniform() < nonlinear_prob:
        x = bezier_intensity(x)
    if _uniform() < shuffle_prob:
        x = local_shuffle(x, shuffle_blocks)
    if _uniform() < paint_prob:
        x = in_paint(x) if _uniform() < inpaint_rate else out_paint(x)
    return x


class Genesis(SSLMethod):
    """Restoration of corrupted inputs through the backbone feature map and a conv decoder.

    Args:
        backbone: any :class:`Backbone`.
        spatial_dims, in_channels, input_size: training sample geometry.
        nonlinear_prob, shuffle_prob, paint_prob, inpaint_rate, shuffle_blocks: see :func:`corrupt`
            (defaults from the Models Genesis paper, except fewer shuffle blocks for small crops).
        loss: ``mse`` (paper) or ``l1``.
    """

    def __init__(self, backbone: Backbone, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 nonlinear_prob: float = 0.9, shuffle_prob: float = 0.5, paint_prob: float = 0.9,
                 inpaint_rate: float = 0.2, shuffle_blocks: int = 50, loss: str = "mse",
                 decoder_min_width: int = 16) -> None:
        check_values("genesis", whole={"shuffle_blocks": (shuffle_blocks, 0), "decoder_min_width": (decoder_min_width, 1)},
                     real={"nonlinear_prob": (nonlinear_prob, 0.0, 1.0), "shuffle_prob": (shuffle_prob, 0.0, 1.0),
                           "paint_prob": (paint_prob, 0.0, 1.0), "inpaint_rate": (inpaint_rate, 0.0, 1.0)},
                     choice={"loss": (loss, ("mse", "l1"))})
        super().__init__(backbone, spatial_dims, in_channels, input_size)
        grid, features = probe_grid(backbone, in_channels, self.input_size)
        self.decoder = ConvDecoder(spatial_dims, features, in_channels, grid, self.input_size, decoder_min_width)
        self.corruption = dict(nonlinear_prob=nonlinear_prob, shuffle_prob=shuffle_prob, paint_prob=paint_prob,
                               inpaint_rate=inpaint_rate, shuffle_blocks=shuffle_blocks)
        self.loss_kind = loss

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) corrupted -> restored (B, C, *S)."""
        return self.decoder(self.backbone.feature_map(x))

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        corrupted = torch.stack([corrupt(x, **self.corruption) for x in batch])
        return reconstruction_loss(self.restore(corrupted), batch, self.loss_kind), {}


@METHODS.register("genesis", dims=(2, 3), kind="restoration")
def build(cfg) -> Genesis:
    return Genesis(backbone_from_config(cfg), cfg.spatial_dims, cfg.in_channels, cfg.input_size,
                   **cfg.method_params)
