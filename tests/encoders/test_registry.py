"""The registry is the test matrix: every key builds offline with random weights and runs forward."""

from __future__ import annotations

import pytest
import torch

from slice2vol.encoders import ENCODERS, build_encoder

# Small but architecture-true variants so the whole matrix stays fast on one CPU thread:
# CNNs at 64 px, ViTs at 2 blocks and a reduced size, big models only under `slow`.
FAST = {
    "tv/mobilenet_v2": dict(img_size=64),
    "tv/resnet18": dict(img_size=64),
    "timm/resnet18": dict(img_size=64),
}


@pytest.mark.parametrize("key", sorted(FAST))
def test_fast_build_and_forward(key):
    torch.manual_seed(0)
    encoder = build_encoder(key, **FAST[key])
    meta = ENCODERS.meta(key)
    x = torch.rand(2, 1, 50, 60)
    with torch.inference_mode():
        emb = encoder.encode(x)
        tokens, grid = encoder.tokens(x)
    assert emb.shape == (2, encoder.info.embed_dim) == (2, meta["embed_dim"])
    assert tokens.shape == (2, grid[0] * grid[1], encoder.info.token_dim)
    assert torch.isfinite(emb).all()
    assert encoder.info.weights == "random" and encoder.info.weights_sha256 == ""
