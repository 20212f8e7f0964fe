"""Runner details: the result cache is JSON + npz and never executes anything; optional encoders skip
missing weights; cache keys follow content, not paths."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from slice2vol.eval.experiment import Encoder2DEntry
from slice2vol.eval.resultcache import ResultCache, code_version, content_key
from slice2vol.eval.sets import weights_file_missing, weights_identity


def test_cache_round_trips_plain_values(tmp_path):
    cache = ResultCache(tmp_path)
    value = {"auc": np.float64(0.9), "pred": np.arange(4.0), "folds": [(0, "a"), (1, "b")], "nan": float("nan"),
             "nested": {"x": np.ones((2, 3), np.float32), "none": None}}
    cache.put("probe", "k1", value)
    back = cache.get("probe", "k1")
    np.testing.assert_array_equal(back["pred"], value["pred"])
    assert back["nested"]["x"].dtype == np.float32 and back["nested"]["none"] is None
    assert back["folds"] == [[0, "a"], [1, "b"]] and np.isnan(back["nan"]) and back["auc"] == 0.9
    assert not list(tmp_path.glob("*.pkl"))
    json.loads((tmp_path / "probe-k1.json").read_text())  # plain JSON
    with pytest.raises(TypeError, match="cannot be cached"):
        cache.put("probe", "k2", {"x": object()})
    with pytest.raises(TypeError, match="object arrays"):
        cache.put("probe", "k3", {"x": np.array([object()])})


def test_crafted_files_in_a_results_folder_are_never_executed(tmp_path):
    """A pickle renamed to the cache's names, or an npz holding a pickled object array: misses, nothing runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cache = ResultCache(tmp_path / "cache")
    (tmp_path / "cache" / "probe-evil.pkl").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "cache" / "probe-evil.json").write_bytes(pickle.dumps(Evil()))
    assert cache.get("probe", "evil") is None
    doc = {"schema": "slice2vol.cache/1", "kind": "probe", "key": "bad", "arrays": ["a0"],
           "value": {"__ndarray__": "a0"}}
    (tmp_path / "cache" / "probe-bad.json").write_text(json.dumps(doc))
    np.savez(tmp_path / "cache" / "probe-bad.npz", a0=np.array([Evil()], dtype=object), allow_pickle=True)
    assert cache.get("probe", "bad") is None
    assert not marker.exists()


def test_no_pickle_loading_in_the_package():
    import slice2vol

    root = os.path.dirname(slice2vol.__file__)
    hits = subprocess.run(["grep", "-rnE", r"pickle\.(load|loads|Unpickler)|allow_pickle=True|weights_only=False",
                           root, "--include=*.py"], capture_output=True, text=True).stdout
    assert hits == "", hits


def test_cache_keys_follow_content_and_code(tmp_path):
    a = tmp_path / "a.pth"
    b = tmp_path / "sub" / "b.pth"
    b.parent.mkdir()
    a.write_bytes(b"same weights")
    b.write_bytes(b"same weights")
    # the same file content under two paths is one identity; other content is another
    assert weights_identity(str(a)) == weights_identity(str(b)) and weights_identity(str(a)).startswith("sha256:")
    b.write_bytes(b"other weights")
    assert weights_identity(str(a)) != weights_identity(str(b))
    assert weights_identity("random") == "random"
    x = np.arange(6.0).reshape(2, 3)
    assert content_key("probe", x) == content_key("probe", x.copy())
    assert content_key("probe", x) != content_key("probe", x.astype(np.float32))
    assert content_key("probe", x) != content_key("probe", x + 1e-9)
    assert code_version().startswith(__import__("slice2vol").__version__ + "+")


def test_code_version_changes_with_eval_source(tmp_path):
    """The code version is a hash of the evaluation sources: editing one changes every key."""
    import shutil

    import slice2vol

    pkg = os.path.dirname(slice2vol.__file__)
    copy = tmp_path / "slice2vol"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from slice2vol.eval.resultcache import code_version; print(code_version())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    before = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True).stdout
    with open(copy / "eval" / "metrics.py", "a") as fh:
        fh.write("\n# a change\n")
    after = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True).stdout
    assert before and after and before != after


def test_optional_encoder_weights_detection(tmp_path):
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    assert not weights_file_missing(Encoder2DEntry("a", "tv/mobilenet_v2", weights=str(present)), tmp_path)
    assert weights_file_missing(Encoder2DEntry("b", "tv/mobilenet_v2", weights=str(tmp_path / "no.pth")), tmp_path)
    assert not weights_file_missing(Encoder2DEntry("c", "tv/mobilenet_v2", weights="random"), tmp_path)
    assert not weights_file_missing(Encoder2DEntry("d", "tv/mobilenet_v2", weights="hub"), tmp_path)


def test_bench_on_a_results_folder_full_of_crafted_pickles_runs_nothing(tmp_path):
    """Issue 14.1 end to end: every cache file of a finished run (and old-style ``.pkl`` names) replaced by
    a pickle that would run a command when unpickled, the npz arrays by pickled object arrays; ``bench``
    on that folder recomputes (the same numbers) and nothing in it is ever executed."""
    from pathlib import Path

    import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
    from slice2vol.cli import main
    from tests.eval.test_runner import blob_cohort

    repo = Path(__file__).resolve().parents[2]
    manifest = blob_cohort(tmp_path / "data", n=10)
    out = tmp_path / "run"
    argv = ["bench", "--config", str(repo / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[knn,linear]",
            "encoders=[{name: tiny, key: test/tiny_cnn, weights: random, dtype: float32, aggregators: [mean]}]",
            "baselines={sets: [head_volume], chance: true}", "n_bootstrap=20", "n_permutations=10", "plots=[]"]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    cached = sorted((out / "cache").glob("*.json"))
    assert cached
    for path in cached:
        path.write_bytes(payload)
        path.with_suffix(".pkl").write_bytes(payload)
    for path in (out / "cache").glob("*.npz"):
        np.savez(path, a0=np.array([Evil()], dtype=object), allow_pickle=True)  # same name (ends in .npz)
    assert main(argv) == 0
    assert not marker.exists()
    again = json.loads((out / "results.json").read_text())
    assert [r["estimate"] for r in again["rows"]] == [r["estimate"] for r in first["rows"]]
    # the recomputed results replaced the crafted files with plain JSON
    for path in cached:
        assert json.loads(path.read_text())["schema"] == "slice2vol.cache/1"


def test_a_manifest_whose_every_row_failed_is_named_not_a_store(tmp_path, capsys):
    """Fuzz: with every image path missing, bench listed the row failures and then blamed its own store
    ("runs/x/stores/rnd-4a40.h5: feature store not found"), which was never written for want of subjects."""
    from pathlib import Path

    import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
    from slice2vol.cli import main

    repo = Path(__file__).resolve().parents[2]
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,t1,grp\n" + "".join(f"s{i},gone{i}.nii.gz,{i % 2}\n" for i in range(6)))
    out = tmp_path / "run"
    assert main(["bench", "--config", str(repo / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
                 f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[knn]",
                 "encoders=[{name: rnd, key: test/tiny_cnn, weights: random, aggregators: [mean]}]"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"slice2vol bench: error: {manifest}: no subject of the manifest is left to benchmark (every row "
                    "failed; the failures are listed above)")
