"""The synthetic default cohort: varied subjects, truthful lesion masks, determinism, real signal."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from slice2vol.data import load_manifest, load_subject
from slice2vol.data.synthetic import make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return load_manifest(make_cohort(out, n_subjects=6, seed=3, progress=False))


def test_manifest_columns_and_label_types(cohort):
    assert len(cohort) == 6 and not cohort.failures
    assert cohort.label_types == {"lesion": "categorical", "atrophy": "continuous", "site": "categorical"}
    subject = cohort.subjects[0]
    assert set(subject.images) == {"t1"} and subject.seg is not None and set(subject.maps) == {"lesion_mask"}


def test_lesion_masks_non_empty_exactly_for_positive_class(cohort):
    for subject in cohort.subjects:
        volume = load_subject(subject)
        has_lesion = bool(volume.maps["lesion_mask"].any())
        assert has_lesion == bool(subject.labels["lesion"]), subject.subject_id
        if has_lesion:
            # lesions sit inside the brain
            assert (volume.seg[volume.maps["lesion_mask"] > 0] > 0).mean() > 0.9


def test_subjects_differ_in_shape_and_contrast(cohort):
    volumes = [load_subject(s) for s in cohort.subjects]
    brains = [v.seg > 0 for v in volumes]
    # deformation: brain masks overlap imperfectly
    dice = [2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in zip(brains, brains[1:])]
    assert max(dice) < 0.99
    # contrast: white-matter to grey-matter intensity ratio varies across subjects
    ratios = [v.data[0][v.seg == 3].mean() / v.data[0][v.seg == 2].mean() for v in volumes]
    assert np.std(ratios) > 0.01
    assert all(r > 1.05 for r in ratios)  # still T1-like: WM brighter than GM


def test_atrophy_enlarges_ventricles(cohort):
    atrophy = np.array([s.labels["atrophy"] for s in cohort.subjects])
    ventricle_volume = np.array([(load_subject(s).seg == 4).sum() for s in cohort.subjects])
    assert np.corrcoef(atrophy, ventricle_volume)[0, 1] > 0.8


def test_same_seed_same_cohort(tmp_path, cohort):
    again = load_manifest(make_cohort(tmp_path, n_subjects=2, seed=3, progress=False))
    for a, b in zip(cohort.subjects[:2], again.subjects):
        assert a.labels == b.labels
        digest = [hashlib.sha256(load_subject(s).data.tobytes()).hexdigest() for s in (a, b)]
        assert digest[0] == digest[1]
    other = load_manifest(make_cohort(tmp_path / "other", n_subjects=1, seed=4, progress=False))
    assert not np.array_equal(load_subject(other.subjects[0]).data, load_subject(cohort.subjects[0]).data)


def test_coarse_spacing_keeps_small_lesions(tmp_path):
    cohort = load_manifest(make_cohort(tmp_path, n_subjects=4, seed=1, spacing=4.0, progress=False))
    for subject in cohort.subjects:
        volume = load_subject(subject)
        assert volume.spacing == pytest.approx((4.0, 4.0, 4.0), abs=0.1)
        assert bool(volume.maps["lesion_mask"].any()) == bool(subject.labels["lesion"])


def test_generator_knobs_from_an_experiment_config(tmp_path):
    """``cohort.synthetic`` mappings pass SynthConfig fields through make_cohort; typos are refused."""
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lesion_size'\]"):
        make_cohort(tmp_path, n_subjects=2, lesion_size=3)
    manifest = make_cohort(tmp_path, n_subjects=2, seed=3, progress=False, lesion_radius_mm=[9, 12], noise=0.01)
    readme = (manifest.parent / "README.md").read_text()
    assert "'lesion_radius_mm': (9.0, 12.0)" in readme and "'noise': 0.01" in readme


@pytest.mark.parametrize("knobs, message", [
    ({"n_subjects": 0}, "n_subjects must be a whole number >= 1, got 0"),
    ({"spacing": 0.0}, "spacing must be a finite number in [0.5, 16], got 0.0"),
    ({"noise": -0.1}, "noise must be a finite number >= 0, got -0.1"),
    ({"lesion_radius_mm": [12, 4]}, "lesion_radius_mm must be [low, high] with low <= high, got [12.0, 4.0]"),
])
def test_a_generator_setting_no_cohort_can_use_is_refused_in_words_before_any_file(tmp_path, knobs, message):
    """n_subjects 0 or spacing 0 ended in a numpy traceback halfway through the build."""
    with pytest.raises(ValueError) as info:
        make_cohort(tmp_path / "c", progress=False, **{"n_subjects": 2, **knobs})
    assert str(info.value) == f"synthetic cohort: {message}"
    assert not (tmp_path / "c").exists()
