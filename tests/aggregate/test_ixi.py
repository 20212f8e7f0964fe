"""Every aggregator on features cached from real IXI volumes (slow: caches 4 subjects first)."""

import numpy as np
import pytest

from slice2vol.aggregate import AGGREGATORS, aggregate_store
from slice2vol.cache import FeatureStore

pytestmark = [pytest.mark.ixi, pytest.mark.slow]

CASES = [
    ("mean", {}), ("max", {}), ("gem", {}),
    ("mil", {"hidden": 16, "epochs": 2}),
    ("transformer", {"d_model": 16, "heads": 2, "depth": 1, "epochs": 2}),
    ("fusion", {}),
    ("fusion", {"base": "mil", "mode": "attention", "base_params": {"hidden": 8}, "epochs": 2}),
    ("head3d", {"channels": 8, "depth": 1, "epochs": 2}),
]


@pytest.fixture(scope="module")
def ixi_store(ixi_manifest, tmp_path_factory):
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.extract import cache_cohort

    cohort = load_manifest(ixi_manifest)
    cohort = cohort.subset([s.subject_id for s in cohort.subjects[:4]])
    path = tmp_path_factory.mktemp("ixi") / "ixi.h5"
    report = cache_cohort(cohort, "tv/mobilenet_v2", path, slice_cfg=SliceConfig(stride=12, size=64),
                          save_tokens=True, progress=False, batch_size=16)
    assert report.ok
    return path


@pytest.mark.parametrize("method, params", CASES, ids=lambda v: str(v)[:30])
def test_every_aggregator_writes_volume_embeddings_on_ixi(ixi_store, method, params):
    reader = FeatureStore(ixi_store)
    ids = reader.subjects()
    kwargs = dict(params)
    if AGGREGATORS.get(method).requires_fit or method == "fusion" and "mode" in params:
        kwargs.update(label="age", train_ids=ids[:3])  # fitted on 3, the 4th is only embedded
    name = aggregate_store(ixi_store, method, **kwargs)
    out_ids, X, prov = FeatureStore(ixi_store).volume_embeddings(name)
    assert out_ids == ids and np.isfinite(X).all() and X.shape[0] == 4
    assert prov["aggregator"] == method and prov["slice_feature_set"] == reader.feature_set
    if prov["trainable"]:
        assert prov["train_ids"] == sorted(ids[:3])
