"""Dense features, pixel sampling and the linear segmentation probe, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slice2vol.data.io import Volume
from slice2vol.eval.dense import (DenseSlices, IntensityFeatures, Level, extract_dense, sample_features,
                                  select_levels, token_box, upsample_levels)
from slice2vol.eval.segmentation import (LinearSegProbe, class_slices, label_lut, predict_volume,
                                         sample_training_pixels, segmentation_scores)

LEVELS = [Level(0, "stem", 16, 2), Level(1, "layer1", 24, 4), Level(2, "layer2", 32, 4), Level(3, "layer3", 64, 8),
          Level(4, "head", 128, 32)]


@pytest.mark.parametrize("selectors, expected", [
    ([-1], [4]), (["last"], [4]), (["last:2"], [3, 4]), (["stride:4", "stride:8"], [2, 3]),
    ([0, "stride:4", 0], [0, 2]), (["name:layer1"], [1]), ([2, 1], [1, 2]),
])
def test_select_levels(selectors, expected):
    assert select_levels(LEVELS, selectors) == expected


@pytest.mark.parametrize("selectors, message", [
    (["stride:16"], "matches no level"), ([7], "out of range"), (["deepest"], "unknown level selector"),
])
def test_select_levels_errors(selectors, message):
    with pytest.raises(ValueError, match=message):
        select_levels(LEVELS, selectors)


class MapEncoder:
    """A fake dense encoder: level 0 is the image average-pooled by 2, level 1 a random linear map of
    it pooled by 4 (fixed seed), so maps are smooth functions of the image with different strides."""

    def __init__(self, img_size: int = 32, resize: str = "squash") -> None:
        self.info = type("Info", (), {"input_size": (img_size, img_size), "resize": resize,
                                      "resize_size": int(img_size * 1.25)})()
        self.img_size = img_size
        self.proj = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))

    def feature_info(self):
        return [Level(0, "pool2", 1, 2), Level(1, "proj4", 6, 4)]

    def feature_maps(self, images, levels=None, batch_size=32):
        x = F.interpolate(images.float()[:, :1], size=(self.img_size, self.img_size), mode="bilinear",
                          align_corners=False)
        maps = [F.avg_pool2d(x, 2), torch.einsum("dc,bchw->bdhw", self.proj, F.avg_pool2d(x, 4)) * 1e-7]
        return [maps[i] for i in (levels if levels is not None else range(2))]


def _structured_volume(seed: int = 0, shape=(24, 28, 20)) -> Volume:
    """A head with a bright core (label 2) in a darker shell (label 1), randomly shifted and scaled."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-0.1, 0.1, 3)
    scale = rng.uniform(0.9, 1.1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((((grid - centre[:, None, None, None]) / scale) ** 2).sum(0))
    seg = np.where(r < 0.45, 2, np.where(r < 0.8, 1, 0)).astype(np.int32)
    data = np.where(r < 0.8, 0.4 + 0.4 * (r < 0.45), 0.0) + rng.normal(0, 0.03, shape)
    data = np.clip(data, 0, 1).astype(np.float32)[None]
    return Volume(f"s{seed}", data, np.diag([4.0, 4.0, 4.0, 1.0]), r < 0.9, seg)


def test_sample_features_equals_bilinear_upsampling():
    vol = _structured_volume()
    ds = extract_dense(MapEncoder(), vol, "axial", 40, [0, 1])
    rows = np.array([3, 10])
    rng = np.random.default_rng(0)
    pixels = [rng.choice(40 * 40, 25, replace=False), rng.choice(40 * 40, 7, replace=False)]
    got = sample_features(ds, rows, pixels)
    full = upsample_levels(ds, rows)                                   # (2, D, 40, 40), F.interpolate
    want = np.concatenate([full[r].reshape(full.shape[1], -1)[:, p].T.numpy() for r, p in enumerate(pixels)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert np.abs(got[:, 1:]).max() < 1e-5  # the 1e-7-scaled level survives float16 storage
    assert np.abs(got[:, 1:]).max() > 1e-9


def test_dense_slices_round_trip(tmp_path):
    ds = extract_dense(MapEncoder(), _structured_volume(), "coronal", 36, ["last:2"])
    assert ds.box == (0, 0, 36, 36) and len(ds) == 28 and ds.n_slices == 28
    back = DenseSlices.load(ds.save(tmp_path / "x.npz"))
    for a, b in zip(ds.maps + ds.scales, back.maps + back.scales):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ds.labels, back.labels)
    np.testing.assert_array_equal(ds.mask, back.mask)
    assert back.levels == ds.levels and back.box == ds.box and back.spacing == (4.0, 4.0, 4.0)
    torch.testing.assert_close(back.level(1), ds.level(1))


def test_token_box_of_a_centre_crop_is_used():
    enc = MapEncoder(resize="shorter")  # resize_size = 1.25 x input: the encoder sees the central 80%
    assert token_box(enc.info, 40) == (4, 4, 32, 32)
    ds = extract_dense(enc, _structured_volume(), "axial", 40, [0])
    assert ds.box == (4, 4, 32, 32)


def test_probe_logits_equal_a_1x1_conv_on_upsampled_concatenated_features():
    vol = _structured_volume()
    ds = extract_dense(MapEncoder(), vol, "axial", 40, [0, 1])
    rng = np.random.default_rng(1)
    classes = class_slices(ds, label_lut({"shell": [1], "core": [2]}))
    X, y, w = sample_training_pixels(ds, classes, np.arange(len(ds)), 30, rng)
    probe = LinearSegProbe(2, max_iter=50).fit(X, y, w)
    maps = probe.predict_maps(ds, np.array([5, 9]))                  # per-level conv, then upsample
    full = upsample_levels(ds, np.array([5, 9]))                      # upsample, then conv
    ref = torch.einsum("sdhw,dk->skhw", full, probe.weight_) + probe.bias_.view(1, -1, 1, 1)
    torch.testing.assert_close(maps, ref, rtol=1e-4, atol=1e-4)


def test_stratified_sample_weights_restore_pixel_counts():
    ds = extract_dense(MapEncoder(), _structured_volume(), "axial", 40, [0])
    classes = class_slices(ds, label_lut({"shell": [1], "core": [2]}))
    rows = np.arange(len(ds))
    _, y, w = sample_training_pixels(ds, classes, rows, 20, np.random.default_rng(0))
    for c in range(3):
        assert w[y == c].sum() == pytest.approx((classes[rows] == c).sum())
    assert (np.bincount(y) <= 20 * len(rows)).all()


def test_probe_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5))
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(0, 0.5, 600) > 0).astype(int) + (X[:, 2] > 1)
    X = (X - X.mean(0)) / X.std(0, ddof=1)  # the probe standardises (unbiased std): make that a no-op
    l2 = 1e-3
    probe = LinearSegProbe(2, l2=l2, max_iter=500, balance="none").fit(X, y)
    ref = LogisticRegression(C=1 / (2 * l2 * len(y)), tol=1e-10, max_iter=5000).fit(X, y)
    ours = torch.as_tensor(probe.pixel_logits(X)).softmax(1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(X), atol=2e-3)


def test_segmentation_scores_against_hand_computed_values():
    truth = np.zeros((10, 10, 10), int)
    truth[2:6, 2:6, 2:6] = 1                       # a 4-voxel cube
    pred = np.zeros_like(truth)
    pred[2:6, 2:6, 3:7] = 1                        # shifted by one voxel along z
    truth[8, 8, 8] = 2
    dice, hd = segmentation_scores(pred, truth, 3, (1.0, 1.0, 2.0))
    assert dice[0] == pytest.approx(2 * 48 / 128)
    assert hd[0] == pytest.approx(2.0)             # one voxel along z is 2 mm
    assert dice[1] == 0 and hd[1] == np.inf        # present, not predicted
    assert np.isnan(dice[2]) and np.isnan(hd[2])   # absent from the truth


def _fit_and_score(vols, lut, n_classes, shuffle: bool = False, per_class: int = 40):
    enc = IntensityFeatures(patch=3, stride=1, coords=True)
    dss = [extract_dense(enc, v, "axial", 32, [0, 1]) for v in vols]
    rng = np.random.default_rng(0)
    X, y, w = zip(*[sample_training_pixels(ds, class_slices(ds, lut), np.arange(len(ds)), per_class, rng)
                    for ds in dss[:-2]])
    y = np.concatenate(y)
    if shuffle:
        y = rng.permutation(y)
    probe = LinearSegProbe(n_classes).fit(np.concatenate(X), y, np.concatenate(w))
    dice = [segmentation_scores(predict_volume(probe, ds, v.shape), np.asarray(lut)[v.seg], n_classes,
                                v.spacing)[0] for ds, v in zip(dss[-2:], vols[-2:])]
    return np.nanmean(dice, 0)


def test_probe_on_intensities_segments_a_bright_core_and_not_with_shuffled_labels():
    vols = [_structured_volume(seed) for seed in range(6)]
    lut = label_lut({"shell": [1], "core": [2]})
    good = _fit_and_score(vols, lut, 2)
    assert good.min() > 0.8, good
    chance = _fit_and_score(vols, lut, 2, shuffle=True)
    assert chance.max() < 0.6, chance


def test_extracting_some_rows_equals_the_same_rows_of_every_slice():
    vol = _structured_volume(2)
    full = extract_dense(MapEncoder(), vol, "axial", 40, [0, 1])
    rows = np.array([0, 7, 8, 19])
    part = extract_dense(MapEncoder(), vol, "axial", 40, [0, 1], rows=rows)
    np.testing.assert_array_equal(part.indices, rows)
    np.testing.assert_array_equal(part.labels, full.labels[rows])
    np.testing.assert_array_equal(part.mask, full.mask[rows])
    for j in range(2):
        torch.testing.assert_close(part.level(j), full.level(j, rows), rtol=2e-3, atol=1e-12)


def test_channels_last_encoder_gives_the_same_maps():
    """The probes run CNNs with channels-last weights for speed; the maps must not change."""
    import torch

    from slice2vol.eval.dense_bench import DenseFeatureConfig, ProbeSet

    pset = ProbeSet("mnv2", "twin", key="tv/mobilenet_v2", weights="random")
    images = torch.rand(3, 1, 48, 48)
    maps = {}
    for cl in (False, True):
        enc = pset.build(DenseFeatureConfig(img_size=64, channels_last=cl), seed=0)
        assert next(p for p in enc.parameters() if p.dim() == 4).is_contiguous(
            memory_format=torch.channels_last) == cl
        maps[cl] = enc.feature_maps(images, levels=[1, 3])
    for a, b in zip(maps[False], maps[True]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_segmentation_labels_above_int16_keep_their_values():
    """Fuzz round 15: DLMUSE-style label values above 32767 wrapped in int16 (70051 became 4515, i.e.
    background), and every Dice of such a structure was 0 without a word."""
    import dataclasses

    vol = _structured_volume()
    big = dataclasses.replace(vol, seg=np.where(vol.seg > 0, vol.seg + 70000, 0).astype(np.int32))
    ds = extract_dense(MapEncoder(), big, "axial", 40, [0])
    plain = extract_dense(MapEncoder(), vol, "axial", 40, [0])
    assert set(np.unique(ds.labels)) == {0, 70001, 70002}
    np.testing.assert_array_equal(ds.labels, np.where(plain.labels > 0, plain.labels + 70000, 0))
