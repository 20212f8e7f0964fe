"""aggregate_store and the CLI on a real HDF5 FeatureStore (slice2vol.cache)."""

import numpy as np
import pytest

from slice2vol.aggregate import aggregate_store, load_bags
from slice2vol.cache import FeatureStore, PlaneFeatures, SubjectFeatures
from slice2vol.cli import main
from tests.aggregate.synthetic import witness_bags


@pytest.fixture
def store_path(tmp_path):
    bags, y, _ = witness_bags(16, dim=6, seed=3)
    rng = np.random.default_rng(0)
    subjects = []
    for i, (bag, label) in enumerate(zip(bags, y)):
        planes = {p: PlaneFeatures(pb.features, pb.indices, pb.positions,
                                   tokens=rng.normal(size=(len(pb), 4, 3)).astype(np.float32), grid=(2, 2))
                  for p, pb in bag.items()}
        subjects.append(SubjectFeatures(f"s{i:02d}", planes, {"group": "AB"[label], "age": 30.0 + i}))
    path = tmp_path / "store.h5"
    store = FeatureStore(path, mode="a")
    with store.writer_lock():
        store.commit_subjects(subjects, {"encoder": "fake", "stride": 2}, dtype="float32",
                              label_types={"group": "categorical", "age": "continuous"})
    return path


def test_mean_and_mil_on_a_real_store(store_path, tmp_path):
    ids, bags = load_bags(store_path, tokens=True)
    assert len(ids) == 16 and bags[0]["axial"].tokens.shape[1:] == (4, 3) and bags[0]["axial"].token_grid == (2, 2)
    assert aggregate_store(store_path, "mean") == "mean"
    train = ids[:12]
    name = aggregate_store(store_path, "mil", label="group", train_ids=train, hidden=8, epochs=3)
    name3d = aggregate_store(store_path, "head3d", label="age", train_ids=train, channels=4, epochs=2, depth=1)
    reader = FeatureStore(store_path)
    assert set(reader.volume_embedding_names()) >= {"mean", "mil-group", "head3d-age"}
    out_ids, X, prov = reader.volume_embeddings(name)
    assert out_ids == ids and X.shape == (16, 8)
    assert prov["train_ids"] == sorted(train) and prov["task"] == "classification"
    assert prov["slice_feature_set"] == reader.feature_set  # added by the store
    mean = reader.volume_embeddings("mean")[1]
    np.testing.assert_allclose(mean[0], np.concatenate([bags[0][p].features for p in reader.planes]).mean(0),
                               rtol=1e-5)
    assert reader.volume_embeddings(name3d)[2]["task"] == "regression"
    assert (tmp_path / "store_aggregate" / "mil-group" / "attention_axial.png").exists()


def test_a_store_given_through_a_symbolic_link_keeps_its_attention_beside_the_target(store_path, tmp_path):
    """The attention folder went beside the link, where a job given the target never found it."""
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "alias.h5"
    link.symlink_to(store_path)
    assert aggregate_store(link, "mil", label="group", train_ids="all", hidden=8, epochs=1) == "mil-group"
    assert (tmp_path / "store_aggregate" / "mil-group" / "attention.npz").is_file()
    assert not (tmp_path / "links" / "alias_aggregate").exists()
    assert link.is_symlink() and "mil-group" in FeatureStore(store_path).volume_embedding_names()


def test_cli_on_a_real_store(store_path, capsys):
    assert main(["aggregate", "--store", str(store_path), "--method", "gem", "--planes", "axial"]) == 0
    assert capsys.readouterr().out.strip() == "gem-axial"
    assert FeatureStore(store_path).volume_embeddings("gem-axial")[1].shape == (16, 6)
    assert main(["aggregate", "--store", str(store_path), "--method", "mean", "--label", "age", "--cv", "3"]) == 0
    assert "mae" in capsys.readouterr().out
