"""Exact values of the 2D->3D adaptations where the suite's networks hid them: non-square kernels,
a learned depth embedding resampled to another depth, and mean pooling past prefix tokens."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from slice2vol.adapt import inflate_conv, vit3d_encoder
from slice2vol.adapt.base import depth_of
from slice2vol.encoders import build_encoder
from tests.adapt.helpers import TINY_VIT, normalise


def test_a_non_square_kernel_gets_no_depth_extent():
    """Inception's 1 x 7 and 7 x 1 kernels stay one voxel deep (I3D inflates square kernels only)."""
    assert depth_of((1, 7)) == 1 and depth_of((7, 1)) == 1 and depth_of((3, 3)) == 3 and depth_of(5) == 5
    conv = inflate_conv(nn.Conv2d(3, 4, (1, 7), padding=(0, 3)))
    assert conv.weight.shape[-1] == 1
    x = torch.rand(1, 3, 6, 9, 5)
    assert conv(x).shape == (1, 4, 6, 9, 5)


def _vit(**kwargs):
    torch.manual_seed(0)
    return build_encoder("timm/vit_small_patch16_224", weights="random", **{**TINY_VIT, **kwargs})


def test_a_learned_depth_embedding_is_resampled_linearly_end_to_end():
    """A depth embedding learned on 2 depth patches and used on 5 is interpolated linearly with its
    end values kept (align_corners=True): a ramp 0..1 becomes 0, 0.25, 0.5, 0.75, 1."""
    model = vit3d_encoder(_vit())
    trunk = model.trunk
    n = trunk.depth_pos_embed.shape[-1]
    with torch.no_grad():
        trunk.depth_pos_embed.copy_(torch.linspace(0, 1, n).expand_as(trunk.depth_pos_embed))
        _, flat = trunk.position_embedding((*trunk.grid_2d, 2 * n + 1))
        _, same = trunk.position_embedding((*trunk.grid_2d, n))
    ga, gb = trunk.grid_2d
    patches = flat.reshape(ga, gb, 2 * n + 1, -1)
    np.testing.assert_allclose((patches[0, 0, :, 0] - patches[0, 0, 0, 0]).numpy(), np.linspace(0, 1, 2 * n + 1),
                               atol=1e-6)
    np.testing.assert_allclose((same.reshape(ga, gb, n, -1)[0, 0, :, 0] - patches[0, 0, 0, 0]).numpy(),
                               np.linspace(0, 1, n), atol=1e-6)


def test_mean_pooling_leaves_the_class_token_out_as_timm_does():
    """A ViT with a class token and timm's average pooling (prefix tokens left out): a volume one patch
    deep of one repeated slice embeds as the 2D model embeds that slice."""
    encoder = _vit(pooling="mean", model_kwargs=dict(depth=2, class_token=True, global_pool="avg"))
    model = vit3d_encoder(encoder)
    slices = torch.rand(1, 1, 32, 32)
    volume = slices.unsqueeze(-1).expand(-1, -1, -1, -1, 16)  # one patch deep
    with torch.no_grad():
        torch.testing.assert_close(model(volume), encoder.forward_features(normalise(encoder, slices)),
                                   atol=1e-4, rtol=1e-4)
