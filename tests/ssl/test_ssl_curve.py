"""The ssl_curve benchmark task: every kept checkpoint (and the initialisation) probed on the shared splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from slice2vol.cache import FeatureStore
from slice2vol.data.manifest import load_manifest
from slice2vol.eval.cohort import make_label_splits
from slice2vol.eval.experiment import Encoder3DEntry, ExperimentConfig
from slice2vol.eval.resultcache import ResultCache
from slice2vol.eval.sets import EmbeddingSet
from slice2vol.eval.splits import SplitConfig
from slice2vol.eval.tasks import get_task
from slice2vol.eval.tasks.base import TaskContext
from slice2vol.ssl.export import embed_cohort, load_encoder
from slice2vol.ssl.trainer import pretrain
from tests.conftest import blob_volume, write_nifti
from tests.ssl.conftest import tiny_config

N = 10


@pytest.fixture
def cohort_csv(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    for i in range(N):
        path = write_nifti(tmp_path / "nii" / f"s{i}.nii.gz", blob_volume((24, 28, 20), seed=i))
        rows.append({"subject_id": f"s{i}", "group": "AB"[i % 2], "score": float(rng.normal()), "t1": str(path)})
    csv = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_curve_rows_figure_and_the_initialisation_point(cohort_csv, tmp_path, monkeypatch):
    cohort = load_manifest(cohort_csv)
    ssl = tiny_config("rotation", 3, steps=4, batch_size=2, checkpoint_every=2, keep_every=2)
    run = tmp_path / "ssl-run"
    pretrain(ssl, run, cohort=cohort, progress=False, plot=False)
    entry = Encoder3DEntry(name="ssl3d-rot", input_size=(24, 24, 24))
    store = tmp_path / "main.h5"
    embed_cohort(load_encoder(run / "last"), cohort, store, "ssl3d-rot", input_size=(24, 24, 24), progress=False)
    ids, X, prov = FeatureStore(store).volume_embeddings("ssl3d-rot")
    rng = np.random.default_rng(1)
    sets = {"ssl3d-rot": EmbeddingSet("ssl3d-rot", list(ids), X, prov, "3d", entry),
            "noise": EmbeddingSet("noise", list(ids), rng.normal(size=(N, 8)), {}, "features")}
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=2, n_repeats=1, n_bins=2), n_bootstrap=50, n_permutations=50,
                           task_params={"ssl_curve": {"probes": ["linear", "knn"]}})
    cfg.knn.ks = (3,)
    cfg.primary_k = 3
    labels = cohort.labels()
    frames = make_label_splits(labels, dict(cohort.label_types), [set(ids)], cfg, tmp_path / "splits")
    ctx = TaskContext(cfg=cfg, base=tmp_path, out=tmp_path / "out", cohort=cohort, labels=labels,
                      label_types=dict(cohort.label_types), frames=frames, sets=sets, reference="noise",
                      cache=ResultCache(tmp_path / "cache"), progress=False)
    result = get_task("ssl_curve").run(ctx)

    assert result.extras["ssl3d-rot"]["steps"] == [0, 2, 4]
    primary = [r for r in result.rows if r["metric"] == "roc_auc" and r["variant"].startswith("linear:logistic")]
    assert sorted(r["step"] for r in primary) == [0, 2, 4]
    assert {r["variant"] for r in primary} == {f"linear:logistic@step={s}" for s in (0, 2, 4)}
    assert all(r["task"] == "ssl_curve" and r["encoder"] == "ssl3d-rot" for r in result.rows)
    assert any(r["variant"].startswith("knn:k=3 weighted@step=") for r in result.rows)
    paired = [p for p in result.paired if p["label"] == "group" and p["variant"].startswith("linear:")]
    assert sorted(p["step"] for p in paired) == [0, 2, 4] and all(p["reference"] == "noise" for p in paired)
    assert len(result.figures) == 2 and (ctx.out / result.figures[0]["png"]).stat().st_size > 0

    # the last step is the main set itself (no re-embedding); step 2 is the step_2 checkpoint embedded alike
    curve = FeatureStore(ctx.out / "ssl_curve" / "ssl3d-rot.h5")
    assert "step_0000004" not in curve.volume_embedding_names()
    embed_cohort(load_encoder(run / "step_0000002"), cohort, tmp_path / "check.h5", "s2", input_size=(24, 24, 24),
                 progress=False)
    np.testing.assert_allclose(curve.volume_embeddings("step_0000002")[1],
                               FeatureStore(tmp_path / "check.h5").volume_embeddings("s2")[1], rtol=1e-5, atol=1e-6)
    # step 0 is the network the run started from: the same as a 0-step run of the same config
    pretrain(tiny_config("rotation", 3, steps=0), tmp_path / "init-run", cohort=cohort, progress=False, plot=False)
    embed_cohort(load_encoder(tmp_path / "init-run" / "last"), cohort, tmp_path / "check.h5", "s0",
                 input_size=(24, 24, 24), progress=False)
    init = curve.volume_embeddings("step_0000000")[1]
    np.testing.assert_allclose(init, FeatureStore(tmp_path / "check.h5").volume_embeddings("s0")[1], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(init, X, atol=1e-4)  # training moved the weights

    # a rerun probes again but embeds nothing new
    import slice2vol.ssl.export

    def no_embedding(*args, **kwargs):
        raise AssertionError("a rerun must reuse the stored curve embeddings")

    monkeypatch.setattr(slice2vol.ssl.export, "embed_cohort", no_embedding)
    again = get_task("ssl_curve").run(ctx)
    assert [r["estimate"] for r in again.rows] == [r["estimate"] for r in result.rows]


def test_sets_without_kept_checkpoints_are_skipped_with_the_reason(cohort_csv, tmp_path):
    cohort = load_manifest(cohort_csv)
    run = tmp_path / "run"
    pretrain(tiny_config("rotation", 3, steps=1, batch_size=2), run, cohort=cohort, progress=False, plot=False)
    entry = Encoder3DEntry(name="one", checkpoint=str(run / "last"), input_size=(24, 24, 24))
    X = torch.zeros(N, 4).numpy()
    sets = {"one": EmbeddingSet("one", cohort.ids, X, {}, "3d", entry)}
    cfg = ExperimentConfig(task_params={"ssl_curve": {"include_init": False, "entries": ["one"]}})
    ctx = TaskContext(cfg=cfg, base=tmp_path, out=tmp_path / "out", cohort=cohort, sets=sets, progress=False)
    result = get_task("ssl_curve").run(ctx)
    assert result.rows == [] and "keep_every" in result.skipped[0]["reason"]
    bad = TaskContext(cfg=ExperimentConfig(task_params={"ssl_curve": {"probe": ["linear"]}}), base=tmp_path,
                      out=tmp_path, sets={})
    with pytest.raises(ValueError, match="unknown option"):
        get_task("ssl_curve").run(bad)
