"""The result cache of a probe task: intervals and tests are recomputed when their settings change."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from slice2vol.eval.cohort import LabelSplits
from slice2vol.eval.experiment import ExperimentConfig
from slice2vol.eval.linear import LinearConfig
from slice2vol.eval.resultcache import ResultCache
from slice2vol.eval.sets import EmbeddingSet
from slice2vol.eval.splits import SplitConfig, make_splits
from slice2vol.eval.tasks import linear as linear_task
from slice2vol.eval.tasks.base import TaskContext

N = 30


def context(tmp_path, cfg, cache):
    rng = np.random.default_rng(0)
    y = np.tile(["a", "b"], N // 2)
    signal = rng.normal(size=(N, 4)) + 1.5 * (y == "b")[:, None]
    noise = rng.normal(size=(N, 4))
    ids = [f"s{i:02d}" for i in range(N)]
    splits = make_splits(ids, y, "categorical", cfg=cfg.splits)
    frame = LabelSplits("grp", "categorical", ids, y, np.array(["a", "b"]), splits, tmp_path / "grp.json")
    sets = {"enc": EmbeddingSet("enc", ids, signal), "ref": EmbeddingSet("ref", ids, noise)}
    return TaskContext(cfg=cfg, base=tmp_path, out=tmp_path, frames={"grp": frame}, sets=sets, reference="ref",
                       cache=cache, progress=False)


def numbers(result):
    rows = [(r["encoder"], r["metric"], r["estimate"], r["ci_low"], r["ci_high"]) for r in result.rows]
    paired = [(p["encoder"], p["delta"], p["ci_low"], p["ci_high"], p["p_value"]) for p in result.paired]
    return rows, paired


@pytest.mark.parametrize("change", [{"n_bootstrap": 60}, {"n_permutations": 60}])
def test_cached_rows_and_tests_follow_the_bootstrap_and_permutation_counts(tmp_path, monkeypatch, change):
    """A rerun with another n_bootstrap / n_permutations reuses the fitted probes but not the intervals
    or the p-values: the cached rerun equals a run without any cache."""
    cfg = ExperimentConfig(tasks=["linear"], linear=LinearConfig(Cs=(0.1, 1.0)),
                           splits=SplitConfig(n_folds=3), n_bootstrap=20, n_permutations=20)
    cache = ResultCache(tmp_path / "cache")
    first = linear_task.TASK.run(context(tmp_path, cfg, cache))
    fits = []
    original = linear_task.TASK.fit_predict
    monkeypatch.setattr(linear_task.TASK, "fit_predict", lambda *a, **k: fits.append(1) or original(*a, **k))
    changed = replace(cfg, **change)
    cached = linear_task.TASK.run(context(tmp_path, changed, cache))
    assert fits == []  # the probes came from the cache: only the statistics can have been recomputed
    fresh = linear_task.TASK.run(context(tmp_path, changed, None))
    assert len(fits) == 2 * 3  # two sets x three folds, fitted again without a cache
    assert numbers(cached) == numbers(fresh)
    rows, paired = numbers(first)
    if "n_bootstrap" in change:  # the change is visible at all: otherwise the equality above is empty
        assert rows != numbers(fresh)[0]
    if "n_permutations" in change:
        assert [p[-1] for p in paired] != [p[-1] for p in numbers(fresh)[1]]
