"""SAM / MedSAM: SamPredictor and MedSAM-recipe equivalence on IXI slices, checkpoints, reduced size, hub."""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slice2vol.encoders import ENCODERS, WeightsUnavailable, build_encoder
from slice2vol.encoders import base as encoder_base
from tests.encoders import cosine, ixi_slices

segment_anything = pytest.importorskip("segment_anything")
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

# SAM's encoder at 2 blocks, 64 wide, 256 px: windowed + global attention, rel-pos, neck all exercised.
TINY = dict(img_size=256, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4)


def randomise_positions(image_encoder: torch.nn.Module, seed: int = 0) -> None:
    """SAM initialises pos_embed and rel-pos tables at zero; make them matter for the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in image_encoder.named_parameters():
            if "pos" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def official_sam(image_encoder: ImageEncoderViT) -> Sam:
    """A ``Sam`` around ``image_encoder`` (tiny prompt encoder / decoder: SamPredictor only needs them to exist)."""
    size = image_encoder.img_size
    grid = size // 16
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=1, iou_head_hidden_dim=8,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=16, num_heads=1)),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    ours = build_encoder("sam/vit_b", **TINY)
    randomise_positions(ours.image_encoder)
    return ours, official_sam(ours.image_encoder)


@pytest.fixture(scope="module")
def sam_checkpoint(tiny_sam, tmp_path_factory):
    """The tiny Sam saved as Meta's checkpoints are: ``torch.save(sam.state_dict())``."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(tiny_sam[1].state_dict(), path)
    return path


def u8_slices(manifest, plane, size):
    images = ixi_slices(manifest, plane, 2, size)
    u8 = (images.clamp(0, 1) * 255).round()
    return u8.to(torch.uint8), u8 / 255  # what the official pipelines get, and the same values as floats


def token_cosines(ours_tokens: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """Per-token cosine between (T, 256) and a (1, 256, g, g) neck map."""
    return cosine(ours_tokens, feature_map[0].flatten(1).T)


# -- official pipeline equivalence on real slices ---------------------------------------------------
@pytest.mark.ixi
@pytest.mark.parametrize("plane,size", [("coronal", None), ("axial", 224)])
def test_sam_tokens_match_sam_predictor_set_image(ixi_manifest, tiny_sam, plane, size):
    """SamPredictor.set_image (PIL resize of the uint8 RGB image, normalise, pad) vs our batched tokens.

    ``size=None`` gives 90 x 120 slices: longest side to 256, then zero padding on the right.
    """
    ours, sam = tiny_sam
    images_u8, images = u8_slices(ixi_manifest, plane, size)
    predictor = SamPredictor(sam)
    with torch.inference_mode():
        tokens, grid = ours.tokens(images)
        pooled = ours.encode(images)
        pre = ours.preprocess(images)
    assert grid == (16, 16) and tokens.shape == (2, 256, 256)
    for i, image in enumerate(images_u8):
        rgb = np.repeat(image[0].numpy()[:, :, None], 3, axis=-1)
        official = sam.preprocess(torch.as_tensor(predictor.transform.apply_image(rgb)).permute(2, 0, 1)[None].float())
        assert (pre[i] - official[0]).abs().max() < 1.01 / 57.12  # within one grey level (PIL rounds to 8 bits)
        predictor.set_image(rgb)
        assert token_cosines(tokens[i], predictor.features).min() >= 0.999
        assert cosine(pooled[i:i + 1], predictor.features.mean((-2, -1))).item() >= 0.999


@pytest.mark.ixi
@pytest.mark.parametrize("plane,size", [("coronal", None), ("axial", 224)])
def test_medsam_matches_its_official_inference_recipe(ixi_manifest, tiny_sam, plane, size):
    """MedSAM_Inference.py: skimage cubic resize to a square, uint8, min-max, image_encoder (here at 256 px)."""
    from skimage import transform

    ours, sam = tiny_sam
    medsam = build_encoder("medsam/vit_b", **TINY)
    medsam.image_encoder.load_state_dict(ours.image_encoder.state_dict())
    images_u8, images = u8_slices(ixi_manifest, plane, size)
    with torch.inference_mode():
        tokens, grid = medsam.tokens(images)
        pre = medsam.preprocess(images)
    assert grid == (16, 16)
    for i, image in enumerate(images_u8):
        img_3c = np.repeat(image[0].numpy()[:, :, None], 3, axis=-1)
        img = transform.resize(img_3c, (256, 256), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
        img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
        # same image up to the script's uint8 floor after resizing
        assert (pre[i] - torch.from_numpy(img).permute(2, 0, 1)).abs().max() <= 1.01 / 255
        with torch.inference_mode():
            reference = sam.image_encoder(torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0))
        assert token_cosines(tokens[i], reference).min() >= 0.999


@pytest.mark.parametrize("shape_in,shape_out", [((120, 90), (256, 256)), ((300, 250), (128, 96)), ((7, 1), (20, 3))])
def test_spline_resize_matrix_is_skimage_cubic_resize(shape_in, shape_out):
    """Enlarging, shrinking (Gaussian anti-aliasing) and degenerate sizes, against skimage itself."""
    from skimage import transform

    from slice2vol.encoders.sam import spline_resize_matrix

    image = np.random.default_rng(0).random(shape_in) * 255
    expected = transform.resize(image, shape_out, order=3, preserve_range=True, anti_aliasing=True, clip=False)
    rows, cols = spline_resize_matrix(shape_in[0], shape_out[0]), spline_resize_matrix(shape_in[1], shape_out[1])
    got = (rows.double() @ torch.from_numpy(image) @ cols.double().T).numpy()
    assert np.abs(got - expected).max() < 1e-3  # float32 matrices, values up to 255


def test_medsam_preprocess_is_squash_then_minmax():
    medsam = build_encoder("medsam/vit_b", **TINY)
    x = torch.rand(2, 1, 40, 30) * 0.5 + 0.2
    pre = medsam.preprocess(x)
    assert pre.shape == (2, 3, 256, 256)
    torch.testing.assert_close(pre.amin((1, 2, 3)), torch.zeros(2))
    torch.testing.assert_close(pre.amax((1, 2, 3)), torch.ones(2))
    assert medsam.info.mean == (0.0, 0.0, 0.0) and medsam.info.intensity == "minmax"


def test_sam_pads_bottom_right_with_zeros_after_normalising():
    sam = build_encoder("sam/vit_b", **TINY)
    pre = sam.preprocess(torch.full((1, 1, 64, 32), 0.5))
    assert pre.shape == (1, 3, 256, 256)
    assert (pre[..., 128:] == 0).all()  # 64 x 32 -> 256 x 128, then padded
    expected = (0.5 * 255 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(pre[0, :, 100, 60], expected)


# -- local checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["sam/vit_b", "medsam/vit_b"])
def test_full_sam_checkpoint_round_trip(tiny_sam, sam_checkpoint, key):
    ours, _ = tiny_sam
    loaded = build_encoder(key, sam_checkpoint, **TINY)
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        pre = loaded.preprocess(x)
        assert torch.equal(loaded.image_encoder(pre), ours.image_encoder(pre))
        tokens, grid = loaded.tokens(x)
    assert tokens.shape == (2, 256, 256) and grid == (16, 16)
    assert loaded.info.weights == str(sam_checkpoint)
    assert loaded.info.weights_sha256 == encoder_base.sha256_file(sam_checkpoint)


def test_encoder_only_safetensors_round_trip(tiny_sam, tmp_path):
    from safetensors.torch import save_file

    ours, _ = tiny_sam
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in ours.image_encoder.state_dict().items()}, str(path))
    loaded = build_encoder("sam/vit_b", path, **TINY)
    x = torch.rand(1, 1, 80, 80)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), ours.encode(x))


def test_reduced_resolution_matches_sams_own_rel_pos_interpolation(tiny_sam, sam_checkpoint):
    """A 256-px checkpoint built at 128 px: pos_embed resized bicubically; the global block's rel-pos
    tables resized so the output equals SAM's own on-the-fly ``get_rel_pos`` interpolation."""
    ours, _ = tiny_sam
    small = build_encoder("sam/vit_b", sam_checkpoint, **dict(TINY, img_size=128))
    assert small.info.input_size == (128, 128)
    resized = {"pos_embed", "blocks.1.attn.rel_pos_h", "blocks.1.attn.rel_pos_w"}  # block 0 is windowed
    assert set(small.info.extra["resized_tables"]) == resized
    expected_pos = F.interpolate(ours.image_encoder.pos_embed.detach().permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                                 align_corners=False, antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(small.image_encoder.pos_embed.detach(), expected_pos)
    # reference: SAM's encoder at 128 px holding the original 31-long tables (get_rel_pos resizes them)
    reference = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
                                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
                                window_size=4, global_attn_indexes=(1,), out_chans=256).eval()
    state = dict(ours.image_encoder.state_dict(), pos_embed=expected_pos)
    attn = reference.blocks[1].attn
    attn.rel_pos_h = torch.nn.Parameter(state.pop("blocks.1.attn.rel_pos_h").clone())
    attn.rel_pos_w = torch.nn.Parameter(state.pop("blocks.1.attn.rel_pos_w").clone())
    assert attn.rel_pos_h.shape == (31, 32) and small.image_encoder.blocks[1].attn.rel_pos_h.shape == (15, 32)
    reference.load_state_dict(state, strict=False)
    x = torch.rand(2, 1, 100, 128)
    with torch.inference_mode():
        pre = small.preprocess(x)
        torch.testing.assert_close(small.image_encoder(pre), reference(pre), rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_architecture_is_refused(sam_checkpoint):
    with pytest.raises(ValueError, match="does not match the architecture"):
        build_encoder("sam/vit_b", sam_checkpoint, **dict(TINY, depth=3))


# -- hub -------------------------------------------------------------------------------------------
def test_sam_hub_offline_fails_fast_and_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch hub cache
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"sam_vit_b_01ec64\.pth.*Pass a local checkpoint instead: "
                                                 r"weights='/path/to/sam_vit_b_01ec64\.pth'"):
        build_encoder("sam/vit_b", "hub", **TINY)
    with pytest.raises(WeightsUnavailable, match=r"bowang-lab/MedSAM.*medsam_vit_b\.pth"):
        build_encoder("medsam/vit_b", "hub", **TINY)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("key,filename", [("sam/vit_b", "sam_vit_b_01ec64.pth"), ("medsam/vit_b", "medsam_vit_b.pth")])
def test_hub_uses_a_checkpoint_in_the_torch_hub_cache(monkeypatch, tmp_path, sam_checkpoint, tiny_sam, key, filename):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / filename).write_bytes(sam_checkpoint.read_bytes())
    encoder = build_encoder(key, "hub", **TINY)
    assert encoder.info.weights == f"hub:{filename}"
    assert encoder.info.weights_sha256 == encoder_base.sha256_file(sam_checkpoint)
    torch.testing.assert_close(encoder.image_encoder.pos_embed, tiny_sam[0].image_encoder.pos_embed, rtol=0, atol=0)


# -- registry ---------------------------------------------------------------------------------------
def test_sam_vit_b_builds_at_native_size():
    encoder = build_encoder("sam/vit_b")
    assert encoder.info.input_size == (1024, 1024) and encoder.info.extra["grid"] == [64, 64]
    assert sum(p.numel() for p in encoder.parameters()) == 89_670_912
    assert encoder.info.embed_dim == ENCODERS.meta("sam/vit_b")["embed_dim"] == 256
    assert encoder.micro_batch == 1  # 1024 px: ~2.4 GB of attention scores per image


@pytest.mark.parametrize("key", ["sam/vit_b", "medsam/vit_b"])
def test_full_width_vit_b_runs_at_reduced_size(key):
    encoder = build_encoder(key, img_size=64)
    with torch.inference_mode():
        emb = encoder.encode(torch.rand(1, 1, 50, 40))
        tokens, grid = encoder.tokens(torch.rand(1, 1, 64, 64))
    assert emb.shape == (1, 256) and torch.isfinite(emb).all()
    assert grid == (4, 4) and tokens.shape == (1, 16, 256)
    assert encoder.info.weights == "random" and encoder.info.weights_sha256 == ""


def test_options_are_validated():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_encoder("sam/vit_b", img_size=100, **{k: v for k, v in TINY.items() if k != "img_size"})
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_encoder("sam/vit_b", pooling="cls", **TINY)
    with pytest.raises(ValueError, match="no tags"):
        build_encoder("sam/vit_b", "hub:v2", **TINY)


def test_max_pooling():
    encoder = build_encoder("sam/vit_b", pooling="max", **TINY)
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        tokens, _ = encoder.tokens(x)
        torch.testing.assert_close(encoder.encode(x), tokens.amax(1))


def test_micro_batches_give_the_same_output(tiny_sam):
    from slice2vol.encoders.sam import default_micro_batch

    assert default_micro_batch(1024, 12) == 1 and default_micro_batch(512, 12) == 28
    ours, _ = tiny_sam
    one_at_a_time = build_encoder("sam/vit_b", micro_batch=1, **TINY)
    one_at_a_time.load_state_dict(ours.state_dict())
    x = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(one_at_a_time.tokens(x)[0], ours.tokens(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("key,params", [("sam/vit_l", 308_278_272), ("sam/vit_h", 637_026_048)])
def test_large_sam_encoders_build_and_run(key, params):
    encoder = build_encoder(key, img_size=64)
    assert sum(p.numel() for p in encoder.parameters()) < params  # position tables are 4 x 4 at 64 px
    with torch.inference_mode():
        assert encoder.encode(torch.rand(1, 1, 64, 64)).shape == (1, 256)


@pytest.mark.slow
def test_sam_vit_b_native_tokens_grid():
    encoder = build_encoder("sam/vit_b")
    with torch.inference_mode():
        tokens, grid = encoder.tokens(torch.rand(1, 1, 224, 224))
    assert grid == (64, 64) and tokens.shape == (1, 4096, 256)
