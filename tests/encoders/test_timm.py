"""timm family: official-pipeline equivalence on real IXI slices (extra to the synthetic checks of
test_preprocessing.py), packaged ImageNet weights, checkpoints, pooling."""

from __future__ import annotations

import time

import pytest
import torch

from slice2vol.encoders import WeightsUnavailable, build_encoder
from tests.encoders import (
    cosine,
    grey_levels,
    ixi_slices,
    pretrained_or_skip,
    quantised,
    randomise_layer_scale,
    to_pil,
)
from tests.encoders.test_preprocessing import MAX_GREY

EFFNET_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# tiny but architecture-true variants (random weights): official vs batched preprocessing
CASES = {
    "timm/resnet18": {},
    "timm/efficientnet_lite0": {},
    "timm/vit_small_patch16_224": dict(model_kwargs=dict(depth=2)),
    "timm/swin_tiny_patch4_window7_224": dict(model_kwargs=dict(depths=(1, 1, 1, 1))),
    "timm/vit_small_patch14_dinov2": dict(model_kwargs=dict(depth=2)),
}


def _official_inputs(encoder, images: torch.Tensor) -> torch.Tensor:
    """timm's own per-image eval pipeline on 8-bit PIL images: the network inputs it produces."""
    from timm.data import create_transform, resolve_data_config

    size = (3, *encoder.info.input_size)  # DINOv2's pretrained cfg says 518: a user passes the built size
    transform = create_transform(**resolve_data_config({"input_size": size}, model=encoder.model))
    return torch.stack([transform(to_pil(image)) for image in images])


@pytest.mark.ixi
@pytest.mark.parametrize("key", sorted(CASES))
def test_batched_preprocessing_matches_timm_transform_on_ixi(ixi_manifest, key):
    torch.manual_seed(0)
    encoder = build_encoder(key, **CASES[key])
    randomise_layer_scale(encoder)  # else a random DINOv2 ignores its input and any feature check passes
    for plane, size in (("axial", 224), ("coronal", None)):  # coronal native grid is non-square
        images = quantised(ixi_slices(ixi_manifest, plane, 3, size))
        official = _official_inputs(encoder, images)
        with torch.inference_mode():
            ours = encoder.preprocess(images)
            assert grey_levels(encoder, ours, official).max() <= MAX_GREY, f"{key} {plane}"
            features, reference = encoder.forward_features(ours), encoder.forward_features(official)
        same = cosine(features, reference)
        others = cosine(reference, reference.roll(1, 0))  # other slices of the same subject
        # the feature check can fail: our features are closer to the official ones than any two slices are
        assert same.min() >= 0.999 and same.min() > others.max(), f"{key} {plane}: {same.tolist()} {others.tolist()}"


@pytest.mark.ixi
def test_efficientnet_lite0_packaged_weights_on_ixi(ixi_manifest):
    from skimage import data

    encoder = pretrained_or_skip("timm/efficientnet_lite0")
    assert encoder.info.weights_sha256 == EFFNET_SHA
    photos = {"chelsea": (data.chelsea(), set(range(281, 286))), "coffee": (data.coffee(), {967, 968, 504})}
    with torch.inference_mode():
        for name, (photo, classes) in photos.items():
            image = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
            assert encoder.classify(image).argmax(1).item() in classes, name
        images = ixi_slices(ixi_manifest, "axial", 3, 224)
        pretrained = encoder.encode(images)
        torch.manual_seed(0)
        random = build_encoder("timm/efficientnet_lite0").encode(images)
        assert cosine(pretrained, random).max() < 0.9
        # the trained network on timm's 8-bit pipeline: same input tensors up to PIL's roundings ...
        official = _official_inputs(encoder, quantised(images))
        assert grey_levels(encoder, encoder.preprocess(quantised(images)), official).max() <= MAX_GREY
        reference = encoder.forward_features(official)
        # ... and features from our float path within the cosine a trained CNN shows for 8-bit rounding alone
        assert cosine(pretrained, reference).min() >= 0.997


def test_order_mapped_checkpoint_shape_error_names_tensor(tmp_path):
    model = build_encoder("timm/efficientnet_lite0").model
    state = {f"x{i}": v for i, v in enumerate(model.state_dict().values())}
    state["x0"] = torch.zeros(1, 2, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"tensor #0 'x0' has shape \(1, 2, 3, 3\) but the model's #0 'conv_stem.weight'"):
        build_encoder("timm/efficientnet_lite0", weights=tmp_path / "bad.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("key,kwargs", [("timm/resnet18", dict(img_size=64)),
                                        ("timm/vit_small_patch16_224", dict(model_kwargs=dict(depth=2), img_size=64))])
def test_checkpoint_round_trip(tmp_path, fmt, key, kwargs):
    torch.manual_seed(0)
    source = build_encoder(key, **kwargs)
    path = tmp_path / f"model.{fmt}"
    if fmt == "pth":
        torch.save(source.model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = build_encoder(key, weights=path, **kwargs)
    x = torch.rand(2, 1, 40, 48)
    with torch.inference_mode():
        assert torch.equal(source.encode(x), loaded.encode(x))
    assert loaded.info.weights == str(path) and len(loaded.info.weights_sha256) == 64


def test_vit_checkpoint_loads_at_another_size_with_interpolated_pos_embed(tmp_path):
    torch.manual_seed(0)
    source = build_encoder("timm/vit_small_patch14_dinov2", model_kwargs=dict(depth=2), img_size=112)
    torch.save(source.model.state_dict(), tmp_path / "dino.pth")
    loaded = build_encoder("timm/vit_small_patch14_dinov2", weights=tmp_path / "dino.pth",
                           model_kwargs=dict(depth=2), img_size=56)
    assert loaded.model.pos_embed.shape[1] == 1 + 4 * 4
    assert torch.equal(loaded.model.blocks[1].mlp.fc1.weight, source.model.blocks[1].mlp.fc1.weight)
    tokens, grid = loaded.tokens(torch.rand(1, 1, 80, 80))
    assert grid == (4, 4) and tokens.shape == (1, 16, 384)


def test_pooling_is_consistent_with_tokens():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        cnn = build_encoder("timm/resnet18", img_size=64)
        tokens, grid = cnn.tokens(x)
        assert grid == (2, 2) and torch.allclose(cnn.encode(x), tokens.mean(1), atol=1e-5)
        cnn.pooling = "gem"
        expected = tokens.clamp_min(1e-6).pow(3).mean(1).pow(1 / 3)
        assert torch.allclose(cnn.encode(x), expected, rtol=1e-4, atol=1e-6)
        vit = build_encoder("timm/vit_small_patch16_224", img_size=64, model_kwargs=dict(depth=2), pooling="mean")
        vit_tokens, vit_grid = vit.tokens(x)
        assert vit_grid == (4, 4) and torch.allclose(vit.encode(x), vit_tokens.mean(1), atol=1e-5)
        both = build_encoder("timm/vit_small_patch16_224", img_size=64, model_kwargs=dict(depth=2),
                             pooling="cls_mean")
        assert both.info.embed_dim == 768 and both.encode(x).shape == (2, 768)
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_encoder("timm/resnet18", pooling="cls")


def test_mae_defaults_to_mean_pooling_and_has_no_head():
    encoder = build_encoder("timm/vit_base_patch16_224.mae", img_size=32, model_kwargs=dict(depth=1))
    assert encoder.info.pooling == "mean" and encoder.info.mean == (0.485, 0.456, 0.406)
    assert encoder.model.num_classes == 0


def test_preprocessing_resolved_from_the_model():
    vit = build_encoder("timm/vit_small_patch16_224", model_kwargs=dict(depth=1))
    assert vit.info.mean == (0.5, 0.5, 0.5) and vit.info.resize_size == 248  # floor(224 / 0.9)
    resnet = build_encoder("timm/resnet18", crop_pct=0.875)  # a user override
    assert resnet.info.resize_size == 256 and resnet.info.crop_pct == pytest.approx(0.875)


def test_hub_offline_fails_fast_naming_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"timm/resnet18: .*--weights /path/to/resnet18.safetensors"):
        build_encoder("timm/resnet18", weights="hub")
    assert time.perf_counter() - start < 10


def test_hub_weights_come_from_the_hf_cache_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    from tests.encoders import fake_hf_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(0)
    source = build_encoder("timm/resnet18", img_size=64)
    snapshot = fake_hf_cache(tmp_path, "timm/resnet18.a1_in1k")  # the default tag's repo
    save_file(source.model.state_dict(), str(snapshot / "model.safetensors"))
    cached = build_encoder("timm/resnet18", weights="hub", img_size=64)
    assert cached.info.weights == "hub:timm/resnet18.a1_in1k" and len(cached.info.weights_sha256) == 64
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(cached.encode(x), source.encode(x))


def test_register_tokens_are_no_patch_tokens():
    """ViTs with register tokens (DINOv2 *_reg4, 5 prefix tokens): tokens and mean pooling skip all of
    the prefix, not only the CLS token."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        vit = build_encoder("timm/vit_small_patch16_224", img_size=64, model_kwargs=dict(depth=1, reg_tokens=4),
                            pooling="mean")
        assert vit.model.num_prefix_tokens == 5
        tokens, grid = vit.tokens(x)
        assert grid == (4, 4) and tokens.shape == (2, 16, 384)
        assert torch.allclose(vit.encode(x), tokens.mean(1), atol=1e-5)
