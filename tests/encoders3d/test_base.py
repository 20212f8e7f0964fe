"""The 3D registry's shared pieces: weights strings, strict loading, pooling, levels, recipes, sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.encoders3d import ENCODERS3D, Encoder3D, Encoder3DInfo, FeatureLevel3D, SlidingWindow, build_encoder3d
from slice2vol.encoders3d.base import load_strict, parse_weights3d, pool3d, read_checkpoint, resolve_levels
from slice2vol.encoders3d.preprocess import Recipe


def test_registry_lists_every_family_and_refuses_unknown_keys():
    names = ENCODERS3D.names()
    assert {"3d/deepbet", "3d/monai_resnet18", "3d/monai_densenet121"} <= set(names)
    assert all(n.startswith("3d/") for n in names)
    with pytest.raises(KeyError, match="unknown 3D encoder '3d/nope'"):
        build_encoder3d("3d/nope")


@pytest.mark.parametrize("text, expected", [
    ("random", ("random", "")), (None, ("random", "")), ("hub", ("hub", "")), ("hub:23dataset", ("hub", "23dataset")),
    ("package", ("package", "")), ("package:deepbet", ("package", "deepbet")),
])
def test_parse_weights3d(text, expected):
    assert parse_weights3d(text) == expected


def test_parse_weights3d_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: weights file not found"):
        parse_weights3d(tmp_path / "nope.pt")
    # fuzz round 6: `--weights "$CKPT"` with the variable unset built a random network without a word
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"^weights is an empty string \(an unset shell variable\?\)"):
            parse_weights3d(empty)


def test_sliding_window_parse():
    assert SlidingWindow.parse(None) is None and SlidingWindow.parse(False) is None
    assert SlidingWindow.parse(True) == SlidingWindow()
    sw = SlidingWindow.parse({"roi_size": [16, 16, 16], "overlap": 0.25})
    assert sw.roi_size == (16, 16, 16) and sw.overlap == 0.25 and sw.mode == "constant"
    with pytest.raises(ValueError, match="unknown option.*'stride'"):
        SlidingWindow.parse({"stride": 4})


@pytest.mark.parametrize("option, message", [
    ({"roi_size": [0, 0, 0]}, r"roi_size must be 3 window sizes >= 1 voxel \(X, Y, Z\), got \[0, 0, 0\]"),
    ({"roi_size": [32, 32]}, "roi_size must be 3 window sizes"),
    ({"roi_size": [32.5, 32, 32]}, "roi_size must be 3 window sizes"),
    ({"roi_size": "big"}, "roi_size must be 3 window sizes"),
    ({"overlap": 1.0}, r"overlap must be a fraction in \[0, 1\), got 1.0"),  # MONAI's step would be 0
    ({"overlap": -0.5}, "overlap must be a fraction"),
    ({"sw_batch_size": 0}, "sw_batch_size must be a whole number >= 1, got 0"),
    ({"mode": "median"}, "mode must be constant or gaussian, got 'median'"),
])
def test_sliding_window_values_out_of_range_are_refused_in_one_line(option, message):
    with pytest.raises(ValueError, match=message) as err:
        SlidingWindow.parse(option)
    assert "\n" not in str(err.value)


def test_pool3d_against_hand_computed_values():
    x = torch.arange(16, dtype=torch.float32).view(2, 1, 2, 2, 2)  # sample 0: 0..7, sample 1: 8..15
    assert pool3d(x, "avg").flatten().tolist() == [3.5, 11.5]
    assert pool3d(x, "max").flatten().tolist() == [7.0, 15.0]
    gem = pool3d(x, "gem").flatten()
    expected = [(np.clip(np.arange(8.0), 1e-6, None) ** 3).mean() ** (1 / 3),
                (np.arange(8.0, 16.0) ** 3).mean() ** (1 / 3)]
    assert np.allclose(gem.numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling must be"):
        pool3d(x, "median")
    tiny = x * 1e-9  # random-init 3D nets give maps this small: samples must stay apart
    assert np.allclose((pool3d(tiny, "gem") / 1e-9).flatten().numpy(), expected, rtol=1e-4)
    assert np.allclose(pool3d(x, "gem", gem_p=500.0).flatten().numpy(), [7.0, 15.0], rtol=1e-2)


def test_resolve_levels():
    assert resolve_levels(None, 5, "k") == (0, 1, 2, 3, 4)
    assert resolve_levels(-1, 5, "k") == (4,)
    assert resolve_levels([0, -2], 5, "k") == (0, 3)
    with pytest.raises(ValueError, match="level 5 out of range"):
        resolve_levels([5], 5, "k")


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Recipe()}, path)  # a dataclass needs pickle
    with pytest.raises(ValueError, match=r"evil.pt: holds Python objects other than tensors \(.*Recipe\); refused"):
        read_checkpoint(path)


def test_load_strict_names_the_file_and_the_offending_keys(tmp_path):
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "1.running_var"}
    with pytest.raises(ValueError, match=r"ckpt.pt: not the tiny checkpoint layout: 1 missing tensors \['1.running_var'\]"):
        load_strict(model, missing, tmp_path / "ckpt.pt", "tiny")
    extra = {**state, "head.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 unexpected \['head.weight'\]"):
        load_strict(model, extra, "ckpt.pt", "tiny")
    wrong = {**state, "0.weight": torch.zeros(2, 1, 2, 2, 2)}
    with pytest.raises(ValueError, match=r"wrong shape, first '0.weight' \(2, 1, 2, 2, 2\)"):
        load_strict(model, wrong, "ckpt.pt", "tiny")


# -- recipes ------------------------------------------------------------------------------------------
def test_recipe_zscore_inside_the_head_mask(head_volume):
    x = Recipe(crop="none", intensity="zscore_foreground").apply(head_volume, [0])
    assert x.shape == (1, 1, *head_volume.shape)
    inside = x[0, 0][torch.from_numpy(head_volume.mask)]
    assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std()) - 1) < 1e-3


def test_recipe_crop_pad_divisor_and_axes(head_volume):
    mask = head_volume.mask
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    box = [int(i.max() - i.min() + 1) for i in idx]
    cropped = Recipe(crop="foreground", intensity="none").apply(head_volume, [0])
    assert list(cropped.shape[2:]) == box
    padded = Recipe(crop="foreground", intensity="none", divisor=16).apply(head_volume, [0])
    assert all(s % 16 == 0 and s - b < 16 for s, b in zip(padded.shape[2:], box))
    sized = Recipe(crop="none", intensity="minmax", resize="pad_crop", size=(32, 24, 40)).apply(head_volume, [0])
    assert sized.shape[2:] == (32, 24, 40) and float(sized.min()) >= 0 and float(sized.max()) <= 1
    ras = Recipe(crop="none", intensity="none", size=(20, 30, 26), resize="resize").apply(head_volume, [0])
    sar = Recipe(crop="none", intensity="none", size=(26, 30, 20), resize="resize", axes="SAR").apply(head_volume, [0])
    assert torch.allclose(ras.permute(0, 1, 4, 3, 2), sar, atol=1e-5)


def test_recipe_spacing_and_percentiles(head_volume):
    x = Recipe(spacing=(4.0, 4.0, 4.0), crop="none", intensity="none").apply(head_volume, [0])
    assert list(x.shape[2:]) == [round(n / 2) for n in head_volume.shape]
    scaled = Recipe(crop="none", intensity="percentile", percentiles=(1, 99)).apply(head_volume, [0])[0, 0].numpy()
    data = head_volume.data[0]
    lo, hi = np.percentile(data[head_volume.mask], [1, 99])  # numpy's linear rule = torch.quantile's
    assert np.allclose(scaled, np.clip((data - lo) / (hi - lo), 0, 1), atol=1e-5)


# -- sliding windows ------------------------------------------------------------------------------------
class _LocalEncoder(Encoder3D):
    """Features = 4x4x4 average pooling of the input (purely local), so stitched windows must equal the
    whole-volume map exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.info = Encoder3DInfo(key="test/local", embed_dim=2, input_size=(16, 16, 16), size_divisor=4,
                                  levels=(0, 1))

    def preprocess(self, volume):
        return torch.from_numpy(volume.data[:1].copy())[None]

    def feature_info(self):
        return [FeatureLevel3D(0, "avg4", 1, 4), FeatureLevel3D(1, "avg8", 1, 8)]

    def feature_maps(self, x, levels=None):
        maps = [F.avg_pool3d(x * self.scale, 4), F.avg_pool3d(x * self.scale, 8)]
        return maps if levels is None else [maps[i] for i in levels]


def test_sliding_window_stitching_equals_whole_volume_for_local_features():
    from slice2vol.data.io import Volume

    data = torch.rand(1, 32, 48, 40, generator=torch.Generator().manual_seed(0)).numpy()
    volume = Volume("v", data, np.eye(4), np.ones(data.shape[1:], bool))
    enc = _LocalEncoder().eval()
    whole = enc.embed_volume(volume)
    assert torch.allclose(whole, torch.tensor([data.mean(), data.mean()]), atol=1e-6)
    for overlap in (0.0, 0.5):
        tiled = enc.embed_volume(volume, {"roi_size": [16, 16, 16], "overlap": overlap})
        assert torch.allclose(tiled, whole, atol=1e-6), overlap
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.embed_volume(volume, {"roi_size": [10, 16, 16]})
