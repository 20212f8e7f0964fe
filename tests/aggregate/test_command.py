"""``slice2vol aggregate`` in-process on a fake store."""

import json

import pytest

from slice2vol.cli import main
from tests.aggregate.synthetic import fake_store


@pytest.fixture
def store(tmp_path, monkeypatch):
    fake, _ = fake_store(16, tmp_path=tmp_path)
    monkeypatch.setattr("slice2vol.aggregate.store.open_store", lambda path, mode="r": fake)
    return fake


def test_list(capsys):
    assert main(["aggregate", "--list"]) == 0
    out = capsys.readouterr().out
    assert "mil" in out and "parameter-free" in out and "trainable" in out


def test_writes_embeddings_from_a_config(store, tmp_path, capsys):
    ids = tmp_path / "train.txt"
    ids.write_text("# training split\n" + "\n".join(store.subjects()[:12]) + "\n")
    argv = ["aggregate", "--store", "features.h5", "--config", "configs/aggregate/mil.yaml", "--label", "group",
            "--train-ids", str(ids), "--no-plot", "--out", str(tmp_path / "att"), "params.epochs=2",
            "params.hidden=8"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == "mil-group"
    prov = store.volume_embeddings("mil-group")[2]
    assert prov["n_train"] == 12 and prov["params"]["epochs"] == 2 and prov["params"]["hidden"] == 8


def test_cv_prints_and_writes_fold_metrics(store, tmp_path, capsys):
    out = tmp_path / "cv.json"
    assert main(["aggregate", "--store", "features.h5", "--method", "fusion", "--label", "score", "--cv", "4",
                 "--cv-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("fold ") == 4 and "mae" in text and "regression" in text
    result = json.loads(out.read_text())
    assert result["task"] == "regression" and len(result["folds"]) == 4 and result["n_subjects"] == 16


def test_usage_errors(store, capsys):
    assert main(["aggregate", "--store", "features.h5", "--method", "mil", "--label", "group"]) == 2
    assert "pass train_ids" in capsys.readouterr().err
    assert main(["aggregate", "--store", "features.h5", "--cv", "3"]) == 2
    assert "--cv needs --label" in capsys.readouterr().err


def test_cv_with_a_config_that_seeds_the_aggregator(store, capsys):
    argv = ["aggregate", "--store", "features.h5", "--config", "configs/aggregate/mil.yaml", "--label", "group",
            "--cv", "2", "params.epochs=1", "params.hidden=4", "params.seed=3"]
    assert main(argv) == 0
    assert "predictor head" in capsys.readouterr().out
