"""open_clip family: official-pipeline equivalence on IXI slices, checkpoints, offline hub, registry."""

from __future__ import annotations

import json
import time

import pytest
import torch

from slice2vol.encoders import ENCODERS, WeightsUnavailable, build_encoder
from slice2vol.encoders import base as encoder_base
from slice2vol.encoders.openclip import BIOMEDCLIP_PREPROCESS, BIOMEDCLIP_REPO
from tests.encoders import cosine, ixi_slices, to_pil

open_clip = pytest.importorskip("open_clip")

BIOMEDCLIP = f"openclip/hf-hub:{BIOMEDCLIP_REPO}"
# A 2-layer, 64-wide stand-in for ViT-B/16 (QuickGELU, as the OpenAI weights): same code paths.
TINY_VISION = dict(layers=2, width=64, head_width=32)
TINY_CFG = dict(embed_dim=32, vision_cfg=dict(image_size=64, patch_size=16, **TINY_VISION),
                text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


def quantised(images: torch.Tensor) -> torch.Tensor:
    """What the 8-bit PIL image holds, as floats in [0, 1] (isolates the pipeline from rounding)."""
    return (images.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """A random tiny CLIP (both towers) registered with open_clip and saved as .pt and .safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("openclip")
    (root / "s2v-tiny-clip.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / "s2v-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("s2v-tiny-clip", force_quick_gelu=True).eval()
    pt, st = root / "open_clip_pytorch_model.bin", root / "open_clip_model.safetensors"
    torch.save(model.state_dict(), pt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    return model, pt, st


def tiny(weights="random", **kwargs):
    return build_encoder("openclip/ViT-B-16:openai", weights, img_size=64, vision_cfg=TINY_VISION, embed_dim=32,
                         **kwargs)


# -- official pipeline equivalence on real slices ---------------------------------------------------
@pytest.fixture(scope="module")
def official_vit_b_32():
    """open_clip's own ViT-B-32 (random, QuickGELU as OpenAI's), its eval transform, and ours with its weights."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_quick_gelu=True)
    ours = build_encoder("openclip/ViT-B-32:openai")
    ours.visual.load_state_dict(model.visual.state_dict())
    return model.eval(), preprocess, ours


@pytest.fixture(scope="module")
def biomedclip():
    """The registry's BiomedCLIP build (random weights), shared: its timm trunk is slow to initialise."""
    return build_encoder(BIOMEDCLIP)


@pytest.mark.ixi
@pytest.mark.parametrize("plane,size", [("coronal", None), ("axial", 224)])
def test_vit_b_32_matches_open_clip_preprocess_and_encode_image(ixi_manifest, official_vit_b_32, plane, size):
    """create_model_and_transforms' per-image PIL pipeline + encode_image vs our batched encode.

    ``size=None`` gives non-square 90 x 120 slices: shorter-side resize and centre crop both act.
    """
    model, preprocess, ours = official_vit_b_32
    images = ixi_slices(ixi_manifest, plane, 2, size)
    official = torch.stack([preprocess(to_pil(im)) for im in images])
    with torch.inference_mode():
        ref = model.encode_image(official)
        pre = ours.preprocess(quantised(images))
        got = ours.encode(quantised(images))
    assert pre.shape == official.shape == (2, 3, 224, 224)
    assert (pre - official).abs().max() < 0.05  # PIL rounds its resized image to 8 bits
    assert got.shape == (2, 512)
    assert cosine(got, ref).min() >= 0.999


@pytest.mark.ixi
def test_biomedclip_matches_its_hub_preprocess_cfg(ixi_manifest, biomedclip):
    """BiomedCLIP: open_clip's eval transform from the hub preprocess_cfg, then the tower's own forward."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**BIOMEDCLIP_PREPROCESS, size=224), is_train=False)
    images = ixi_slices(ixi_manifest, "coronal", 2, None)
    with torch.inference_mode():
        ref = biomedclip.visual(torch.stack([preprocess(to_pil(im)) for im in images]))  # TimmModel.forward
        got = biomedclip.encode(quantised(images))
    assert got.shape == (2, 512)
    assert cosine(got, ref).min() >= 0.999


# -- local checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_round_trip_matches_official_loader(tiny_clip_file, fmt):
    model, pt, st = tiny_clip_file
    path = pt if fmt == "pt" else st
    ours = tiny(path)
    official = open_clip.create_model("s2v-tiny-clip", pretrained=str(path), force_quick_gelu=True).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        pre = ours.preprocess(x)
        got = ours.encode(x)
        ref = official.encode_image(pre)
        tokens, grid = ours.tokens(x)
        assert torch.equal(got, ref) and torch.equal(got, model.encode_image(pre))
    assert tokens.shape == (2, 16, 64) and grid == (4, 4)
    assert ours.info.weights == str(path)
    assert ours.info.weights_sha256 == encoder_base.sha256_file(path) and len(ours.info.weights_sha256) == 64


def test_checkpoint_at_another_size_resizes_pos_embed_like_open_clip(tiny_clip_file):
    """A 64-px checkpoint in a 96-px tower: pos-embed resampled exactly as open_clip does."""
    model, pt, _ = tiny_clip_file
    ours = build_encoder("openclip/ViT-B-16:openai", pt, img_size=96, vision_cfg=TINY_VISION, embed_dim=32)
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    reference = open_clip.create_model("s2v-tiny-clip", force_quick_gelu=True, force_image_size=96)
    open_clip.model.resize_pos_embed(state, reference)
    assert ours.visual.positional_embedding.shape == (37, 64)
    assert torch.equal(ours.visual.positional_embedding, state["visual.positional_embedding"])
    with torch.inference_mode():
        tokens, grid = ours.tokens(torch.rand(1, 1, 96, 96))
    assert grid == (6, 6) and tokens.shape == (1, 36, 64)


def test_checkpoint_of_another_architecture_is_refused(tiny_clip_file):
    _, pt, _ = tiny_clip_file
    with pytest.raises(ValueError, match="does not match the architecture|wrong shape"):
        build_encoder("openclip/ViT-B-16:openai", pt, img_size=64, vision_cfg=dict(layers=3, width=64, head_width=32),
                      embed_dim=32)


def test_torchscript_checkpoint_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="huggingface.co/timm/vit_base_patch32_clip_224.openai"):
        build_encoder("openclip/ViT-B-32:openai", path)


# -- hub -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["openclip/ViT-B-16:openai", BIOMEDCLIP])
def test_hub_offline_fails_fast_and_names_the_fix(monkeypatch, key):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(encoder_base, "hf_cached_file", lambda *a, **k: None)  # whatever this machine caches
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="Pass a local checkpoint instead: weights='/path/to/open_clip"):
        build_encoder(key, "hub")
    assert time.perf_counter() - start < 10


def test_hub_weights_come_from_the_hf_cache(monkeypatch, tiny_clip_file):
    """The 'openai' tag resolves to open_clip's HF repo; a cached file is used without any network."""
    _, pt, _ = tiny_clip_file
    asked = []

    def cached(repo_id, filenames, revision=None):
        asked.append((repo_id, filenames))
        if repo_id == BIOMEDCLIP_REPO:
            raise LookupError("asked for BiomedCLIP")  # stop before building a full tower
        return str(pt)

    monkeypatch.setattr(encoder_base, "hf_cached_file", cached)
    encoder = tiny("hub")
    assert asked == [("timm/vit_base_patch16_clip_224.openai",
                      ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))]
    assert encoder.info.weights == "hub:timm/vit_base_patch16_clip_224.openai"
    assert encoder.info.weights_sha256 == encoder_base.sha256_file(pt)
    assert encoder.info.extra["quick_gelu"] and encoder.info.extra["tag"] == "openai"
    assert type(encoder.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    laion = tiny("hub:laion2b_s34b_b88k")  # another tag of the architecture: plain GELU, its own repo
    assert asked[-1][0] == "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    assert not laion.info.extra["quick_gelu"] and laion.info.extra["tag"] == "laion2b_s34b_b88k"
    assert isinstance(laion.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    asked.clear()
    with pytest.raises(LookupError):
        build_encoder(BIOMEDCLIP, "hub")
    assert asked == [(BIOMEDCLIP_REPO, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))]


def test_unknown_hub_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="laion2b_s34b_b88k"):
        build_encoder("openclip/ViT-B-16:openai", "hub:no-such-tag")


# -- registry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ENCODERS.names("openclip/*"))
def test_every_key_builds_random_and_runs(key, request):
    """True widths/heads/patches; open_clip ViTs at 2 blocks, BiomedCLIP's timm trunk at full depth."""
    if key == BIOMEDCLIP:
        encoder = request.getfixturevalue("biomedclip")
    else:
        encoder = build_encoder(key, vision_cfg=dict(layers=2))
    meta = ENCODERS.meta(key)
    x = torch.rand(2, 1, 120, 90)
    with torch.inference_mode():
        emb = encoder.encode(x)
        tokens, grid = encoder.tokens(x)
    patch = encoder.info.patch_size
    assert emb.shape == (2, meta["embed_dim"]) and torch.isfinite(emb).all()
    assert grid == (224 // patch, 224 // patch) and tokens.shape == (2, grid[0] * grid[1], encoder.info.token_dim)
    assert encoder.info.weights == "random" and encoder.info.weights_sha256 == ""
    assert encoder.info.extra["quick_gelu"] == key.endswith(":openai")


def test_mean_pooling_and_squash_resize():
    encoder = tiny(pooling="mean", resize="squash")
    x = torch.rand(3, 1, 50, 80)
    with torch.inference_mode():
        emb = encoder.encode(x)
        tokens, _ = encoder.tokens(x)
    assert encoder.info.embed_dim == encoder.info.token_dim == 64 and encoder.info.resize == "squash"
    torch.testing.assert_close(emb, tokens.mean(1))
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny(pooling="gem")
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        build_encoder("openclip/ViT-B-16:openai", img_size=100, vision_cfg=TINY_VISION)


def test_biomedclip_reduced_input_size():
    encoder = build_encoder(BIOMEDCLIP, img_size=112)
    with torch.inference_mode():
        tokens, grid = encoder.tokens(torch.rand(1, 1, 112, 112))
    assert encoder.info.input_size == (112, 112) and grid == (7, 7) and tokens.shape == (1, 49, 768)


@pytest.mark.slow
def test_vit_l_14_full_depth_builds():
    encoder = build_encoder("openclip/ViT-L-14:openai")
    assert sum(p.numel() for p in encoder.parameters()) == 303_966_208
    with torch.inference_mode():
        assert encoder.encode(torch.rand(1, 1, 224, 224)).shape == (1, 768)
