"""Dense features (CONTRACTS section 1): levels, shapes, strides, and equality with each library's own
intermediate outputs on the same input, random weights, every family.

References are independent of the code path under test: timm ``features_only=True`` networks loaded
with the encoder's weights, torchvision stages run by hand, forward hooks on HF/open_clip/SAM blocks,
and ``transformers.Dinov2Backbone`` for the normalised DINOv2 maps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slice2vol.encoders import ENCODERS, Encoder, EncoderInfo, FeatureLevel, build_encoder


def _seeded(key: str, **kwargs) -> Encoder:
    torch.manual_seed(0)
    encoder = build_encoder(key, **kwargs)
    _randomise_layer_scale(encoder)
    return encoder


def _randomise_layer_scale(module: nn.Module) -> None:
    """LayerScale (1e-5 at init in DINOv2) makes every block nearly the identity; give it weight so a
    wrong block index or a missing block shows in the maps."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "layer_scale1.lambda1", "layer_scale2.lambda1")):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def _check_shapes(encoder: Encoder, x: torch.Tensor, maps: list[torch.Tensor], levels: list[int]) -> None:
    info = encoder.feature_info()
    for fmap, index in zip(maps, levels):
        level = info[index]
        assert fmap.shape == (x.shape[0], level.channels, -(-x.shape[-2] // level.stride),
                              -(-x.shape[-1] // level.stride)), (encoder.info.key, level, fmap.shape)


# -- timm: features_only=True on the same weights --------------------------------------------------
TIMM = {  # key -> (timm.create_model kwargs the encoder was built with, build_encoder kwargs, strides)
    "timm/resnet18": ({}, dict(img_size=64), [2, 4, 8, 16, 32]),
    "timm/efficientnet_lite0": ({}, dict(img_size=64), [2, 4, 8, 16, 32]),
    "timm/vit_small_patch16_224": (dict(depth=2, img_size=(64, 64)), dict(img_size=64, model_kwargs=dict(depth=2)),
                                   [16, 16]),
    "timm/swin_tiny_patch4_window7_224": (dict(depths=(1, 1, 1, 1)), dict(model_kwargs=dict(depths=(1, 1, 1, 1))),
                                          [4, 8, 16, 32]),
    "timm/vit_small_patch14_dinov2": (dict(depth=2, img_size=(56, 56)), dict(img_size=56, model_kwargs=dict(depth=2)),
                                      [14, 14]),
    "timm/vit_base_patch16_224.mae": (dict(depth=2, img_size=(32, 32)), dict(img_size=32, model_kwargs=dict(depth=2)),
                                      [16, 16]),
}


def _renamed_for(reference: nn.Module, state: dict) -> dict:
    """The model's tensors under the names of timm's feature wrapper (``FeatureListNet`` flattens
    ``layers.0`` into ``layers_0``; the getter wrapper keeps the model as ``model.``)."""
    import re

    out = {}
    for name in reference.state_dict():
        for candidate in (name, re.sub(r"^([A-Za-z]\w*?)_(\d+)\.", r"\1.\2.", name), name.removeprefix("model.")):
            if candidate in state:
                out[name] = state[candidate]
                break
    return out


@pytest.mark.parametrize("key", sorted(TIMM))
def test_timm_maps_equal_features_only(key):
    import timm

    create_kwargs, build_kwargs, strides = TIMM[key]
    encoder = _seeded(key, **build_kwargs)
    info = encoder.feature_info()
    assert [f.stride for f in info] == strides and [f.index for f in info] == list(range(len(info)))
    reference = timm.create_model(encoder.info.extra["arch"], features_only=True,
                                  out_indices=tuple(range(len(info))), **create_kwargs).eval()
    reference.load_state_dict(_renamed_for(reference, encoder.model.state_dict()), strict=True)
    assert [f.name for f in info] == list(reference.feature_info.module_name())
    assert [f.channels for f in info] == list(reference.feature_info.channels())
    x = torch.randn(2, 3, *encoder.info.input_size)
    with torch.inference_mode():
        ours = encoder.forward_intermediates(x)
        theirs = reference(x)
    _check_shapes(encoder, x, ours, list(range(len(info))))
    for level, a, b in zip(info, ours, theirs):
        if str(getattr(reference, "output_fmt", "NCHW")).endswith("NHWC"):
            b = b.permute(0, 3, 1, 2)  # Swin's feature wrapper returns NHWC; ours are NCHW by contract
        assert torch.equal(a, b), f"{key} {level.name}: max diff {(a - b).abs().max()}"


def test_timm_vit_last_normalised_level_is_the_token_grid():
    encoder = _seeded("timm/vit_small_patch14_dinov2", img_size=56, model_kwargs=dict(depth=2))
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        last = encoder.forward_intermediates(x, [-1], norm=True)[0]
        raw = encoder.forward_intermediates(x, [-1])[0]
        tokens, grid = encoder.forward_tokens(x)
    assert grid == (4, 4) and last.shape == (2, 384, 4, 4)
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-6)
    assert (raw - last).abs().max() > 0.1  # norm=False is the block output, not the normalised one


# -- torchvision: stages run by hand ----------------------------------------------------------------
def test_torchvision_mobilenet_levels_equal_feature_slices():
    encoder = _seeded("tv/mobilenet_v2", img_size=64)
    info = encoder.feature_info()
    assert [(f.name, f.channels, f.stride) for f in info] == [
        ("features.1", 16, 2), ("features.3", 24, 4), ("features.6", 32, 8), ("features.13", 96, 16),
        ("features.18", 1280, 32)]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ours = encoder.forward_intermediates(x, [4, 0, 2])  # any order
        features = encoder.model.features
        expected = [features(x), features[:2](x), features[:7](x)]
    _check_shapes(encoder, x, ours, [4, 0, 2])
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)


def test_torchvision_resnet_levels_equal_stages():
    encoder = _seeded("tv/resnet18", img_size=64)
    assert [(f.name, f.stride) for f in encoder.feature_info()] == [
        ("relu", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
    m = encoder.model
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        stem = m.relu(m.bn1(m.conv1(x)))
        l1 = m.layer1(m.maxpool(stem))
        l2 = m.layer2(l1)
        l4 = m.layer4(m.layer3(l2))
        ours = encoder.forward_intermediates(x)
    for a, b in zip(ours, [stem, l1, l2, None, l4]):
        if b is not None:
            assert torch.equal(a, b)
    assert torch.equal(ours[-1], encoder.feature_map(x))


# -- transformers: forward hooks on the layers, Dinov2Backbone --------------------------------------
HF = {
    "hf/facebook/dinov2-small": (56, lambda m: m.encoder.layer, lambda m: m.layernorm),
    "hf/openai/clip-vit-base-patch16": (64, lambda m: m.vision_model.encoder.layers,
                                        lambda m: m.vision_model.post_layernorm),
    "hf/facebook/vit-mae-base": (64, lambda m: m.layers if hasattr(m, "layers") else m.encoder.layer,
                                 lambda m: m.layernorm),
}


def _hooked(layers, run) -> list[torch.Tensor]:
    caught = []
    handles = [layer.register_forward_hook(
        lambda _m, _i, out: caught.append(out[0] if isinstance(out, tuple) else out)) for layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return caught


@pytest.mark.parametrize("key", sorted(HF))
def test_hf_maps_equal_layer_outputs(key):
    size, layers_of, norm_of = HF[key]
    encoder = _seeded(key, img_size=size, config_overrides=dict(num_hidden_layers=2))
    info = encoder.feature_info()
    patch = encoder.info.patch_size
    assert [f.stride for f in info] == [patch, patch] and len(info) == 2
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        ours = encoder.forward_intermediates(x)
        normed = encoder.forward_intermediates(x, norm=True)
        outputs = _hooked(layers_of(encoder.model), lambda: encoder.forward_tokens(x))
        grid = size // patch
        for i, out in enumerate(outputs):
            expected = out[:, 1:].transpose(1, 2).reshape(2, -1, grid, grid)
            assert torch.equal(ours[i], expected), f"{key} layer {i}"
            expected_norm = norm_of(encoder.model)(out)[:, 1:].transpose(1, 2).reshape(2, -1, grid, grid)
            assert torch.equal(normed[i], expected_norm)
        tokens, _ = encoder.forward_tokens(x)
    _check_shapes(encoder, x, ours, [0, 1])
    torch.testing.assert_close(normed[-1].flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-6)


def test_hf_dinov2_normalised_maps_equal_dinov2_backbone():
    from transformers import Dinov2Backbone

    encoder = _seeded("hf/facebook/dinov2-small", img_size=56, config_overrides=dict(num_hidden_layers=3))
    own = {k: v for k, v in encoder.model.config.to_dict().items() if k not in ("out_features", "stage_names")}
    config = encoder.model.config.__class__(**{**own, "out_indices": [1, 3], "reshape_hidden_states": True,
                                               "apply_layernorm": True})
    backbone = Dinov2Backbone(config).eval()
    backbone.load_state_dict(encoder.model.state_dict(), strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        theirs = backbone(pixel_values=x).feature_maps  # stage i = layer i - 1
        ours = encoder.forward_intermediates(x, [0, 2], norm=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- open_clip: hooks on the residual blocks / timm trunk blocks --------------------------------------
@pytest.mark.parametrize("key,kwargs", [
    ("openclip/ViT-B-16:openai", dict(img_size=64, vision_cfg=dict(layers=2, width=64, head_width=32), embed_dim=32)),
    ("openclip/hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", dict(img_size=32)),
])
def test_openclip_maps_equal_block_outputs(key, kwargs):
    encoder = _seeded(key, **kwargs)
    visual = encoder.visual
    blocks = visual.trunk.blocks if encoder.is_timm else visual.transformer.resblocks
    norm = visual.trunk.norm if encoder.is_timm else visual.ln_post
    info = encoder.feature_info()
    assert len(info) == len(blocks) and all(f.stride == 16 for f in info)
    x = torch.randn(2, 3, *encoder.info.input_size)
    levels = [0, len(info) - 1]
    with torch.inference_mode():
        ours = encoder.forward_intermediates(x, levels)
        normed = encoder.forward_intermediates(x, [-1], norm=True)[0]
        outputs = _hooked(blocks, lambda: encoder.forward_features(x))
        tokens, (gh, gw) = encoder.forward_tokens(x)
    _check_shapes(encoder, x, ours, levels)
    for level, fmap in zip(levels, ours):
        expected = outputs[level][:, 1:].transpose(1, 2).reshape(2, -1, gh, gw)
        assert torch.equal(fmap, expected), f"{key} block {level}"
    with torch.inference_mode():
        expected_norm = norm(outputs[-1])[:, 1:].transpose(1, 2).reshape(2, -1, gh, gw)
    torch.testing.assert_close(normed, expected_norm, rtol=0, atol=1e-6)
    torch.testing.assert_close(normed.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-6)


# -- SAM / MedSAM: the encoder's blocks by hand, the neck = SamPredictor's features -------------------
@pytest.mark.parametrize("key", ["sam/vit_b", "medsam/vit_b"])
def test_sam_maps_equal_blocks_and_neck(key):
    pytest.importorskip("segment_anything")
    encoder = _seeded(key, img_size=64, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2,
                      micro_batch=1)
    with torch.no_grad():  # SAM initialises position tables at zero: make them matter
        encoder.image_encoder.pos_embed.normal_(0, 0.5)
    info = encoder.feature_info()
    assert [(f.name, f.channels, f.stride) for f in info] == [("blocks.0", 64, 16), ("blocks.1", 64, 16),
                                                              ("neck", 256, 16)]
    image_encoder = encoder.image_encoder
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        ours = encoder.forward_intermediates(x, [2, 0, 1])
        blocks, necks = [[], []], []
        for image in x.split(1):  # one image per call, as micro_batch=1 runs them
            h = image_encoder.patch_embed(image) + image_encoder.pos_embed
            for i, block in enumerate(image_encoder.blocks):
                h = block(h)
                blocks[i].append(h.permute(0, 3, 1, 2))
            necks.append(image_encoder(image))
    assert torch.equal(ours[0], torch.cat(necks))
    assert torch.equal(ours[1], torch.cat(blocks[0])) and torch.equal(ours[2], torch.cat(blocks[1]))
    _check_shapes(encoder, x, ours, [2, 0, 1])


# -- the batched raw-slice entry point and level validation --------------------------------------------
def test_feature_maps_preprocess_batch_and_return_cpu_float32():
    encoder = _seeded("timm/resnet18", img_size=64)
    images = torch.rand(5, 1, 50, 70)
    maps = encoder.feature_maps(images, levels=[2, -1], batch_size=2)
    assert [m.shape for m in maps] == [(5, 128, 8, 8), (5, 512, 2, 2)]
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in maps)
    with torch.inference_mode():
        whole = encoder.forward_intermediates(encoder.preprocess(images), [2, 4])
    for a, b in zip(maps, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(maps[1], encoder.feature_maps(images, levels=4, batch_size=5)[0]) or \
        torch.allclose(maps[1], encoder.feature_maps(images, levels=4, batch_size=5)[0], atol=1e-5)


def test_level_errors_name_the_valid_levels():
    encoder = _seeded("timm/resnet18", img_size=64)
    with pytest.raises(ValueError, match=r"timm/resnet18: feature level 5 out of range; it has 5 levels: 0=act1"):
        encoder.forward_intermediates(torch.zeros(1, 3, 64, 64), [5])
    with pytest.raises(ValueError, match="out of range"):
        encoder.feature_maps(torch.zeros(1, 1, 64, 64), levels=[-6])
    with pytest.raises(ValueError, match="no images"):
        encoder.feature_maps(torch.zeros(0, 1, 64, 64))
    assert encoder.resolve_levels([-1, 0]) == [4, 0] and encoder.resolve_levels(None) == [0, 1, 2, 3, 4]


class _Plain(Encoder):
    """An encoder without a library intermediates API (like ``ssl2d/*``): the default single level."""

    def __init__(self) -> None:
        super().__init__()
        self.info = EncoderInfo(key="test/plain", embed_dim=4, input_size=(32, 32), patch_size=8, token_dim=4)
        self.conv = nn.Conv2d(3, 4, 8, stride=8)

    def forward_features(self, x):
        return self.conv(x).mean((-2, -1))

    def forward_tokens(self, x):
        fmap = self.conv(x)
        return fmap.flatten(2).transpose(1, 2), tuple(fmap.shape[-2:])


def test_default_level_is_the_token_grid():
    encoder = _Plain().eval()
    assert encoder.feature_info() == [FeatureLevel(0, "tokens", 4, 8)]
    images = torch.rand(3, 1, 40, 40)
    (fmap,) = encoder.feature_maps(images)
    with torch.inference_mode():
        expected = encoder.conv(encoder.preprocess(images))
    assert fmap.shape == (3, 4, 4, 4)
    torch.testing.assert_close(fmap, expected)


def test_every_registered_family_exposes_levels():
    """Each family's builder class overrides feature_info/forward_intermediates (no silent default)."""
    from slice2vol.encoders.hf import HFEncoder
    from slice2vol.encoders.openclip import OpenCLIPEncoder
    from slice2vol.encoders.sam import SAMEncoder
    from slice2vol.encoders.timm import TimmEncoder
    from slice2vol.encoders.torchvision import TorchvisionEncoder

    for cls in (HFEncoder, OpenCLIPEncoder, SAMEncoder, TimmEncoder, TorchvisionEncoder):
        assert cls.feature_info is not Encoder.feature_info and \
            cls.forward_intermediates is not Encoder.forward_intermediates, cls.__name__
    families = {ENCODERS.meta(k).get("family") for k in ENCODERS.names()}
    assert {"timm", "torchvision", "hf", "openclip", "sam", "medsam"} <= families
