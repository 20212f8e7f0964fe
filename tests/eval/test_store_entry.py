"""A bench ``store:`` entry (slice features cached before, never recached by the bench): a subject whose
manifest row now points at another scan was scored with the old scan's features without a word (fuzz:
the bench's own stores notice changed inputs through the stored fingerprints, a brought store did not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cli import main
from tests.conftest import write_nifti
from tests.eval.test_runner import blob_cohort

REPO = Path(__file__).resolve().parents[2]


def bench_argv(manifest: Path, store: Path, out: Path) -> list[str]:
    return ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[knn]", "encoders3d=[]",
            f"encoders=[{{name: ext, store: {store}, aggregators: [mean]}}]", "baselines={sets: [], chance: false}",
            "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2}", "n_bootstrap=20", "n_permutations=10",
            "plots=[]"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Manifest A of 12 blob heads and a float32 store cached from it (with input fingerprints)."""
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.extract import cache_cohort

    root = tmp_path_factory.mktemp("store_entry")
    manifest = blob_cohort(root)
    report = cache_cohort(load_manifest(manifest), "test/tiny_cnn", root / "A.h5", slice_cfg=SliceConfig(size=32),
                          dtype="float32", progress=False)
    assert report.ok, report.summary()
    return manifest, root / "A.h5"


def test_a_subject_whose_scan_changed_since_the_store_cached_it_is_a_failure(cached, tmp_path, capsys):
    manifest, store = cached
    other = tmp_path / "another_scan.nii.gz"  # another scan of s03 (not a copy of any cohort image)
    write_nifti(other, np.random.default_rng(7).normal(40, 5, (24, 28, 20)).astype(np.float32))
    table = pd.read_csv(manifest)
    table["t1"] = [str(manifest.parent / t) for t in table["t1"]]
    table["seg"] = [str(manifest.parent / t) for t in table["seg"]]
    table.loc[table["subject_id"] == "s03", "t1"] = str(other)
    table.to_csv(tmp_path / "B.csv", index=False)
    out = tmp_path / "run"
    assert main(bench_argv(tmp_path / "B.csv", store, out)) == 1  # was 0: s03 scored with its old scan
    err = capsys.readouterr().err
    line = next(ln.strip() for ln in err.splitlines() if ln.strip().startswith("s03: input changed"))
    assert line.startswith(f"s03: input changed since {store} cached it (t1 (another_scan.nii.gz): ")
    assert line.endswith("): cache it again")
    data = json.loads((out / "results.json").read_text())
    assert line in data["cohort"]["failures"]
    assert {r["n_subjects"] for r in data["rows"]} == {11}  # the other subjects are benchmarked
    assert data["sets"]["ext/mean"]["n"] == 11


def test_an_unchanged_manifest_passes_and_the_same_content_elsewhere_is_no_change(cached, tmp_path, capsys):
    """Only a change of content counts: copying the images elsewhere (new paths and mtimes) is no change."""
    import shutil

    manifest, store = cached
    copy = tmp_path / "copy"
    shutil.copytree(manifest.parent, copy, ignore=shutil.ignore_patterns("*.h5", "*.h5.parts"))
    assert main(bench_argv(copy / "manifest.csv", store, tmp_path / "run")) == 0
    assert "input changed" not in capsys.readouterr().err
    # the bench manifest may name the image column otherwise: the same files are no change
    table = pd.read_csv(copy / "manifest.csv").rename(columns={"t1": "image"})
    table.to_csv(copy / "renamed.csv", index=False)
    assert main(bench_argv(copy / "renamed.csv", store, tmp_path / "run2")) == 0
    assert "input changed" not in capsys.readouterr().err


def test_grouped_folds_choose_the_linear_penalty_on_folds_that_keep_groups_whole(cached, tmp_path, monkeypatch):
    """Fuzz round 14: the outer folds kept each site whole, but the linear probe's inner folds (its
    penalty choice) did not. The bench now gives the probe each training row's group."""
    from slice2vol.eval.tasks import linear as linear_task

    manifest, store = cached
    table = pd.read_csv(manifest)
    table["site"] = [f"site{i // 2}" for i in range(len(table))]  # each site: one subject of grp 0, one of grp 1
    for column in ("t1", "seg"):
        table[column] = [str(manifest.parent / t) for t in table[column]]
    table.to_csv(tmp_path / "sites.csv", index=False)
    seen = []

    class Spy(linear_task.LinearProbe):
        def fit(self, x, y, groups=None):
            seen.append((np.asarray(y).astype(str), groups))
            return super().fit(x, y, groups=groups)

    monkeypatch.setattr(linear_task, "LinearProbe", Spy)
    argv = [a if not a.startswith("tasks=") else "tasks=[linear]" for a in bench_argv(tmp_path / "sites.csv", store,
                                                                                       tmp_path / "run")]
    argv = [a if not a.startswith("splits=") else "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2, group: site}"
            for a in argv]
    assert main(argv) == 0
    assert seen and all(groups is not None and len(groups) == len(y) for y, groups in seen)
    for y, groups in seen:  # rows and groups line up: every site in a training part holds both classes
        for site in set(groups):
            assert sorted(y[groups == site]) == ["0", "1"]
