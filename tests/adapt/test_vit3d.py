"""ViT patch-embedding inflation: token shapes, position embeddings, consistency with the 2D ViT."""

from __future__ import annotations

import pytest
import torch

from slice2vol.adapt import build_adapted, vit3d_encoder
from slice2vol.encoders import build_encoder
from tests.adapt.helpers import TINY_VIT, normalise


def _vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    opts = {**TINY_VIT, **kwargs}
    return build_encoder("timm/vit_small_patch16_224", weights="random", **opts)


def test_token_grid_and_position_embedding_shapes():
    encoder = _vit()
    model = vit3d_encoder(encoder)
    x = model.preprocess(torch.rand(2, 1, 48, 32, 64))
    with torch.no_grad():
        tokens, grid = model.trunk.tokens(x)
        prefix_pos, patch_pos = model.trunk.position_embedding(grid)
    assert grid == (3, 2, 4)
    assert tokens.shape == (2, 1 + 3 * 2 * 4, 384)
    assert prefix_pos.shape == (1, 1, 384) and patch_pos.shape == (1, 24, 384)
    assert model.trunk.vit.patch_embed.proj.weight.shape == (384, 3, 16, 16, 16)
    assert model(torch.rand(1, 1, 40, 30, 20)).shape == (1, 384)  # sizes rounded to multiples of 16


def test_broadcast_position_embedding_matches_2d_table_at_every_depth():
    model = vit3d_encoder(_vit())
    _, patch_pos = model.trunk.position_embedding((2, 2, 3))
    table_2d = model.trunk.vit.pos_embed[:, 1:]  # (1, 4, D) for the 2 x 2 grid of a 32-px ViT/16
    for depth in range(3):
        torch.testing.assert_close(patch_pos.view(1, 2, 2, 3, -1)[:, :, :, depth].reshape(1, 4, -1), table_2d)


@pytest.mark.parametrize("mode", ["average", "center"])
def test_one_patch_deep_repeated_slice_reproduces_2d_vit(mode):
    encoder = _vit()
    model = vit3d_encoder(encoder, mode=mode)
    slices = torch.rand(2, 1, 32, 32)
    volume = slices.unsqueeze(-1).expand(-1, -1, -1, -1, 16)
    with torch.no_grad():
        expected = encoder.forward_features(normalise(encoder, slices))
        got = model(volume)
    assert got.shape == expected.shape == (2, 384)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_mean_pooled_vit_without_class_token_is_depth_consistent():
    # Without prefix tokens, duplicating every token along depth leaves attention and mean pooling unchanged.
    encoder = _vit(pooling="mean", model_kwargs=dict(depth=2, class_token=False, global_pool="avg"))
    model = vit3d_encoder(encoder)
    slices = torch.rand(1, 1, 32, 32)
    volume = slices.unsqueeze(-1).expand(-1, -1, -1, -1, 48)  # 3 patches deep
    with torch.no_grad():
        torch.testing.assert_close(model(volume), encoder.forward_features(normalise(encoder, slices)),
                                   atol=1e-4, rtol=1e-4)


def test_depth_embedding_is_trainable_and_breaks_depth_symmetry_once_learned():
    model = vit3d_encoder(_vit())
    assert model.trunk.depth_pos_embed.requires_grad
    volume = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        flipped = volume.flip(-1)
        same = torch.allclose(model(volume), model(flipped), atol=1e-5)
        model.trunk.depth_pos_embed.normal_()
        differs = not torch.allclose(model(volume), model(flipped), atol=1e-5)
    assert same and differs


def test_registry_key_and_bad_input_size():
    model = build_adapted("vit3d/timm/vit_small_patch16_224", encoder_kwargs=TINY_VIT, input_size=(32, 32, 32))
    assert model.info.key == "vit3d/timm/vit_small_patch16_224" and model.embed_dim == 384
    assert model(torch.rand(1, 1, 20, 20, 20)).shape == (1, 384)
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        vit3d_encoder(_vit(), input_size=(30, 32, 32))
