import numpy as np
import pytest
import torch

from slice2vol.cache import FeatureStore
from slice2vol.data.io import VolumeConfig
from slice2vol.data.manifest import load_manifest, load_subject
from slice2vol.ssl import build_method
from slice2vol.ssl.data import fit_to_grid
from slice2vol.ssl.export import embed_cohort, embed_volume, load_encoder, windows
from slice2vol.ssl.trainer import save_checkpoint, seed_everything
from tests.ssl.conftest import tiny_config


def test_windows_cover_the_grid_by_hand():
    boxes = windows((10, 4), (4, 4), overlap=0.5)
    assert [(b[0].start, b[1].start) for b in boxes] == [(0, 0), (2, 0), (4, 0), (6, 0)]
    assert windows((3,), (5,)) == [(slice(0, 5),)]


def _checkpoint(tmp_path, method="rotation"):
    seed_everything(0)
    cfg = tiny_config(method, 3)
    model = build_method(cfg)
    save_checkpoint(tmp_path / "run" / "last", model, cfg, step=0)
    return model


def test_embed_cohort_whole_writes_store_matching_direct_encoding(blob_manifest, tmp_path):
    model = _checkpoint(tmp_path)
    encoder = load_encoder(tmp_path / "run")
    assert encoder.slice2vol_meta["key"] == "ssl3d/rotation" and len(encoder.slice2vol_meta["weights_sha256"]) == 64
    cohort = load_manifest(blob_manifest)
    store_path = tmp_path / "store.h5"
    report = embed_cohort(encoder, cohort, store_path, "ssl3d/rotation", input_size=(32, 32, 32), progress=False)
    assert report.done == ["s0", "s1", "s2"] and not report.failures
    store = FeatureStore(store_path)
    ids, X, prov = store.volume_embeddings("ssl3d/rotation")
    assert ids == ["s0", "s1", "s2"] and X.shape == (3, 32) and X.dtype == np.float32
    assert prov["method"] == "rotation" and prov["mode"] == "whole" and prov["input_size"] == [32, 32, 32]
    labels = store.labels()
    assert list(labels.index) == ids and labels.loc["s2", "age"] == pytest.approx(40.5)
    # independent path: load, fit, encode with the in-memory model
    vol = load_subject(cohort.subjects[1], VolumeConfig(crop_foreground=True), with_seg=False)
    x = fit_to_grid(torch.from_numpy(vol.data), vol.spacing, (32, 32, 32))
    with torch.no_grad():
        direct = model.eval().encoder(x[None])[0].numpy()
    np.testing.assert_allclose(X[1], direct, rtol=1e-4, atol=1e-5)


def test_embed_cohort_sliding_and_failures(blob_manifest, tmp_path):
    _checkpoint(tmp_path, "mae")  # fixed 24^3 input
    encoder = load_encoder(tmp_path / "run")
    cohort = load_manifest(blob_manifest)
    cohort.subjects[2].images["t1"].write_bytes(b"not a nifti")
    report = embed_cohort(encoder, cohort, tmp_path / "s.h5", "ssl3d/mae", input_size=(24, 24, 24),
                          mode="sliding", progress=False)
    assert report.done == ["s0", "s1"] and [f.subject_id for f in report.failures] == ["s2"]
    ids, X, prov = FeatureStore(tmp_path / "s.h5").volume_embeddings("ssl3d/mae")
    assert X.shape == (2, 48) and np.isfinite(X).all() and prov["n_failures"] == 1
    with pytest.raises(ValueError, match="whole"):
        embed_cohort(encoder, cohort, tmp_path / "s.h5", "x", mode="tiles")


def test_embed_volume_mean_pools_windows():
    class Sum(torch.nn.Module):
        embed_dim = 1

        def forward(self, x):
            return x.flatten(1).sum(1, keepdim=True)

    image = torch.ones(1, 8, 4, 4)
    out = embed_volume(Sum(), image, None, window=(4, 4, 4), overlap=0.0)
    assert out.item() == 64.0  # two windows of 64 ones, mean-pooled
    mask = torch.zeros(8, 4, 4, dtype=torch.bool)
    mask[:4] = True
    image[:, 4:] = 3.0
    assert embed_volume(Sum(), image, mask, window=(4, 4, 4), overlap=0.0).item() == 64.0  # empty window skipped
