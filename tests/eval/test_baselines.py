"""Computed baselines (head/brain volume, pooled intensities), chance, and brought-in features."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from slice2vol.data.io import VolumeConfig
from slice2vol.data.manifest import load_manifest
from slice2vol.eval.baselines import chance_set, compute_baselines, read_features
from slice2vol.eval.experiment import BaselineConfig, FeaturesEntry
from slice2vol.eval.resultcache import ResultCache
from tests.eval.test_runner import blob_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    return load_manifest(blob_cohort(root, n=6)), root


def test_brain_and_head_volume_and_intensities(cohort, tmp_path):
    cohort, root = cohort
    cache = ResultCache(tmp_path / "cache")
    cfg = BaselineConfig(sets=["head_volume", "brain_volume", "intensities"], intensity_grid=2)
    sets, skipped = compute_baselines(cfg.sets, cohort, VolumeConfig(), cfg, cache, progress=False)
    assert not skipped and set(sets) == {"head_volume", "brain_volume", "intensities"}
    for i, subject in enumerate(cohort.subjects):
        seg = nib.load(str(subject.seg))
        voxel_ml = float(np.prod(seg.header.get_zooms()[:3])) / 1000
        # independent reference: the segmentation read with nibabel, voxels > 0
        assert sets["brain_volume"].X[i, 0] == pytest.approx((np.asarray(seg.dataobj) > 0).sum() * voxel_ml)
        assert sets["head_volume"].X[i, 0] > sets["brain_volume"].X[i, 0] * 0.5
    assert sets["intensities"].X.shape == (6, 8)
    assert np.all(sets["head_volume"].X <= 24 * 28 * 20 / 1000)  # never more than the whole 1 mm grid
    # cached by content: a second call reads the cache (same numbers, no volume loaded)
    again, _ = compute_baselines(cfg.sets, cohort, VolumeConfig(), cfg, cache, progress=False)
    np.testing.assert_array_equal(again["intensities"].X, sets["intensities"].X)


def test_brain_volume_without_segmentation_is_skipped_with_a_reason(cohort, tmp_path):
    cohort, _ = cohort
    no_seg = cohort.subset(cohort.ids)
    for s in no_seg.subjects:
        s.seg = None
    sets, skipped = compute_baselines(["brain_volume", "head_volume"], no_seg, VolumeConfig(), BaselineConfig(),
                                      None, progress=False)
    assert set(sets) == {"head_volume"}
    assert skipped == [{"name": "brain_volume", "reason": "the manifest has no seg column to measure the brain",
                        "substitute": "head_volume"}]
    with pytest.raises(ValueError, match="unknown baseline"):
        compute_baselines(["skull_volume"], no_seg, VolumeConfig(), BaselineConfig(), None, progress=False)


def test_baselines_of_a_cohort_whose_every_subject_fails_are_skipped_with_the_failures(cohort, tmp_path):
    """Fuzz round 6: "cannot reshape array of size 0 into shape (0,newaxis)" ended the run."""
    cohort, _ = cohort
    broken = cohort.subset(cohort.ids[:2])
    for s in broken.subjects:
        bad = tmp_path / f"{s.subject_id}.nii.gz"
        bad.write_bytes(b"not a volume")
        s.images = {name: bad for name in s.images}
    failures: list[str] = []
    cfg = BaselineConfig(sets=["head_volume", "brain_volume", "intensities"], intensity_grid=2)
    sets, skipped = compute_baselines(cfg.sets, broken, VolumeConfig(), cfg, None, progress=False,
                                      failures=failures)
    assert sets == {}
    # (the module's cohort may have lost its seg column to the test above: brain_volume is then skipped for that)
    assert {e["name"] for e in skipped} == set(cfg.sets)
    assert {e["name"] for e in skipped if e["reason"] == "no subject could be loaded"} >= {"head_volume", "intensities"}
    assert len(failures) == 2 and all(f"{s}.nii.gz" in f for s, f in zip(broken.ids, failures))


def test_chance_set_is_marked():
    es = chance_set(["a", "b"])
    assert es.kind == "chance" and es.ids == ["a", "b"]


def test_features_from_csv_and_npz(tmp_path):
    ids = [f"s{i:02d}" for i in range(5)]
    table = pd.DataFrame({"MRID": ids[::-1] + ["other"], "702": [1.0, 2, 3, 4, 5, 6], "4": [10.0, 20, 30, 40, 50, 60],
                          "site": ["a"] * 6})
    path = tmp_path / "regions.csv"
    table.to_csv(path, index=False)
    es = read_features(FeaturesEntry("dlmuse", str(path), id_column="MRID", exclude=["site"]), path, ids)
    assert es.ids == ids[::-1] and es.X.shape == (5, 2) and es.kind == "features"
    np.testing.assert_array_equal(es.rows(["s04"]), [[1.0, 10.0]])
    assert es.provenance["source_sha256"] and es.provenance["n_columns"] == 2
    logged = read_features(FeaturesEntry("l", str(path), id_column="MRID", columns=["702"], log=True), path, ids)
    np.testing.assert_allclose(logged.X[:, 0], np.log1p([1, 2, 3, 4, 5]), rtol=1e-6)
    npz = tmp_path / "f.npz"
    np.savez(npz, ids=np.array(ids), X=np.arange(15.0).reshape(5, 3))
    es = read_features(FeaturesEntry("n", str(npz)), npz, ids)
    assert es.X.shape == (5, 3) and es.ids == ids


def test_bad_feature_npz_files_get_one_line_errors(tmp_path):
    ids = np.array(["s00", "s01", "s02"])
    cases = {
        "flat": ({"ids": ids, "X": np.arange(3.0)}, r"'X' has shape \(3,\); expected \(subjects, features\)"),
        "object_ids": ({"ids": ids.astype(object), "X": np.eye(3)}, r"cannot read the features .npz .*save ids as text"),
        "constant": ({"ids": ids, "X": np.ones((3, 4))}, r"every subject has the same features \(features entry 'x'\)"),
    }
    for name, (arrays, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=match) as err:
            read_features(FeaturesEntry("x", str(path)), path, list(ids))
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value), name
    path = tmp_path / "text.npz"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match=r"text.npz: cannot read the features .npz"):
        read_features(FeaturesEntry("x", str(path)), path, list(ids))


def test_feature_rows_with_missing_values_are_left_out_and_named():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.npz"
        X = np.arange(12.0).reshape(3, 4)
        X[1, 2] = np.nan
        np.savez(path, ids=np.array(["s00", "s01", "s02"]), X=X)
        es = read_features(FeaturesEntry("x", str(path)), path, ["s00", "s01", "s02"])
    assert es.ids == ["s00", "s02"] and es.provenance["left_out_missing_values"] == ["s01"]


@pytest.mark.parametrize("content,entry,match", [
    ("ID,a\ns00,1\n", {"id_column": "MRID"}, "no ID column 'MRID'"),
    ("MRID,a\ns00,x\ns01,2\n", {"id_column": "MRID"}, "non-numeric values in column"),
    ("MRID,a\nzz,1\n", {"id_column": "MRID"}, "none of its 1 IDs"),
    ("MRID,a\ns00,1\ns00,2\n", {"id_column": "MRID"}, "repeat"),
])
def test_bad_feature_files_get_one_line_errors(tmp_path, content, entry, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_features(FeaturesEntry("x", str(path), **entry), path, ["s00", "s01"])
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    missing = tmp_path / "none.csv"
    with pytest.raises(ValueError, match="not found"):
        read_features(FeaturesEntry("x", str(missing)), missing, ["s00"])
