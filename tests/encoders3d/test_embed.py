"""``embed_cohort3d``: one vector per subject in the feature store, provenance, failures, resumption."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slice2vol.cache import FeatureStore
from slice2vol.data.manifest import load_manifest
from slice2vol.encoders3d import build_encoder3d, embed_cohort3d
from slice2vol.encoders3d.embed import partial_path

KW = {"input_size": (32, 32, 32), "levels": [-1]}


def test_writes_one_row_per_subject_with_provenance_and_labels(head_manifest, tmp_path):
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store_path = tmp_path / "feats.h5"
    report = embed_cohort3d(enc, cohort, store_path, "3d/monai_resnet10", progress=False)
    assert report.ok and report.done == ["s0", "s1", "s2", "s3"] and report.embed_dim == 512
    ids, X, prov = FeatureStore(store_path).volume_embeddings("3d/monai_resnet10")
    assert list(ids) == report.done and X.shape == (4, 512) and X.dtype == np.float32
    # a stored row is what the encoder gives for that subject loaded as it asks
    from slice2vol.data.manifest import load_subject

    volume = load_subject(cohort.subjects[2], enc.volume_config(), with_seg=False)
    assert np.allclose(X[2], enc.embed_volume(volume).numpy(), atol=1e-6)
    assert prov["encoder_key"] == "3d/monai_resnet10" and prov["kind"] == "native-3d" and prov["mode"] == "whole"
    assert prov["weights"] == "random:seed=0" and len(prov["state_sha256"]) == 64
    assert prov["encoder_info"]["input_size"] == [32, 32, 32] and prov["volume_config"]["normalize"] == "none"
    assert prov["seconds_per_volume"] > 0 and prov["n_failures"] == 0
    store = FeatureStore(store_path)
    assert store.label_types["sex"] == "categorical" and not partial_path(store_path, "3d/monai_resnet10").exists()


def test_sliding_window_options_are_used_and_recorded(head_manifest, tmp_path):
    cohort = load_manifest(head_manifest)
    cohort = cohort.subset(cohort.ids[:2])
    enc = build_encoder3d("3d/monai_resnet10", levels=[-1], input_size=(32, 32, 64))
    window = {"roi_size": [32, 32, 32], "overlap": 0.25}
    report = embed_cohort3d(enc, cohort, tmp_path / "f.h5", "sw", progress=False, sliding_window=window)
    ids, X, prov = FeatureStore(tmp_path / "f.h5").volume_embeddings("sw")
    assert report.ok and X.shape == (2, 512) and np.isfinite(X).all()
    assert prov["mode"] == "sliding" and prov["sliding_window"]["roi_size"] == [32, 32, 32]
    assert prov["sliding_window"]["overlap"] == 0.25
    from slice2vol.data.manifest import load_subject

    volume = load_subject(cohort.subjects[0], enc.volume_config(), with_seg=False)
    assert np.allclose(X[0], enc.embed_volume(volume, window).numpy(), atol=1e-6)
    # the options reach MONAI: other windows give other (boundary-affected) features, and so does one pass
    others = [enc.embed_volume(volume, {**window, "overlap": 0.0}), enc.embed_volume(volume)]
    assert all(not np.allclose(X[0], o.numpy(), atol=1e-4) for o in others)


def test_a_broken_subject_is_recorded_and_the_others_written(head_manifest, tmp_path):
    table = pd.read_csv(head_manifest)
    (head_manifest.parent / "nii" / "s1.nii.gz").write_bytes(b"not a nifti file")
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    report = embed_cohort3d(enc, cohort, tmp_path / "f.h5", "x", progress=False)
    assert report.done == ["s0", "s2", "s3"] and [f.subject_id for f in report.failures] == ["s1"]
    assert "s1.nii.gz" in report.failures[0].message and "not a NIfTI" in report.failures[0].message
    ids, X, prov = FeatureStore(tmp_path / "f.h5").volume_embeddings("x")
    assert list(ids) == ["s0", "s2", "s3"] and prov["n_failures"] == 1
    assert len(table) == 4


def test_nothing_embeddable_raises_and_writes_nothing(head_manifest, tmp_path):
    for i in range(4):
        (head_manifest.parent / "nii" / f"s{i}.nii.gz").write_bytes(b"x")
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    with pytest.raises(ValueError, match="no subject could be embedded"):
        embed_cohort3d(enc, load_manifest(head_manifest), tmp_path / "f.h5", "x", progress=False)
    assert not FeatureStore(tmp_path / "f.h5").exists()


def test_resumes_after_a_kill_and_matches_a_clean_run(head_manifest, tmp_path, monkeypatch):
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    clean = tmp_path / "clean.h5"
    embed_cohort3d(enc, cohort, clean, "set", progress=False)

    calls = []
    original = type(enc).embed_volume

    def dying(self, volume, sliding_window=None):
        calls.append(volume.subject_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while embedding the third subject
        return original(self, volume, sliding_window)

    store = tmp_path / "resumed.h5"
    monkeypatch.setattr(type(enc), "embed_volume", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert partial_path(store, "set").exists() and not FeatureStore(store).exists()
    monkeypatch.setattr(type(enc), "embed_volume", original)
    calls.clear()
    seen = []
    monkeypatch.setattr(type(enc), "embed_volume", lambda self, v, sw=None: seen.append(v.subject_id) or original(self, v, sw))
    report = embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert report.resumed == 2 and seen == ["s2", "s3"]
    a, b = FeatureStore(clean).volume_embeddings("set"), FeatureStore(store).volume_embeddings("set")
    assert list(a[0]) == list(b[0]) and np.array_equal(a[1], b[1])
    assert not partial_path(store, "set").exists()


def test_a_partial_file_of_other_options_is_not_reused(head_manifest, tmp_path):
    cohort = load_manifest(head_manifest)
    store = tmp_path / "f.h5"
    side = partial_path(store, "set")
    np.savez(side, ids=np.asarray(["s0"]), X=np.zeros((1, 512), np.float32), identity=np.asarray("other"))
    report = embed_cohort3d(build_encoder3d("3d/monai_resnet10", **KW), cohort, store, "set", progress=False)
    assert report.resumed == 0
    _, X, _ = FeatureStore(store).volume_embeddings("set")
    assert not np.allclose(X[0], 0)
