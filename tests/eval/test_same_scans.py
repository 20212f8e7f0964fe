"""One scan under two IDs, found from the embeddings: the bench leaves such subjects out of every split."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cli import main
from slice2vol.eval.leakage import same_scans
from slice2vol.eval.sets import EmbeddingSet
from tests.eval.test_runner import OVERRIDES, REPO, blob_cohort


def _sets(rng):
    ids = [f"s{i:02d}" for i in range(20)]
    X2, X3 = rng.normal(size=(20, 16)), rng.normal(size=(20, 8))
    for X in (X2, X3):
        X[5] = X[2] + 1e-9 * rng.normal(size=X.shape[1])  # s02 and s05: one scan, float rounding apart
        X[11] = X[10]
        X[12] = X[10] * (1 + 1e-12)  # s10, s11, s12: one scan three times
    X2[9] = X2[7]  # close in the 2D set only: two scans a collapsed corner of one encoder confuses
    return {
        "slices": EmbeddingSet("slices", ids, X2, kind="2d"),
        "native": EmbeddingSet("native", ids, X3, kind="3d"),
        "collapsed": EmbeddingSet("collapsed", ids, np.ones((20, 4)), kind="2d"),
        "table": EmbeddingSet("table", ids, np.zeros((20, 3)), kind="features"),  # not made from images
    }


def test_same_scans_are_the_pairs_close_in_every_image_set():
    sets = _sets(np.random.default_rng(0))
    groups, notes = same_scans(sets)
    assert groups == [["s02", "s05"], ["s10", "s11", "s12"]]
    assert len(notes) == 1 and notes[0].startswith("set 'collapsed': most subjects share one vector")
    # with the 3D set alone s07/s09 are far apart; with the 2D set alone they count
    assert same_scans({"slices": sets["slices"]})[0] == [["s02", "s05"], ["s07", "s09"], ["s10", "s11", "s12"]]
    assert same_scans({"native": sets["native"]})[0] == [["s02", "s05"], ["s10", "s11", "s12"]]
    # a pair only decided by the sets holding both subjects: the 3D set without s09 leaves s07/s09 to the 2D set
    partial = EmbeddingSet("native", [s for s in sets["native"].ids if s != "s09"],
                           np.delete(sets["native"].X, 9, axis=0), kind="3d")
    assert ["s07", "s09"] in same_scans({"slices": sets["slices"], "native": partial})[0]
    assert same_scans({"table": sets["table"], "collapsed": sets["collapsed"]})[0] == []


def test_distinct_scans_are_never_one_scan():
    """Rows drawn independently, at every scale and dimension: no group (the threshold is relative)."""
    rng = np.random.default_rng(1)
    for scale, dim in ((1e-8, 4), (1.0, 64), (1e6, 512)):
        X = scale * rng.normal(size=(200, dim))
        assert same_scans({"a": EmbeddingSet("a", [str(i) for i in range(200)], X, kind="2d")}) == ([], [])


def test_bench_leaves_out_one_scan_saved_twice(tmp_path, capsys, caplog):
    """s05's image is s04's voxels saved again as .nii: the bytes differ, so the manifest keeps both;
    their embeddings coincide, so the bench leaves both out of every split and names them."""
    manifest = blob_cohort(tmp_path / "data")
    data = manifest.parent
    s4 = nib.load(data / "s4.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(s4.dataobj), s4.affine), data / "s5.nii")
    table = pd.read_csv(manifest)
    table.loc[table.subject_id == "s05", "t1"] = "s5.nii"
    table.to_csv(manifest, index=False)
    out = tmp_path / "run"
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", *OVERRIDES, "encoders.0.aggregators=[mean]",
            "baselines={sets: [], chance: true}", "tasks=[knn,segmentation]", "segmentation.epochs=2"]
    assert main(argv) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["cohort"]["same_scans"] == [["s04", "s05"]]
    failures = results["cohort"]["failures"]
    assert failures == [
        f"s04: {data / 's4.nii.gz'}: the same scan as subject(s) 's05' ({data / 's5.nii'}): their embeddings "
        "coincide in every image set (saved twice under two IDs?); all left out of the benchmark",
        f"s05: {data / 's5.nii'}: the same scan as subject(s) 's04' ({data / 's4.nii.gz'}): their embeddings "
        "coincide in every image set (saved twice under two IDs?); all left out of the benchmark"]
    assert results["cohort"]["n_subjects"] == 10
    for label in ("grp", "score"):
        split = json.loads(Path(results["provenance"]["splits"][label]).read_text())
        assert sorted(split["subject_ids"]) == [f"s{i:02d}" for i in range(12) if i not in (4, 5)]
    assert sorted(results["tasks"]["segmentation"]["subjects"]) == [f"s{i:02d}" for i in range(12) if i not in (4, 5)]
    assert "2 subject(s) failed or were left out" in capsys.readouterr().err
    assert "2 subject(s) left out as one scan under two IDs: s04, s05" in caplog.text
