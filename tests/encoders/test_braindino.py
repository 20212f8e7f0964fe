"""BrainDINO: its published checkpoint layout loads strictly (random weights saved in that layout), offline
requests fail fast naming the file, its preprocessing is the authors' recipe, and its dense levels are timm's
patch tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slice2vol.encoders import WeightsUnavailable, build_encoder
from slice2vol.encoders.braindino import volume_inputs

KEY = "braindino/vit_base"
TINY = dict(model_kwargs=dict(depth=2), img_size=64)


def dinov3_layout(model: torch.nn.Module, heads: bool = True) -> dict:
    """A timm DINOv3 model's tensors under DINOv3's own names, as the authors' trainer saves its teacher:
    ``{"teacher": {"backbone.<name>": ..., "dino_head.*": ..., "ibot_head.*": ...}}`` plus the training-only
    ``mask_token`` and rotary ``periods`` buffers."""
    names = {"reg_token": "storage_tokens"}
    backbone = {}
    for name, tensor in model.state_dict().items():
        name = names.get(name, name).replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        backbone[f"backbone.{name}"] = tensor.clone()
    width = model.num_features
    backbone["backbone.mask_token"] = torch.zeros(1, width)
    backbone["backbone.rope_embed.periods"] = torch.arange(1, width // model.blocks[0].attn.num_heads // 4 + 1.0)
    teacher = dict(backbone)
    if heads:
        gen = torch.Generator().manual_seed(5)
        teacher.update({"dino_head.mlp.0.weight": torch.randn(32, width, generator=gen),
                        "dino_head.last_layer.weight": torch.randn(64, 16, generator=gen),
                        "ibot_head.mlp.0.weight": torch.randn(32, width, generator=gen)})
    return {"teacher": teacher, "iteration": 1250}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    encoder = build_encoder(KEY, **TINY)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # LayerScale starts at 1e-5: give the blocks weight so a wrong load shows
        for name, param in encoder.model.named_parameters():
            if "gamma" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return encoder


def test_checkpoint_in_the_authors_layout_loads_every_tensor(source, tmp_path):
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(dinov3_layout(source.model), path)
    torch.manual_seed(1)  # a different init: the file must overwrite every tensor
    loaded = build_encoder(KEY, weights=path, **TINY)
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    x = torch.rand(2, 1, 80, 70)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), source.encode(x))
        tokens, grid = loaded.tokens(x)
    assert grid == (4, 4) and tokens.shape == (2, 16, 768)  # 1 CLS + 4 storage tokens dropped
    assert loaded.info.weights == str(path) and len(loaded.info.weights_sha256) == 64


@pytest.mark.parametrize("damage,message", [
    ("missing", "missing tensors"),
    ("extra", r"1 unexpected \[.blocks.2.norm1.weight.\]"),
    ("stray", "neither backbone"),
    ("shape", "wrong shape"),
])
def test_loading_is_strict(source, tmp_path, damage, message):
    ckpt = dinov3_layout(source.model)
    teacher = ckpt["teacher"]
    if damage == "missing":
        del teacher["backbone.blocks.1.mlp.fc2.weight"]
    elif damage == "extra":
        teacher["backbone.blocks.2.norm1.weight"] = torch.ones(768)  # a block the model does not have
    elif damage == "stray":
        teacher["student.cls_token"] = torch.zeros(1, 1, 768)
    else:
        teacher["backbone.blocks.0.mlp.fc1.weight"] = torch.zeros(10, 768)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        build_encoder(KEY, weights=tmp_path / "bad.pth", **TINY)


def test_bare_encoder_state_dict_and_heads_left_out(source, tmp_path):
    bare = {k[len("backbone."):]: v for k, v in dinov3_layout(source.model, heads=False)["teacher"].items()}
    torch.save(bare, tmp_path / "encoder.pth")
    loaded = build_encoder(KEY, weights=tmp_path / "encoder.pth", **TINY)
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), source.encode(x))


def test_offline_requests_fail_fast_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"braindino/vit_base: pretrained weights .*weights='/path/to/"
                                                 r"braindino_vitb16.pth'"):
        build_encoder(KEY, weights="pretrained")
    with pytest.raises(WeightsUnavailable, match="not on any hub yet"):
        build_encoder(KEY, weights="hub")
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="use weights='pretrained'"):
        build_encoder(KEY, weights="imagenet")


def test_pretrained_resolves_from_the_weights_folder(source, tmp_path, monkeypatch):
    torch.save(dinov3_layout(source.model), tmp_path / "braindino_vitb16.pth")
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(tmp_path))
    loaded = build_encoder(KEY, weights="pretrained", **TINY)
    assert loaded.info.weights == "pretrained" and loaded.info.weights_origin["origin"] == "env"


# -- preprocessing: the authors' recipe -------------------------------------------------------------
def authors_zscore(vol: np.ndarray) -> np.ndarray:
    """The recipe of BrainDINO's ``zscore_normalize`` (datasets_3D loaders), written here in numpy."""
    vol = vol.astype(np.float64)
    nonzero = vol[vol > 0]
    if nonzero.size < 10:
        nonzero = vol.reshape(-1)
    vol = np.clip(vol, np.percentile(nonzero, 1), np.percentile(nonzero, 99))
    nz = vol[vol > 0]
    mean, std = (nz.mean(), nz.std()) if nz.size > 0 else (vol.mean(), vol.std())
    return (vol - mean) / max(std, 1e-6)


def _head(shape=(30, 90, 110), seed=0) -> np.ndarray:
    from tests.conftest import blob_volume

    return blob_volume(shape, seed=seed) + 0  # (D, H, W) float32 >= 0 with air at 0


def test_slice_preprocess_is_the_authors_recipe_per_slice():
    encoder = build_encoder(KEY, **TINY)
    vol = _head()
    slices = torch.from_numpy(vol[10:13] / vol.max())[:, None].float()  # (3, 1, H, W) in [0, 1]
    ours = encoder.preprocess(slices)
    expected = []
    for image in slices[:, 0].numpy():
        z = torch.from_numpy(authors_zscore(image)).float()
        expected.append(F.interpolate(z[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0])
    expected = torch.stack(expected).expand(-1, 3, -1, -1)
    assert ours.shape == (3, 3, 64, 64)
    assert (ours - expected).abs().max() < 1e-4
    # the check can fail: without the z-score, or with PIL-style antialiased resizing, it does
    encoder.info.intensity = "unit"
    assert (encoder.preprocess(slices) - expected).abs().max() > 0.5
    encoder.info.intensity, encoder.info.interpolation = "zscore", "bilinear"
    assert (encoder.preprocess(slices) - expected).abs().max() > 0.05


def test_volume_inputs_are_the_authors_volume_recipe():
    vol = _head()
    z = torch.from_numpy(authors_zscore(vol)).float()
    depth = F.interpolate(z[None, None], size=(16, *z.shape[1:]), mode="trilinear", align_corners=False)[0, 0]
    expected = F.interpolate(depth[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
    got = volume_inputs(torch.from_numpy(vol), n_slices=16)
    assert got.shape == (16, 3, 224, 224)
    assert (got[:, 0] - expected).abs().max() < 1e-4 and torch.equal(got[:, 0], got[:, 2])
    # volume statistics differ from slice statistics: the per-slice path is an approximation
    per_slice = build_encoder(KEY, **TINY).preprocess(torch.from_numpy(vol[15:16] / vol.max())[None].float())
    assert per_slice.shape == (1, 3, 64, 64)


def test_dense_levels_are_timms_patch_tokens_on_their_grid(source):
    """Dense API: every block at stride 16 on a (H/16, W/16) grid, CLS and the 4 storage tokens dropped; the
    normalised last level equals the patch tokens of timm's own forward_features."""
    levels = source.feature_info()
    assert [(f.name, f.channels, f.stride) for f in levels] == [("blocks.0", 768, 16), ("blocks.1", 768, 16)]
    x = source.preprocess(torch.rand(2, 1, 70, 90))
    with torch.inference_mode():
        maps = source.forward_intermediates(x, [-1], norm=True)
        tokens = source.model.forward_features(x)  # (B, 1 + 4 + 16, 768)
    assert source.model.num_prefix_tokens == 5 and maps[0].shape == (2, 768, 4, 4)
    torch.testing.assert_close(maps[0].flatten(2).transpose(1, 2), tokens[:, 5:], rtol=0, atol=1e-5)
    # the check can fail: keeping a storage token in place of the last patch token is visible
    shifted = tokens[:, 4:-1]
    assert (maps[0].flatten(2).transpose(1, 2) - shifted).abs().max() > 1e-2
