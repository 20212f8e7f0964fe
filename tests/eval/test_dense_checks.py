"""The dense probes refuse settings that used to fail only after every set's features were extracted,
or that gave rows nobody should read: a structure no subject has, lesions smaller than a voxel or
larger than the brain, a primary variant that is not a variant (fuzz round 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slice2vol.config import from_dict
from slice2vol.data.io import Volume
from slice2vol.eval.anomaly import AnomalyConfig, PatchScorerConfig
from slice2vol.eval.dense_bench import SegProbeSettings
from slice2vol.eval.lesions import LesionConfig, simulate_lesions
from slice2vol.eval.segmentation import SegConfig
from slice2vol.eval.tasks.segmentation import absent_structures


@pytest.mark.parametrize("cls, data, message", [
    (SegConfig, {"structures": {}}, r"^segmentation.structures must name at least one structure"),
    (SegConfig, {"structures": {"neg": [-1]}}, r"^segmentation.structures.neg must be a non-empty list of label "
                                               r"values \(whole numbers >= 0\), got \[-1\]"),
    (SegConfig, {"structures": {"gm": []}}, r"^segmentation.structures.gm must be a non-empty list"),
    (SegConfig, {"n_folds": 1}, r"^segmentation.n_folds must be a whole number >= 2, got 1"),
    (SegProbeSettings, {"variants": {"linear": ["last"]}},
     r"^segmentation.probe.primary_variant 'multilayer' is not one of the variants \['linear'\]"),
    (SegProbeSettings, {"variants": {}}, r"^segmentation.probe.variants must name at least one variant"),
    (SegProbeSettings, {"per_class": 0}, r"^segmentation.probe.per_class must be a whole number >= 1, got 0"),
    (SegProbeSettings, {"hd95": "some"}, r"^segmentation.probe.hd95 must be primary, all or none, got 'some'"),
    (PatchScorerConfig, {"per_subject": 0}, r"^anomaly.scorer.per_subject must be a whole number >= 1, got 0"),
    (PatchScorerConfig, {"k": 0}, r"^anomaly.scorer.k must be a whole number >= 1, got 0"),
    (PatchScorerConfig, {"subject_score": "top:0"}, r"^anomaly.scorer.subject_score must be 'max' or 'top:N'"),
    (PatchScorerConfig, {"position_weight": float("nan")}, r"^anomaly.scorer.position_weight must be a finite"),
    (AnomalyConfig, {"fpr": 1.0}, r"^anomaly.fpr must be a finite number in \(0, 1\), got 1.0"),
    (AnomalyConfig, {"variants": {}}, r"^anomaly.variants must name at least one variant"),
    (AnomalyConfig, {"lesions": {"contrast": [0.0, 0.0]}}, r"^anomaly.lesions.contrast must reach above 0"),
])
def test_bad_dense_settings_are_refused_when_the_config_is_read(cls, data, message):
    with pytest.raises(ValueError, match=message) as err:
        from_dict(cls, data)
    assert "\n" not in str(err.value)


def test_the_shipped_defaults_and_a_linear_only_probe_are_accepted():
    assert from_dict(SegProbeSettings, {"variants": {"linear": ["last"]}, "primary_variant": "linear"})
    assert SegConfig() and AnomalyConfig() and PatchScorerConfig(subject_score="top:10")


def test_a_structure_absent_from_every_truth_is_found():
    dice = np.array([[0.8, np.nan, 0.5], [0.7, np.nan, np.nan]])
    results = {"a": {"linear": {"dice": dice}}, "b": {"linear": {"dice": dice * 0.5}}}
    assert absent_structures(results, ["gm", "absent", "wm"], "linear") == [1]


def _ball(shape=(20, 24, 16), spacing=2.0):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    data = np.where(r < 0.85, 0.6, 0.0).astype(np.float32)[None]
    return Volume("ball", data, np.diag([spacing] * 3 + [1.0]), r < 0.9, None)


@pytest.mark.parametrize("radius, message", [
    ((0.05, 0.1), r"^ball: the simulated lesions \(radius_mm \[0.05, 0.1\]\) cover no voxel of this 2x2x2 mm grid"),
    ((300.0, 400.0), r"^ball: the simulated lesions \(radius_mm \[300.0, 400.0\]\) cover the whole brain"),
])
def test_lesions_that_cover_no_voxel_or_the_whole_brain_are_named(radius, message):
    cfg = LesionConfig(n_lesions=(1, 1), radius_mm=radius, contrast=(0.5, 0.5), erode=0)
    with pytest.raises(ValueError, match=message):
        simulate_lesions(_ball(), np.random.default_rng(0), cfg)


@pytest.mark.parametrize("seed", range(4))
def test_a_lesion_one_voxel_across_is_its_strongest_voxel(seed):
    """The demo's sweep (radius 4 mm on a ~4 mm grid): the blur left every voxel below half contrast,
    so the draw raised 'cover no voxel' and the whole anomaly task of a set was skipped."""
    cfg = LesionConfig(n_lesions=(1, 1), radius_mm=(4.0, 4.0), contrast=(0.5, 0.5), sign="hypo", erode=0)
    volume = _ball(spacing=4.05)  # the 4 mm sphere holds its centre voxel, not the neighbours
    sick, lesion = simulate_lesions(volume, np.random.default_rng(seed), cfg)
    change = volume.data[0] - sick.data[0]
    assert lesion.sum() >= 1 and change[lesion].min() == change.max() > 0  # the most changed voxel(s)


def test_an_hd95_row_with_missed_structures_keeps_a_bounded_lower_end_and_no_nan_upper_end(recwarn):
    """HD95 is inf where a prediction missed the structure; the interval used to interpolate inf - inf
    (NaN) and print numpy warnings. The nearest order statistics outward give (finite, inf)."""
    from slice2vol.eval.dense_tasks import _row

    v = np.array([3.0, 4.0, np.inf, np.inf, 5.0, np.inf, 2.0, np.inf])
    fold_of = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    row = _row("segmentation", "gm", "enc", "linear", "hd95_mm", v, fold_of, 2, 200, 0, stat="median")
    assert row["estimate"] == np.inf and row["ci_high"] == np.inf
    assert np.isfinite(row["ci_low"]) and 2.0 <= row["ci_low"] <= 5.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    # finite values keep numpy's default (linear) percentile interval
    finite = np.array([3.0, 4.0, 6.0, 7.0, 5.0, 1.0, 2.0, 8.0])
    rng = np.random.default_rng(0)
    boots = [finite[rng.integers(0, 8, 8)].mean() for _ in range(200)]
    row = _row("segmentation", "gm", "enc", "linear", "dice", finite, fold_of, 2, 200, 0)
    assert (row["ci_low"], row["ci_high"]) == (np.quantile(boots, 0.025), np.quantile(boots, 0.975))


def test_every_lesion_setting_of_the_demo_draws_lesions_on_the_demo_grid(tmp_path):
    """The demo's difficulty sweep (4 mm radius) on its own ~4 mm synthetic grid failed every draw,
    which skipped the anomaly task of every set while `make demo` exited 0."""
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.synthetic import make_cohort
    from slice2vol.eval.experiment import load_experiment
    from slice2vol.eval.lesions import LesionSampler, sweep_settings

    cfg, _ = load_experiment(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "demo.yaml")
    synthetic = dict(cfg.cohort.synthetic or {})
    synthetic.update(n_subjects=1)
    volume = next(load_manifest(make_cohort(tmp_path, progress=False, **synthetic)).iter_volumes())
    sampler = LesionSampler(volume)
    settings = [("main", cfg.anomaly.lesions)] + sweep_settings(cfg.anomaly.sweep)
    for name, lcfg in settings:
        for seed in range(3):
            _, lesion = sampler.draw(np.random.default_rng([seed, 7]), lcfg)
            assert lesion.any(), (name, seed)
