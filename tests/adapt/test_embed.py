"""Adapted 3D encoders go through the same exporter and store as every other 3D encoder."""

from __future__ import annotations

import numpy as np

from slice2vol.adapt import embed_adapted
from slice2vol.cache import FeatureStore
from slice2vol.data import load_manifest
from tests.conftest import blob_volume, write_nifti


def test_embed_adapted_writes_volume_embeddings_with_provenance(tmp_path):
    rows = ["subject_id,t1,age"]
    for i in range(3):
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume((24, 28, 20), seed=i))
        rows.append(f"s{i},s{i}.nii.gz,{30 + i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cohort = load_manifest(tmp_path / "m.csv")
    report = embed_adapted("acs/tv/mobilenet_v2", cohort, str(tmp_path / "store.h5"), input_size=(32, 32, 32),
                           progress=False)
    assert report.done == ["s0", "s1", "s2"] and not report.failures
    ids, X, prov = FeatureStore(tmp_path / "store.h5").volume_embeddings("acs/tv/mobilenet_v2")
    assert ids == ["s0", "s1", "s2"] and X.shape == (3, 1280) and np.isfinite(X).all()
    assert prov["encoder"] == "acs/tv/mobilenet_v2" and prov["kind"] == "native-3d"
    assert prov["adaptation"]["method"] == "acs" and prov["adaptation"]["base"]["key"] == "tv/mobilenet_v2"
    assert np.abs(X[0] - X[1]).max() > 1e-3 * np.abs(X).max()  # subjects differ (random weights: tiny scale)
