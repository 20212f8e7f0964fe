"""Lesion simulation, the PatchCore-style scorer and the anomaly metrics, against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from slice2vol.data.io import Volume
from slice2vol.eval.anomaly import (BinnedAUROC, PatchMemoryBank, PatchScorerConfig, SubjectPatches, cells_to_volume,
                                    greedy_coreset, lesion_detection, paired_rank_fraction, subject_score, voxel_auroc)
from slice2vol.eval.dense import IntensityFeatures, extract_dense
from slice2vol.eval.lesions import (LesionConfig, SweepConfig, central_slice, changed_slices, simulate_lesions,
                                    sweep_settings)


def _head(seed: int = 0, shape=(28, 32, 24)) -> Volume:
    """A textured 'brain' (label 1, random smooth intensities) inside a head, 4 mm voxels."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    texture = gaussian_filter(rng.normal(size=shape), 1.5)
    texture = 0.45 + 0.1 * texture / texture.std()
    data = np.where(r < 0.75, texture, np.where(r < 0.9, 0.2, 0.0)).astype(np.float32)
    seg = (r < 0.75).astype(np.int32)
    return Volume(f"h{seed}", np.clip(data, 0, 1)[None], np.diag([4.0, 4.0, 4.0, 1.0]), r < 0.9, seg)


def test_lesions_inside_brain_seeded_and_of_the_asked_size():
    vol = _head()
    before = vol.data.copy()
    cfg = LesionConfig(n_lesions=(1, 1), radius_mm=(12.0, 12.0), contrast=(0.5, 0.5), sign="hypo")
    sick, lesion = simulate_lesions(vol, np.random.default_rng(3), cfg)
    assert lesion.any() and not (lesion & (vol.seg == 0)).any()
    changed = np.abs(sick.data - vol.data)[0] > 0
    assert not (changed & (vol.seg == 0)).any()
    assert (sick.data[0][lesion] < vol.data[0][lesion]).all()          # hypointense
    ratio = sick.data[0][lesion] / vol.data[0][lesion]
    assert ratio.min() == pytest.approx(0.5, abs=0.02)               # |contrast| 0.5 at the core
    assert np.median(ratio) < 0.7                                    # soft edge: less at the rim
    # a 12 mm sphere of 4 mm voxels: (4/3) pi 3^3 = 113 voxels, fewer where it leaves the brain
    assert 40 <= lesion.sum() <= 140
    again, lesion2 = simulate_lesions(vol, np.random.default_rng(3), cfg)
    np.testing.assert_array_equal(again.data, sick.data)
    np.testing.assert_array_equal(vol.data, before)                  # input untouched
    assert "sim_lesion" not in vol.maps and sick.maps["sim_lesion"].sum() == lesion.sum()
    rows = changed_slices(vol.data, sick.data, 2)
    assert central_slice(lesion, 2) in rows and len(rows) <= 9


def test_sweep_settings_and_config_errors():
    names = [n for n, _ in sweep_settings(SweepConfig(contrasts=[0.1, 0.4], radii_mm=[3, 8]))]
    assert names == ["c0.10-r3mm", "c0.10-r8mm", "c0.40-r3mm", "c0.40-r8mm"]
    with pytest.raises(ValueError, match="sign"):
        LesionConfig(sign="dark")
    with pytest.raises(ValueError, match="radius_mm"):
        LesionConfig(radius_mm=(5.0, 2.0))


def test_greedy_coreset_covers_every_cluster():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 20, (6, 8))
    x = np.concatenate([c + rng.normal(0, 0.1, (50, 8)) for c in centres])
    idx = greedy_coreset(x, 6, proj_dim=0, seed=1)
    assert sorted(set(i // 50 for i in idx)) == list(range(6))       # one point per cluster
    # covering radius: k-centre greedy is far better than a random subset of the same size
    def radius(sub):
        return np.sqrt(((x[:, None] - x[sub][None]) ** 2).sum(-1)).min(1).max()
    assert radius(idx) < 1.0 < radius(rng.choice(len(x), 6, replace=False))


def test_memory_bank_distances_match_brute_force():
    rng = np.random.default_rng(1)
    parts = []
    for _ in range(3):
        x = rng.normal(size=(40, 5)) * [1, 10, 100, 0.1, 1]
        pos = rng.uniform(0, 50, (40, 3))
        parts.append(SubjectPatches(x[:15].astype(np.float32), pos[:15].astype(np.float32), 40, x.sum(0),
                                    (x ** 2).sum(0)))
        parts[-1].all_x = x
    cfg = PatchScorerConfig(k=2, position_weight=0.3)
    bank = PatchMemoryBank(cfg).fit(parts)
    every = np.concatenate([p.all_x for p in parts])
    np.testing.assert_allclose(bank.mean_, every.mean(0))
    np.testing.assert_allclose(bank.std_, every.std(0))
    query, qpos = rng.normal(size=(7, 5)), rng.uniform(0, 50, (7, 3))
    ref_bank = np.concatenate([np.concatenate([(p.features - every.mean(0)) / every.std(0), 0.3 * p.positions], 1)
                               for p in parts])
    q = np.concatenate([(query - every.mean(0)) / every.std(0), 0.3 * qpos], 1)
    d = np.sqrt(((q[:, None] - ref_bank[None]) ** 2).sum(-1))
    np.testing.assert_allclose(bank.score(query, qpos), np.sort(d, 1)[:, :2].mean(1), rtol=1e-4)


def test_bank_size_keeps_a_k_centre_subset_of_the_union():
    rng = np.random.default_rng(2)
    parts = []
    for _ in range(4):
        x = rng.normal(size=(60, 6))
        parts.append(SubjectPatches(x.astype(np.float32), rng.uniform(0, 50, (60, 3)).astype(np.float32), 60,
                                    x.sum(0), (x ** 2).sum(0)))
    full = PatchMemoryBank(PatchScorerConfig(position_weight=0.3)).fit(parts)
    capped = PatchMemoryBank(PatchScorerConfig(position_weight=0.3, bank_size=50)).fit(parts)
    same = PatchMemoryBank(PatchScorerConfig(position_weight=0.3, bank_size=240)).fit(parts)
    assert (full.index_.ntotal, capped.index_.ntotal, same.index_.ntotal) == (240, 50, 240)
    union = np.concatenate([p.features for p in parts])
    pos = np.concatenate([p.positions for p in parts])
    # the kept patches are bank members (distance 0); every other one is farther from the capped bank
    kept = capped.index_.reconstruct_n(0, 50)
    emb = full._embed(union, pos)
    d_kept = np.sqrt(((emb[:, None] - kept[None]) ** 2).sum(-1)).min(1)
    assert (d_kept < 1e-4).sum() == 50
    np.testing.assert_allclose(capped.score(union, pos), d_kept, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(same.score(union, pos), 0, atol=1e-3)
    assert capped.score(union, pos).max() > 0.5


def test_binned_auroc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    truth = rng.random(5000) < 0.1
    scores = rng.normal(size=5000) + truth * 1.0
    binned = BinnedAUROC.from_samples(scores, 2000)
    est = BinnedAUROC.auroc(binned.histogram(scores[truth]), binned.histogram(scores[~truth]))
    assert est == pytest.approx(roc_auc_score(truth, scores), abs=2e-3)
    assert voxel_auroc(scores.reshape(50, 100), truth.reshape(50, 100), np.ones((50, 100), bool)) == pytest.approx(
        roc_auc_score(truth, scores))
    ties = np.repeat([0.0, 1.0, 2.0], 10)
    t = np.tile([True, False], 15)
    b = BinnedAUROC(np.array([0.0, 1.0, 2.0]))
    assert BinnedAUROC.auroc(b.histogram(ties[t]), b.histogram(ties[~t])) == pytest.approx(roc_auc_score(t, ties))


def test_detection_subject_score_and_paired_fraction():
    lesion = np.zeros((10, 10, 10), bool)
    lesion[1:3, 1:3, 1:3] = True
    lesion[6:8, 6:8, 6:8] = True
    scores = np.zeros(lesion.shape)
    scores[2, 2, 2] = 5.0                              # only the first lesion reaches the threshold
    scores[7, 7, 7] = 0.5
    assert lesion_detection(scores, lesion, 1.0) == (1, 2)
    assert lesion_detection(scores, np.zeros_like(lesion), 1.0) == (0, 0)
    # a peak equal to the threshold is not a detection: a constant map (collapsed encoder) detects nothing
    assert lesion_detection(scores, lesion, 0.5) == (1, 2)
    assert lesion_detection(np.full(lesion.shape, 0.3), lesion, 0.3) == (0, 2)
    brain = np.ones_like(lesion)
    assert subject_score(scores, brain, "max") == 5.0
    assert subject_score(scores, brain, "top:2") == pytest.approx(2.75)
    est, lo, hi = paired_rank_fraction(np.array([1.0, 2, 3, 4]), np.array([2.0, 2, 1, 5]))
    assert est == pytest.approx((1 + 0.5 + 0 + 1) / 4) and lo <= est <= hi


def test_cell_scores_land_on_the_right_voxels():
    vol = _head()
    ds = extract_dense(IntensityFeatures(patch=1, stride=4, coords=False), vol, "axial", 32, [0])
    cells = np.zeros((len(ds), 8, 8), np.float32)
    cells[10, :, :4] = 1.0                                 # left half of the image of slice 10
    vox = cells_to_volume(cells, ds, vol.shape)
    assert vox[:, :, 10].sum() > 0 and vox[:, :, :10].sum() == 0 and vox[:, :, 11:].sum() == 0
    # display column = RAS x (patient left at the left): the left half holds the low x indices
    assert vox[: vol.shape[0] // 2 - 2, :, 10].min() > 0.99 and vox[vol.shape[0] // 2 + 2:, :, 10].max() < 0.01


def test_brain_frame_positions_line_up_shifted_heads():
    from slice2vol.eval.anomaly import cell_positions

    vol = _head()
    shifted = Volume("s", np.roll(vol.data, 3, axis=1), vol.affine, np.roll(vol.mask, 3, axis=0),
                     np.roll(vol.seg, 3, axis=0))
    enc = IntensityFeatures(patch=1, stride=1, coords=False)
    a = extract_dense(enc, vol, "axial", 32, [0])
    b = extract_dense(enc, shifted, "axial", 32, [0])
    za, ra, ca = np.asarray(a.brain_box).reshape(3, 2).T[0]
    zb, rb, cb = np.asarray(b.brain_box).reshape(3, 2).T[0]
    assert (zb, rb) == (za, ra) and cb == pytest.approx(ca + 3 * 4.0)   # x is the display column
    mm_a, mm_b = cell_positions(a, (32, 32)), cell_positions(b, (32, 32))
    np.testing.assert_allclose(mm_a, mm_b)                                # same grid in mm ...
    pa, pb = cell_positions(a, (32, 32), frame="brain"), cell_positions(b, (32, 32), frame="brain")
    # ... but in the brain frame a column of ``a`` matches the column 3 voxels (4 mm each) further in ``b``
    col_mm = mm_a[0, 0, :, 2]
    shift = np.searchsorted(col_mm, col_mm[10] + 12.0)
    assert pb[0, 0, shift, 2] == pytest.approx(pa[0, 0, 10, 2], abs=100 * 1.0 / (b.brain_box[5] - b.brain_box[4]) * 4)
    with pytest.raises(ValueError, match="frame"):
        cell_positions(a, (32, 32), frame="voxels")
