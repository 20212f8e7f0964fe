"""The shared encoder machinery: PIL-faithful resizing, channels, weights parsing/loading, hub checks, speed."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from slice2vol.encoders.base import (
    Encoder,
    EncoderInfo,
    WeightsUnavailable,
    assign_state_dict,
    center_crop,
    gem_pool,
    load_state_dict,
    parse_weights,
    pick_batch_size,
    pool_feature_map,
    require_hub,
    resize_images,
    resize_shorter,
    sha256_file,
)
from tests.encoders import ixi_slices


class TinyEncoder(Encoder):
    """A 2-layer CNN behind the interface, for testing the base class alone."""

    channels_last_friendly = True

    def __init__(self, **info_kwargs) -> None:
        super().__init__()
        self.info = EncoderInfo(key="test/tiny", embed_dim=8, input_size=(32, 32), **info_kwargs)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))

    def forward_features(self, x):
        return self.net(x).mean((-2, -1))

    def forward_tokens(self, x):
        fmap = self.net(x)
        return fmap.flatten(2).transpose(1, 2), tuple(fmap.shape[-2:])


class ArbitraryObject:
    """A pickled object that ``weights_only=True`` must refuse to load."""


# -- resizing ---------------------------------------------------------------------------------
def _pil_resize(image: torch.Tensor, size: tuple[int, int], resample) -> np.ndarray:
    array = (image[0].numpy() * 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample)) / 255.0


@pytest.mark.ixi
@pytest.mark.parametrize("interp,resample", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
@pytest.mark.parametrize("size", [(256, 341), (64, 48), (90, 120), (40, 80)])
def test_resize_matches_pil_on_real_slice(ixi_manifest, interp, resample, size):
    image = ixi_slices(ixi_manifest, "coronal", 3, None)[1:2]  # (1, 1, 120, 90), non-square
    image = (image * 255).round() / 255  # the same 8-bit input PIL sees
    ours = resize_images(image, size, interp)[0, 0].numpy()
    reference = _pil_resize(image[0], size, resample)
    # PIL rounds to 8 bits after each of its two passes: within 1-2 grey levels, mean far below
    assert np.abs(ours - reference).max() <= 2.5 / 255
    assert np.abs(ours - reference).mean() < 0.5 / 255


def test_resize_shorter_and_crop_follow_torchvision_rules():
    import torchvision.transforms as T

    x = torch.rand(1, 1, 90, 120)
    y = resize_shorter(x, 256)
    pil = T.Resize(256)(Image.fromarray((x[0, 0].numpy() * 255).astype(np.uint8)))
    assert y.shape[-2:] == (pil.size[1], pil.size[0]) == (256, 341)
    grid = torch.arange(7 * 10.0).view(1, 1, 7, 10)
    crop = center_crop(grid, (4, 4))
    reference = T.CenterCrop(4)(grid)
    assert torch.equal(crop, reference)
    assert center_crop(torch.ones(1, 1, 2, 2), (4, 4)).shape[-2:] == (4, 4)  # pads like torchvision


def test_resize_clips_overshoot_to_input_range_only():
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    up = resize_images(step, (32, 32), "bicubic")
    assert up.min() >= 0 and up.max() <= 1  # bicubic would overshoot
    wide = step * 5 - 2  # values in [-2, 3]: kept, not squashed into [0, 1]
    assert resize_images(wide, (32, 32)).min() < -1.9 and resize_images(wide, (32, 32)).max() > 2.9
    with pytest.raises(ValueError, match="interpolation"):
        resize_images(step, (4, 4), "lanczos")


# -- preprocessing & channels -------------------------------------------------------------------
def test_preprocess_modes_by_hand():
    enc = TinyEncoder(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((2, 1, 32, 32), 0.75)
    out = enc.preprocess(x)
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, torch.ones_like(out))  # (0.75-0.5)/0.25
    shorter = TinyEncoder(resize="shorter", resize_size=40, mean=(0, 0, 0), std=(1, 1, 1))
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64)
    crop = shorter.preprocess(ramp)
    assert crop.shape[-2:] == (32, 32)
    assert 0.05 < crop[0, 0, 0, 0] < 0.15 and 0.85 < crop[0, 0, 0, -1] < 0.95  # centre 32 of 40 kept
    longest = TinyEncoder(resize="longest", mean=(0, 0, 0), std=(1, 1, 1))
    padded = longest.preprocess(torch.ones(1, 1, 16, 8))
    assert padded.shape[-2:] == (32, 32) and padded[0, 0, :, 16:].abs().sum() == 0
    minmax = TinyEncoder(intensity="minmax", mean=(0, 0, 0), std=(1, 1, 1))
    scaled = minmax.preprocess(torch.rand(1, 1, 32, 32) * 0.2 + 0.3)
    assert scaled.min().item() == pytest.approx(0, abs=1e-6) and scaled.max().item() == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("resize,interpolation,mode", [("squash", "bicubic", "replicate"),
                                                      ("shorter", "bicubic", "replicate"),
                                                      ("shorter", "bilinear", "mean"),
                                                      ("longest", "bilinear", "replicate"),
                                                      ("squash", "torch-bilinear", "stack"),
                                                      ("squash", "nearest", "replicate")])
def test_one_channel_is_resized_once_with_the_values_of_resizing_every_copy(resize, interpolation, mode):
    """A 1-channel slice is resized before it is replicated; reference: the same slice given as three
    identical channels, which takes the resize-every-channel path."""
    enc = TinyEncoder(resize=resize, resize_size=40, interpolation=interpolation, channel_mode=mode,
                      mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    x = torch.rand(3, 1, 45, 27) ** 2  # non-square, so every resize mode resamples
    one = enc.preprocess(x)
    three = enc.preprocess(x.repeat(1, 3, 1, 1))
    assert one.shape == three.shape == (3, 3, 32, 32)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)
    assert not torch.allclose(one[:, 0], one[:, 2])  # per-channel mean/std applied after the copy


@pytest.mark.parametrize("channels,mode,expect", [(1, "replicate", [0, 0, 0]), (3, "replicate", [0, 1, 2]),
                                                  (5, "replicate", [1, 2, 3]), (2, "mean", None)])
def test_adapt_channels(channels, mode, expect):
    enc = TinyEncoder(channel_mode=mode)
    x = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1).expand(1, channels, 4, 4)
    out = enc.adapt_channels(x)
    assert out.shape == (1, 3, 4, 4)
    values = out[0, :, 0, 0].tolist()
    assert values == (expect if expect is not None else [0.5] * 3)


def test_adapt_channels_stack_needs_exact_count():
    with pytest.raises(ValueError, match="channel_mode='stack' needs 3"):
        TinyEncoder(channel_mode="stack").adapt_channels(torch.zeros(1, 2, 4, 4))


def test_pooling_by_hand():
    fmap = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert pool_feature_map(fmap, "avg").item() == pytest.approx(2.5)
    assert pool_feature_map(fmap, "max").item() == 4.0
    assert gem_pool(fmap, p=1.0).item() == pytest.approx(2.5)
    assert gem_pool(fmap, p=3.0).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3), rel=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        pool_feature_map(fmap, "cls")


def test_gem_pool_equals_the_aggregators_gem_and_keeps_tiny_and_large_p_maps_apart():
    """The encoders' GeM is the aggregators' GeM (pool_array, float64) with positions as slices:
    maps of ~1e-8 (random BatchNorm nets) stay distinct and p = 200 gives nearly the max, where the
    plain formula lifted both tiny maps to eps and underflowed p = 200 to 0."""
    from slice2vol.aggregate.pooling import pool_array

    rng = np.random.default_rng(0)
    for scale in (1.0, 1e-8):
        fmap = torch.from_numpy(rng.standard_normal((2, 5, 3, 4)) * scale).float()
        for p in (1.0, 3.0, 200.0):
            ours = gem_pool(fmap, p=p)
            for b in range(2):
                ref = pool_array(fmap[b].reshape(5, -1).T.double().numpy(), "gem", p=p)
                np.testing.assert_allclose(ours[b].numpy(), ref, rtol=2e-5, atol=0)
    tiny = torch.from_numpy(rng.random((2, 3, 4, 4)) * 1e-8).float()
    pooled = gem_pool(tiny)
    assert not torch.allclose(pooled[0], pooled[1], rtol=1e-3, atol=0)
    assert torch.allclose(gem_pool(tiny, p=1e4), tiny.amax((-2, -1)), rtol=2e-3)
    zeros = gem_pool(torch.zeros(1, 2, 3, 3))
    assert torch.equal(zeros, torch.zeros(1, 2))


# -- weights ------------------------------------------------------------------------------------
def test_parse_weights(tmp_path):
    assert parse_weights(None) == ("random", "")
    assert parse_weights("random") == ("random", "")
    assert parse_weights("hub") == ("hub", "")
    assert parse_weights("hub:a1_in1k") == ("hub", "a1_in1k")
    path = tmp_path / "w.pth"
    path.write_bytes(b"x")
    assert parse_weights(path) == ("file", str(path))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        parse_weights(tmp_path / "missing.pth")


def test_load_state_dict_unwraps_and_refuses_pickles(tmp_path):
    state = {"a.weight": torch.ones(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert torch.equal(load_state_dict(tmp_path / "wrapped.pth")["a.weight"], state["a.weight"])

    torch.save({"obj": ArbitraryObject()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil.pth: holds Python objects other than tensors "
                                         r"\(tests.encoders.test_base.ArbitraryObject\); refused"):
        load_state_dict(tmp_path / "evil.pth")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["a.weight"], state["a.weight"])


def test_assign_state_dict_by_name_by_order_and_errors(caplog):
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assign_state_dict(dst, src.state_dict(), "k")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # names differ, order and shapes agree -> mapped one-to-one
    renamed = {f"other_{i}": v for i, v in enumerate(src.state_dict().values())}
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assign_state_dict(fresh, renamed, "k")
    assert torch.equal(fresh[1].weight, src[1].weight)
    # a shape mismatch in order mode names the tensor and both shapes
    bad = dict(renamed)
    bad["other_2"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"tensor #2 'other_2' has shape \(2, 5\) but the model's #2 '1.weight'"):
        assign_state_dict(fresh, bad, "k")
    # by name: wrong shape, missing non-classifier tensors
    with pytest.raises(ValueError, match="wrong shape"):
        assign_state_dict(fresh, {**src.state_dict(), "1.weight": torch.zeros(2, 5)}, "k")
    with pytest.raises(ValueError, match="1 missing"):
        assign_state_dict(fresh, {k: v for k, v in src.state_dict().items() if k != "0.bias"}, "k")
    # a backbone-only checkpoint leaves the classifier at init, with a warning
    model = nn.Module()
    model.body, model.fc = nn.Linear(2, 2), nn.Linear(2, 1)
    with caplog.at_level(logging.WARNING):
        left = assign_state_dict(model, {"body.weight": torch.zeros(2, 2), "body.bias": torch.zeros(2)}, "k")
    assert left == ["fc.bias", "fc.weight"] and "fc." in caplog.text


def test_integer_copies_of_the_weights_are_refused_by_name_and_in_order():
    """Fuzz round 7 (G4): load_state_dict casts int32 tensors into float parameters without a word
    (trained weights truncated to whole numbers, a small init to all zeros)."""
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ints = {k: v.to(torch.int32) for k, v in src.state_dict().items()}
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = [t.clone() for t in fresh.state_dict().values()]
    with pytest.raises(ValueError, match=r"^ckpt.pt: 4 tensor\(s\) are int32 where the model has float32 \(first: 0.weight\)"):
        assign_state_dict(fresh, ints, "k", source="ckpt.pt")
    renamed = {f"other_{i}": v for i, v in enumerate(ints.values())}
    with pytest.raises(ValueError, match=r"^ckpt.pt: 4 tensor\(s\) are int32"):
        assign_state_dict(fresh, renamed, "k", source="ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.state_dict().values()))  # untouched


def test_a_named_pipe_as_weights_is_refused_before_hashing(tmp_path):
    import os

    from slice2vol.encoders.base import parse_weights
    from slice2vol.encoders3d.base import load_strict

    os.mkfifo(tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"w.pt: a named pipe \(FIFO\), not a regular file; weights must be a regular file"):
        parse_weights(str(tmp_path / "w.pt"))
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^n.pt: 1 tensor\(s\) are int64 where the model has float32"):
        load_strict(net, {"weight": torch.ones(2, 2, dtype=torch.int64), "bias": torch.zeros(2)}, "n.pt", "net")


def test_sha256_file_and_directory(tmp_path):
    import hashlib

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "d" / "config.json").write_text("{}")
    assert sha256_file(tmp_path / "d" / "model.safetensors") == hashlib.sha256(b"abc").hexdigest()
    assert sha256_file(tmp_path / "d") == hashlib.sha256(b"abc").hexdigest()  # weights only


@pytest.mark.parametrize("setup", ["offline", "unreachable_endpoint"])
def test_require_hub_fails_fast_with_fix(monkeypatch, setup):
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"Pass a local checkpoint instead: --weights /path/x.pth"):
        require_hub("test/key", "hf-hub:org/model", "--weights /path/x.pth")
    assert time.perf_counter() - start < 10


# -- speed options ------------------------------------------------------------------------------
def test_optimize_channels_last_and_cpu_autocast_is_ignored(caplog):
    torch.manual_seed(0)
    enc = TinyEncoder().eval()
    x = torch.rand(4, 1, 40, 40)
    with torch.inference_mode():
        plain = enc.encode(x)
        with caplog.at_level(logging.WARNING):
            enc.optimize(channels_last=True, amp="bf16")
            fast = enc.encode(x)
    assert fast.dtype == torch.float32 and torch.allclose(plain, fast, atol=1e-5)
    assert "ignored on cpu" in caplog.text
    with pytest.raises(ValueError, match="amp"):
        enc.optimize(amp="int8")


def test_embed_batches_equal_one_pass_and_pick_batch_size():
    torch.manual_seed(0)
    enc = TinyEncoder().eval()
    x = torch.rand(10, 1, 32, 32)
    with torch.inference_mode():
        whole = enc.encode(x)
    batched = enc.embed(x, batch_size=3)
    assert torch.allclose(whole, batched, atol=1e-6)
    tokens, grid = enc.embed(x, batch_size=4, tokens=True)
    assert tokens.shape == (10, grid[0] * grid[1], 8)
    size = pick_batch_size(enc, "cpu")
    assert 1 <= size <= 32 and size & (size - 1) == 0
    with pytest.raises(ValueError, match="no images"):
        enc.embed(x[:0])


def test_encoder_configs_parse_and_build():
    from pathlib import Path

    from slice2vol.config import load_config
    from slice2vol.encoders import ENCODERS
    from slice2vol.encoders.base import EncoderConfig

    repo = Path(__file__).resolve().parents[2]
    paths = sorted((repo / "configs" / "encoders").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(EncoderConfig, path)
        assert cfg.key in ENCODERS, path.name
        weights = cfg.weights if cfg.weights in ("random", "hub") else str(repo / cfg.weights)
        if cfg.device != "cpu" or weights == "hub" or (weights != "random" and not Path(weights).exists()):
            continue
        cfg.weights = weights
        encoder = cfg.build()
        assert encoder.info.key == cfg.key and cfg.resolved_batch_size(encoder) >= 1
        with torch.inference_mode():
            assert encoder.encode(torch.rand(1, 1, 64, 64)).shape == (1, encoder.info.embed_dim)


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    torch.manual_seed(0)
    enc = TinyEncoder().eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        eager = enc.encode(x)
        enc.optimize(compile=True)
        assert torch.allclose(enc.encode(x), eager, atol=1e-5)


def test_batch_that_fits_models_fixed_plus_per_slice_memory():
    """The CUDA probe's arithmetic (GPU review: a first probe holding the cuBLAS workspace made the
    per-slice difference <= 0, and every model got max_batch). Hand-computed cases."""
    from slice2vol.encoders.base import batch_that_fits

    assert batch_that_fits(10_050, {2: 250, 8: 850}) == 100  # fixed 50 + 100 per slice
    # a slope that rounding made negative: the largest probe's bytes per slice, fixed part charged too
    assert batch_that_fits(9_900, {2: 1_000, 8: 990}) == int(9_900 // (990 / 8))
    assert batch_that_fits(1_000, {2: 400}) == 5  # one probe ran (the next did not fit): 200 per slice
    assert batch_that_fits(1_000, {}) == 1 and batch_that_fits(10, {2: 250, 8: 850}) == 1
