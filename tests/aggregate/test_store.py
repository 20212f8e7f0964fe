"""aggregate_store on a (fake) feature store: embeddings, provenance, attention, no leakage."""

import json

import numpy as np
import pytest

from slice2vol.aggregate import TorchAggregator, aggregate_store, load_attention, load_bags
from slice2vol.aggregate.store import ids_sha256
from tests.aggregate.synthetic import fake_store

FAST = dict(epochs=5, lr=1e-2, dropout=0.0, hidden=16, attn_dim=8)


def test_parameter_free_mean_writes_embeddings_and_provenance(tmp_path):
    store, _ = fake_store(12, tmp_path=tmp_path)
    name = aggregate_store(store, "mean")
    assert name == "mean"
    ids, X, prov = store.volume_embeddings("mean")
    _, bags = load_bags(store)
    expected = np.stack([np.concatenate([b[p].features for p in store.planes]).mean(0) for b in bags])
    assert ids == store.subjects()
    np.testing.assert_allclose(X, expected, rtol=1e-5)
    assert prov["aggregator"] == "mean" and prov["trainable"] is False and prov["n_train"] == 0
    assert prov["planes"] == ["axial", "coronal", "sagittal"] and prov["source_feature_set"] == "fake123"
    json.dumps(prov)  # JSON-able
    assert aggregate_store(store, "fusion", planes=["axial", "sagittal"]) == "fusion-mean-axial+sagittal"
    assert store.volume_embeddings("fusion-mean-axial+sagittal")[1].shape == (12, 16)


def test_trainable_needs_train_ids_and_known_labels(tmp_path):
    store, _ = fake_store(12, tmp_path=tmp_path)
    with pytest.raises(ValueError, match="pass train_ids"):
        aggregate_store(store, "mil", label="group")
    with pytest.raises(ValueError, match="not in the store"):
        aggregate_store(store, "mil", label="group", train_ids=["sub-000", "nobody"])
    with pytest.raises(ValueError, match="label 'age' not in"):
        aggregate_store(store, "mil", label="age", train_ids=store.subjects()[:6])
    with pytest.raises(ValueError, match="not cached"):
        aggregate_store(store, "mean", planes=["axial", "oblique"])


def test_validation_subjects_never_reach_training(tmp_path, monkeypatch):
    """Poison the validation subjects' features with NaN: fitting (which refuses NaN) must only
    ever see training bags, and no validation feature may be read before the fit is over."""
    store, _ = fake_store(20, tmp_path=tmp_path)
    ids = store.subjects()
    train_ids, val_ids = ids[:14], ids[14:]
    clean = {}
    for sid in val_ids:
        for plane, pb in store._bags[sid].items():
            clean[(sid, plane)] = pb.features.copy()
            pb.features = np.full_like(pb.features, np.nan)
    seen = {}
    original_fit = TorchAggregator.fit

    def spy_fit(self, bags, y=None):
        seen["bags"], seen["y"] = bags, y
        seen["reads_before_fit"] = list(store.reads)
        return original_fit(self, bags, y)

    monkeypatch.setattr(TorchAggregator, "fit", spy_fit)
    with pytest.raises(ValueError, match=r"subject sub-014\[axial\]: non-finite"):
        # fit succeeds (no NaN reached it); embedding the poisoned validation subjects is refused
        aggregate_store(store, "mil", label="group", train_ids=train_ids, **FAST)
    assert len(seen["bags"]) == len(train_ids)
    assert all(np.isfinite(pb.features).all() for b in seen["bags"] for pb in b.values())
    assert {sid for sid, _ in seen["reads_before_fit"]} == set(train_ids)
    expected_y = store.labels().loc[train_ids, "group"].to_numpy()
    np.testing.assert_array_equal(seen["y"], expected_y)

    # with the real features back, the run completes and the provenance names the training set
    for (sid, plane), feats in clean.items():
        store._bags[sid][plane].features = feats
    store.reads.clear()
    name = aggregate_store(store, "mil", label="group", train_ids=train_ids, out_dir=tmp_path / "att", **FAST)
    assert name == "mil-group"
    out_ids, X, prov = store.volume_embeddings(name)
    assert out_ids == ids and X.shape == (20, 16) and np.isfinite(X).all()
    assert prov["train_ids"] == sorted(train_ids) and prov["n_train"] == 14
    assert prov["train_ids_sha256"] == ids_sha256(reversed(train_ids))
    assert prov["task"] == "classification" and prov["objective"] == "supervised" and prov["label"] == "group"
    assert prov["params"]["hidden"] == 16


def test_attention_is_saved_plotted_and_reloaded(tmp_path):
    store, _ = fake_store(10, tmp_path=tmp_path)
    name = aggregate_store(store, "mil", train_ids="all", **FAST)  # label-free
    assert name == "mil-ssl"
    prov = store.volume_embeddings(name)[2]
    assert prov["objective"] == "contrastive" and prov["n_train"] == 10
    att_dir = tmp_path / "features_aggregate" / "mil-ssl"
    assert prov["attention_file"] == str(att_dir / "attention.npz")
    assert sorted(p.name for p in att_dir.glob("*.png")) == [
        "attention_axial.png", "attention_coronal.png", "attention_sagittal.png"]
    assert json.loads((att_dir / "provenance.json").read_text())["aggregator"] == "mil"
    # the set made again without plots: the old plots go (fuzz round 16: they stayed beside new weights)
    assert aggregate_store(store, "mil", train_ids="all", plot=False, **{**FAST, "hidden": 8}) == "mil-ssl"
    assert list(att_dir.glob("*.png")) == [] and (att_dir / "attention.npz").exists()
    aggregate_store(store, "mil", train_ids="all", **FAST)  # the plots back with the set they show
    att = load_attention(att_dir / "attention.npz")
    assert list(att) == store.subjects()
    sid = store.subjects()[3]
    total = sum(att[sid][p]["weights"].sum() for p in store.planes)
    assert total == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(att[sid]["axial"]["indices"], store._bags[sid]["axial"].indices)


def test_plane_attention_of_fusion_is_saved(tmp_path):
    store, _ = fake_store(10, tmp_path=tmp_path)
    name = aggregate_store(store, "fusion", mode="attention", label="score", train_ids=store.subjects()[:8],
                           epochs=3, plot=True)
    assert name == "fusion-mean-attn-score"
    prov = store.volume_embeddings(name)[2]
    assert prov["task"] == "regression"  # from the store's label type
    att = load_attention(prov["attention_file"])
    w = att[store.subjects()[0]]["planes"]["weights"]
    assert w.shape == (3,) and w.sum() == pytest.approx(1.0, abs=1e-5)
    assert any(p.endswith("attention_planes.png") for p in prov["attention_plots"])
