"""The registry is the test matrix: every key builds offline with random weights and runs forward.

Every entry is built at its real architecture (the listed parameter count is checked) and run at a
reduced input size so the matrix stays fast on one CPU thread; the ~86M-parameter builds are `slow`
(each family keeps fast members). Keys owned by other families (openclip/, sam/, medsam/) are tested
in their own files.
"""

from __future__ import annotations

import json

import pytest
import torch

from slice2vol.cli import main
from slice2vol.encoders import ENCODERS, build_encoder

# key -> (reduced img_size, slow?)
MATRIX = {
    "tv/mobilenet_v2": (64, False),
    "tv/resnet18": (64, False),
    "tv/resnet50": (64, False),
    "timm/resnet18": (64, False),
    "timm/resnet50": (64, False),
    "timm/wide_resnet50_2": (64, True),
    "timm/efficientnet_lite0": (64, False),
    "timm/vit_small_patch16_224": (64, False),
    "timm/vit_base_patch16_224": (64, True),
    "timm/swin_tiny_patch4_window7_224": (64, False),
    "timm/vit_small_patch14_dinov2": (56, False),
    "timm/vit_base_patch14_dinov2": (56, True),
    "timm/vit_base_patch16_224.mae": (64, True),
    "hf/facebook/dinov2-small": (56, False),
    "hf/facebook/dinov2-base": (56, True),
    "hf/openai/clip-vit-base-patch16": (64, True),
    "hf/facebook/vit-mae-base": (64, True),
}
OURS = ("tv/", "timm/", "hf/")


def test_matrix_covers_every_registered_key():
    mine = {k for k in ENCODERS.names() if k.startswith(OURS)}
    assert mine == set(MATRIX)


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if slow else k
                                 for k, (_, slow) in MATRIX.items()])
def test_builds_offline_and_forwards(key):
    size, _ = MATRIX[key]
    torch.manual_seed(0)
    encoder = build_encoder(key, img_size=size)
    meta = ENCODERS.meta(key)
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    # listed at the native size; a ViT built smaller has a shorter position table (<= 2.5%)
    assert params == pytest.approx(meta["params_m"], rel=0.03 if "vit" in key or "dino" in key else 0.005)
    assert not encoder.training
    x = torch.rand(2, 1, 50, 60)
    with torch.inference_mode():
        emb = encoder.encode(x)
        tokens, grid = encoder.tokens(x)
    assert emb.shape == (2, encoder.info.embed_dim) == (2, meta["embed_dim"])
    assert tokens.shape == (2, grid[0] * grid[1], encoder.info.token_dim)
    assert encoder.info.input_size == (size, size)
    assert torch.isfinite(emb).all() and emb.std(0).sum() > 0  # different slices, different vectors
    assert encoder.info.weights == "random" and encoder.info.weights_sha256 == ""
    provenance = encoder.info.to_dict()
    assert provenance["key"] == key and provenance["input_size"] == [size, size]
    assert json.loads(json.dumps(provenance)) == provenance  # storable as provenance in the feature store


def test_unknown_key_suggests_close_matches():
    with pytest.raises(KeyError, match="Did you mean: .*timm/resnet50"):
        build_encoder("resnet50")


def test_encoders_command_lists_from_metadata(capsys):
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for key in MATRIX:
        assert key in out
    line = next(row for row in out.splitlines() if row.startswith("tv/mobilenet_v2 "))
    assert "1280" in line and "3.5" in line
    assert main(["encoders", "--details", "--json", "tv/mobilenet_v2"]) == 0
    details = capsys.readouterr().out
    assert '"tokens": "7x7x1280"' in details and '"params_M": 3.5' in details
    assert main(["encoders", "nothing/*"]) == 2
