"""``slice2vol aggregate`` in-process on a fake store."""

import json
import re

import numpy as np
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


@pytest.mark.parametrize("argv, message", [
    (["--method", "mean", "params.epochs=2"], r"aggregator 'mean' takes no parameter\(s\) \['epochs'\] \(its parameters: planes\)"),
    (["--method", "gem", "params.p=abc"], r"aggregator 'gem': bad parameter value\(s\)"),
    (["--method", "mean", "--cv", "0", "--label", "group"], r"--cv must be 2 or more folds, got 0"),  # was ignored
    (["--method", "mean", "--cv", "2", "--label", "constant"],
     r"label 'constant' has one class only \(1\) among the 16 subjects with a value: nothing to classify"),
    (["--method", "mil", "--train-ids", "all", "--label", "group", "params.epochs=abc"],
     r"AttentionMIL: epochs must be a whole number >= 1, got 'abc'"),
    # these trained, then failed at the write (hidden=0), wrote untrained embeddings (epochs=0), or gave
    # torch's 'Invalid learning rate'
    (["--method", "mil", "--train-ids", "all", "--label", "group", "params.hidden=0"],
     r"AttentionMIL: hidden must be a whole number >= 1, got 0"),
    (["--method", "mil", "--train-ids", "all", "--label", "group", "params.epochs=0"],
     r"AttentionMIL: epochs must be a whole number >= 1, got 0"),
    (["--method", "mil", "--train-ids", "all", "--label", "group", "params.lr=-1"],
     r"AttentionMIL: lr must be a number > 0, got -1"),
    (["--method", "mil", "--train-ids", "all", "--label", "group", "params.dropout=1.5"],
     r"AttentionMIL: dropout must be a number in \[0, 1\), got 1.5"),
])
def test_bad_parameters_get_one_line(store, capsys, argv, message):
    """These ended in TypeError tracebacks or a multi-line scikit-learn dump (found by fuzzing)."""
    import re

    store.labels = (lambda labels: (lambda: labels.assign(constant=1)))(store.labels())
    store.label_types = {**store.label_types, "constant": "categorical"}
    assert main(["aggregate", "--store", "features.h5", "--no-plot", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err and "Traceback" not in err


def test_missing_store_and_train_ids_files_are_named(tmp_path, capsys):
    assert main(["aggregate", "--store", str(tmp_path / "nope.h5"), "--method", "mean"]) == 2
    assert f"{tmp_path / 'nope.h5'}: feature store not found" in capsys.readouterr().err


def test_train_ids_file_problems_are_named(store, tmp_path, capsys):
    for content, message in (("", "no subject IDs in the --train-ids file"),
                             ("a\nb\na\n", "duplicate subject IDs in the --train-ids file, e.g. ['a']")):
        ids = tmp_path / "ids.txt"
        ids.write_text(content)
        assert main(["aggregate", "--store", "features.h5", "--method", "mil", "--label", "group",
                     "--train-ids", str(ids), "--no-plot"]) == 2
        assert f"{ids}: {message}" in capsys.readouterr().err
    assert main(["aggregate", "--store", "features.h5", "--method", "mil", "--label", "group",
                 "--train-ids", str(tmp_path / "gone.txt"), "--no-plot"]) == 2
    assert "gone.txt: --train-ids file not found" in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_train_ids_file_with_a_byte_order_mark_and_crlf_is_read(store, tmp_path, capsys, encoding):
    """Fuzz round 6 (F13): the mark stayed glued to the first ID ('\\ufeffIXI039...' not in the store)."""
    ids = tmp_path / "train.txt"
    ids.write_bytes("\r\n".join(store.subjects()[:12]).encode(encoding))
    assert main(["aggregate", "--store", "features.h5", "--method", "mil", "--label", "group", "--train-ids",
                 str(ids), "--no-plot", "--out", str(tmp_path / "att"), "params.epochs=1", "params.hidden=8"]) == 0
    assert store.volume_embeddings("mil-group")[2]["n_train"] == 12


def test_train_ids_missing_from_the_store_name_the_file(store, tmp_path, capsys):
    ids = tmp_path / "train.txt"
    ids.write_text("\n".join([*store.subjects()[:4], "nosuch"]))
    assert main(["aggregate", "--store", "features.h5", "--method", "mil", "--label", "group", "--train-ids",
                 str(ids), "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{ids}: 1 subject ID(s) not in the store features.h5, e.g. ['nosuch']") and "\n" not in err


def test_an_empty_embedding_set_is_not_written(tmp_path):
    import numpy as np

    from slice2vol.cache import FeatureStore

    with pytest.raises(ValueError, match=r"volume embeddings 'h0' of shape \(3, 0\): expected \(subjects, dims\)"):
        FeatureStore(tmp_path / "s.h5", mode="a").write_volume_embeddings("h0", ["a", "b", "c"], np.zeros((3, 0)))


def test_a_damaged_subject_is_left_out_and_the_rest_aggregated(tmp_path, capsys):
    """One subject whose cached rows fail their checksum used to stop the whole job (exit 2)."""
    import h5py

    from slice2vol.cache import FeatureStore
    from tests.test_cache import write_store

    path = tmp_path / "s.h5"
    write_store(path, ids=range(4))
    with h5py.File(path, "a") as f:  # s1's first axial row: s0 has 3 rows, then s1
        f["planes/axial/features"][3, 3] += 1
    assert main(["aggregate", "--store", str(path), "--method", "mean", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "1 subject(s) left out, their cached features are damaged" in err
    assert "subject 's1' axial" in err and "fail their checksum" in err
    ids, X, _ = FeatureStore(path).volume_embeddings("mean")
    assert ids == ["s0", "s2", "s3"]
    # the others are aggregated as they would be without the damaged one (a mean over their slices)
    expected = [np.concatenate([FeatureStore(path).slice_features(s, p) for p in ("axial", "coronal")]).mean(0)
                for s in ids]
    np.testing.assert_allclose(X, np.stack(expected), rtol=1e-5)
    assert "write damaged volume embeddings again" not in err


@pytest.mark.parametrize("method", ["mean", "mil"])
def test_every_subject_damaged_says_so_in_one_line(tmp_path, capsys, method):
    """Fuzz round 12: 'no bags given' (no file, no cause) when every subject's rows were damaged."""
    import h5py

    from tests.test_cache import write_store

    path = tmp_path / "s.h5"
    write_store(path, ids=range(4))
    with h5py.File(path, "a") as f:
        f["planes/axial/features"][:, 0] += 1
    extra = ["--label", "sex", "--train-ids", "all"] if method == "mil" else []
    assert main(["aggregate", "--store", str(path), "--method", method, "--no-plot", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"slice2vol aggregate: error: {path}: every ") and "subject's cached features are " \
        "damaged (e.g. subject 's0' axial features fail their checksum (the file is damaged)); nothing to " in err


def test_a_store_edited_by_another_program_is_one_line(tmp_path, capsys):
    """Fuzz round 12: a 1-D features dataset was an IndexError, a text format_version int()'s message."""
    import h5py

    from tests.test_cache import write_store

    path = tmp_path / "s.h5"
    write_store(path, ids=range(2))
    with h5py.File(path, "a") as f:
        n = f["planes/axial/features"].shape[0]
        del f["planes/axial/features"]
        f["planes/axial/features"] = np.zeros(n, np.float32)
    assert main(["cache", "info", "--store", str(path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{path}: planes/axial/features has shape ({n},) and dtype "
                                                    "float32, not (rows, dim) floats (edited by another program?)")
    write_store(tmp_path / "v.h5", ids=range(2))
    with h5py.File(tmp_path / "v.h5", "a") as f:
        f.attrs["format_version"] = "two"
    assert main(["cache", "info", "--store", str(tmp_path / "v.h5")]) == 2
    assert capsys.readouterr().err.strip().endswith("v.h5: attribute 'format_version' is 'two', not a whole number "
                                                    "(edited by hand?)")
    # a (N, D, 1) set of volume embeddings: pandas' "Per-column arrays must each be 1-dimensional"
    from slice2vol.cache import FeatureStore

    FeatureStore(tmp_path / "x.h5", mode="a").write_volume_embeddings("mean", ["a", "b"], np.ones((2, 3), np.float32))
    with h5py.File(tmp_path / "x.h5", "a") as f:
        group = f[next(k for k in ("volumes/mean", "volume_embeddings/mean") if k in f)]
        del group["X"]
        group["X"] = np.ones((2, 3, 1), np.float32)
        group.attrs["checksum"] = ""
    assert main(["export", "--store", str(tmp_path / "x.h5"), "--embeddings", "mean", "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.strip().endswith("x.h5: volume embeddings 'mean' have shape (2, 3, 1), not "
                                                    "(subjects, dims) (edited by another program?)")


def test_an_embed_store_is_named_when_there_is_nothing_to_aggregate(tmp_path, capsys):
    from slice2vol.cache import FeatureStore

    path = tmp_path / "e.h5"
    FeatureStore(path, mode="a").write_volume_embeddings("3d/x", ["a", "b"], np.ones((2, 3)), {})
    assert main(["aggregate", "--store", str(path), "--method", "mean"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "e.h5: the store holds no cached slice features (only volume embeddings ['3d/x'], from slice2vol embed: "
        "nothing to aggregate)")


def test_too_many_cv_folds_for_a_class_is_said_plainly(store, capsys):
    assert main(["aggregate", "--store", "features.h5", "--method", "mean", "--label", "group", "--cv", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than the 20 folds of --cv" in err and "np.str_" not in err
    assert re.search(r"label 'group': class '[^']+' has \d+ subject\(s\)", err)


def test_a_set_of_another_method_is_replaced_with_a_warning_and_blank_names_are_refused(store, capsys, caplog):
    assert main(["aggregate", "--store", "features.h5", "--method", "mean", "--no-plot"]) == 0
    assert main(["aggregate", "--store", "features.h5", "--method", "max", "--name", "mean", "--no-plot"]) == 0
    assert "replacing the volume embeddings 'mean', made by mean, with max" in caplog.text
    assert store.volume_embeddings("mean")[2]["aggregator"] == "max"
    assert main(["aggregate", "--store", "features.h5", "--method", "max", "--name", "  ", "--no-plot"]) == 2
    assert "name of the embedding set must be non-empty" in capsys.readouterr().err


@pytest.fixture
def small_store(tmp_path, monkeypatch):
    """6 subjects: 3 per class of 'group', a continuous 'score'."""
    fake, _ = fake_store(6, tmp_path=tmp_path)
    monkeypatch.setattr("slice2vol.aggregate.store.open_store", lambda path, mode="r": fake)
    return fake


# both gave scikit-learn's "n_splits=3 cannot be greater than the number of members in each class"
@pytest.mark.parametrize("label, folds, task", [("score", 3, "regression"), ("group", 2, "classification"),
                                                ("group", 3, "classification")])
def test_cv_on_a_small_cohort_runs(small_store, capsys, label, folds, task):
    assert main(["aggregate", "--store", "features.h5", "--method", "mean", "--label", label,
                 "--cv", str(folds)]) == 0
    out = capsys.readouterr().out
    assert out.count("fold ") == folds and f"({task}, 6 subjects, {folds}-fold" in out


def test_too_many_regression_folds_say_what_is_needed(small_store, capsys):
    assert main(["aggregate", "--store", "features.h5", "--method", "mean", "--label", "score", "--cv", "4"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "label 'score': 6 subjects with a value, too few for 4 folds (needs >= 8)")


def test_a_one_class_training_list_names_the_file_and_the_label(store, tmp_path, capsys):
    labels = store.labels()["group"]
    ids = tmp_path / "train.txt"
    ids.write_text("\n".join(labels.index[labels == "A"][:5]) + "\n")
    assert main(["aggregate", "--store", "features.h5", "--method", "mil", "--label", "group", "--train-ids",
                 str(ids), "--no-plot", "params.epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"label 'group' has one class only (A) among the training subjects listed in {ids} "
                        "(5 with a value): a supervised aggregator needs >= 2 classes to fit on; list subjects of "
                        "every class") and "\n" not in err


@pytest.mark.parametrize("params, message", [
    # p=nan passed `p <= 0` and was blamed on the cached features ("non-finite volume embeddings")
    (["params.p=.nan"], r"GeM exponent p must be > 0 and finite, got nan"),
    # a floor above every feature: each subject got the same vector and rc was 0
    (["params.eps=10.0"], r"aggregator 'gem' with params \{[^}]*'eps': 10.0[^}]*\} gave all 16 subjects the same "
                          r"volume embedding \(max \|x\| = 10\) although their cached slice features differ"),
])
def test_gem_that_would_write_one_vector_for_every_subject_is_refused(store, capsys, params, message):
    assert main(["aggregate", "--store", "features.h5", "--method", "gem", "--no-plot", *params]) == 2
    assert re.search(message, capsys.readouterr().err) and not store.written


def test_gem_on_tiny_features_writes_distinct_vectors(tmp_path, monkeypatch):
    """Random-init MobileNetV2 features are ~1e-8: a fixed eps = 1e-6 made them all 1e-6."""
    from slice2vol.aggregate import PlaneBag
    from tests.aggregate.synthetic import FakeStore

    rng = np.random.default_rng(0)
    bags = [{"axial": PlaneBag((rng.random((5, 4)) * 1e-8).astype(np.float32))} for _ in range(6)]
    fake = FakeStore([f"s{i}" for i in range(6)], bags)
    monkeypatch.setattr("slice2vol.aggregate.store.open_store", lambda path, mode="r": fake)
    for p in ("3.0", "100.0", "1000000.0"):
        assert main(["aggregate", "--store", "features.h5", "--method", "gem", "--name", "g", f"params.p={p}"]) == 0
        X = fake.written["g"][1]
        assert len(np.unique(X, axis=0)) == 6 and 0 < X.min() and X.max() < 1e-8


def test_vectors_equal_to_float32_precision_count_as_collapsed():
    """Fuzz round 16: mil's 10 vectors differed by 5e-7 of their size, and the exact comparison let the
    set be written (every neighbour at similarity 1.0000)."""
    from slice2vol.aggregate.store import collapsed

    rng = np.random.default_rng(0)
    base = rng.normal(size=8) * 1e-8
    assert collapsed(base + rng.normal(size=(10, 8)) * 1e-7 * 1e-8)
    assert not collapsed(base + rng.normal(size=(10, 8)) * 1e-3 * 1e-8)
    assert collapsed(np.zeros((3, 4))) and not collapsed(np.eye(3))


def test_bench_message_tells_an_aggregator_collapse_from_a_constant_encoder():
    from slice2vol.aggregate import PlaneBag
    from slice2vol.eval.sets import check_degenerate
    from tests.aggregate.synthetic import FakeStore

    X = np.full((3, 4), 1e-6, np.float32)
    prov = {"aggregator": "gem", "params": {"p": 3.0, "eps": 1e-6}, "source_planes": ["axial"]}
    varying = FakeStore(["a", "b", "c"], [{"axial": PlaneBag(np.full((2, 4), v, np.float32))} for v in (1, 2, 3)])
    with pytest.raises(ValueError, match=r"rnd/gem: every subject has the same embedding \(max \|x\| = 1e-06\) "
                                         r"although their cached slice features differ: the aggregator 'gem' "
                                         r"\(params \{'p': 3.0, 'eps': 1e-06\}\) collapsed them"):
        check_degenerate("rnd/gem", X, store=varying, ids=["a", "b", "c"], provenance=prov)
    constant = FakeStore(["a", "b", "c"], [{"axial": PlaneBag(np.zeros((2, 4), np.float32))} for _ in range(3)])
    with pytest.raises(ValueError, match="the encoder output is constant or underflowed"):
        check_degenerate("rnd/gem", X, store=constant, ids=["a", "b", "c"], provenance=prov)
    check_degenerate("rnd/gem", X[:1], store=varying, ids=["a"], provenance=prov)  # one subject: nothing to say
