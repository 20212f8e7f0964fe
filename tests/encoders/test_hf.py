"""Hugging Face family: offline builds, image-processor equivalence on IXI, save_pretrained round trips."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from slice2vol.encoders import WeightsUnavailable, build_encoder
from slice2vol.encoders.hf import SPECS
from tests.encoders import cosine, ixi_slices, to_pil

TINY = dict(num_hidden_layers=2)
KEYS = ["hf/facebook/dinov2-small", "hf/openai/clip-vit-base-patch16", "hf/facebook/vit-mae-base"]


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: random builds must stay off the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.ixi
@pytest.mark.parametrize("key", KEYS)
def test_batched_preprocessing_matches_the_published_processor_on_ixi(ixi_manifest, key, no_network, tmp_path):
    """AutoImageProcessor from the repo's published preprocessor_config.json (a test fixture naming its source)
    vs Encoder.preprocess on real slices; extra to the synthetic checks of test_preprocessing.py."""
    import json

    from transformers import AutoImageProcessor

    from tests.encoders import grey_levels, quantised, randomise_layer_scale
    from tests.encoders.test_preprocessing import MAX_GREY, hf_published

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_published(key[3:])["config"]))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    torch.manual_seed(0)
    encoder = build_encoder(key, config_overrides=TINY)
    randomise_layer_scale(encoder)
    for plane, size in (("axial", 224), ("coronal", None)):
        images = quantised(ixi_slices(ixi_manifest, plane, 3, size))
        pixels = processor(images=[to_pil(image) for image in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            ours = encoder.preprocess(images)
            assert grey_levels(encoder, ours, pixels).max() <= MAX_GREY, f"{key} {plane}"
            sim = cosine(encoder.forward_features(ours), encoder.forward_features(pixels))
        assert sim.min() >= 0.999, f"{key} {plane}: {sim.tolist()}"


@pytest.mark.parametrize("key", KEYS)
def test_save_pretrained_round_trip(tmp_path, key, no_network):
    torch.manual_seed(0)
    source = build_encoder(key, config_overrides=TINY, img_size=112)
    source.model.save_pretrained(tmp_path / "model")
    loaded = build_encoder(key, weights=tmp_path / "model", img_size=112)
    assert loaded.model.config.num_hidden_layers == 2  # the directory's config, not the in-code one
    assert loaded.info.weights == str(tmp_path / "model") and len(loaded.info.weights_sha256) == 64
    x = torch.rand(2, 1, 60, 60)
    with torch.inference_mode():
        assert torch.allclose(source.encode(x), loaded.encode(x), atol=1e-6)
        a, grid = source.tokens(x)
        b, _ = loaded.tokens(x)
    assert torch.allclose(a, b, atol=1e-6) and a.shape[1] == grid[0] * grid[1]


def test_state_dict_file_and_directory_processor(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_encoder("hf/facebook/dinov2-small", config_overrides=TINY)
    save_file(source.model.state_dict(), str(tmp_path / "dino.safetensors"))
    loaded = build_encoder("hf/facebook/dinov2-small", weights=tmp_path / "dino.safetensors", config_overrides=TINY)
    assert loaded.info.weights_sha256 and loaded.info.weights == str(tmp_path / "dino.safetensors")
    with pytest.raises(ValueError, match="does not match the architecture"):  # 12-layer model, 2-layer file
        build_encoder("hf/facebook/dinov2-small", weights=tmp_path / "dino.safetensors")
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(source.encode(x), loaded.encode(x))
    # a directory's own preprocessor_config.json wins over the built-in one
    small = build_encoder("hf/facebook/vit-mae-base", config_overrides=TINY)
    small.model.save_pretrained(tmp_path / "mae")
    processor = SPECS["facebook/vit-mae-base"].processor()
    processor.image_mean, processor.image_std = [0.5] * 3, [0.5] * 3
    processor.save_pretrained(tmp_path / "mae")
    assert build_encoder("hf/facebook/vit-mae-base", weights=tmp_path / "mae").info.mean == (0.5, 0.5, 0.5)


def test_pooling_and_token_semantics():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 56, 56)
    with torch.inference_mode():
        clip = build_encoder("hf/openai/clip-vit-base-patch16", config_overrides=TINY, img_size=64)
        assert clip.encode(x).shape == (2, 512) and clip.info.token_dim == 768
        clip.pooling = "cls"
        pooled = clip.model.vision_model(pixel_values=clip.preprocess(x), interpolate_pos_encoding=True).pooler_output
        assert torch.allclose(clip.encode(x), pooled, atol=1e-5)  # CLS = HF's pooler_output
        dino = build_encoder("hf/facebook/dinov2-small", config_overrides=TINY, img_size=56, pooling="cls_mean")
        tokens, grid = dino.tokens(x)
        assert grid == (4, 4) and torch.allclose(dino.encode(x)[:, 384:], tokens.mean(1), atol=1e-5)
        mae = build_encoder("hf/facebook/vit-mae-base", config_overrides=TINY, img_size=64)
        first, grid = mae.tokens(x)
        second, _ = mae.tokens(x)
        # no masking, no shuffling: every patch, in place, deterministic
        assert grid == (4, 4) and first.shape == (2, 16, 768) and torch.equal(first, second)
        assert torch.allclose(mae.encode(x), first.mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        build_encoder("hf/facebook/dinov2-small", img_size=100, config_overrides=TINY)


@pytest.mark.parametrize("setup", ["offline", "unreachable_endpoint"])
def test_hub_request_fails_fast_with_fix(monkeypatch, tmp_path, setup):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"hf/facebook/dinov2-small: .*--weights /path/to/dir"):
        build_encoder("hf/facebook/dinov2-small", weights="hub")
    assert time.perf_counter() - start < 10


def test_hub_weights_come_from_the_hf_cache_offline(monkeypatch, tmp_path, no_network):
    import huggingface_hub.constants

    from tests.encoders import fake_hf_cache

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, a cached repo makes no request
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(0)
    source = build_encoder("hf/facebook/dinov2-small", config_overrides=TINY)
    source.model.save_pretrained(fake_hf_cache(tmp_path, "facebook/dinov2-small"))
    cached = build_encoder("hf/facebook/dinov2-small", weights="hub")
    assert cached.info.weights == "hub:facebook/dinov2-small" and len(cached.info.weights_sha256) == 64
    x = torch.rand(1, 1, 56, 56)
    with torch.inference_mode():
        assert torch.equal(cached.encode(x), source.encode(x))
