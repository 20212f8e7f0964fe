"""A registered native-3D network (``slice2vol.encoders3d``) as a benchmark set, by its ``key``.

Tiny: MONAI ResNet10 at random init on 12 small volumes (a few seconds on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slice2vol.cli import main
from tests.eval.test_runner import blob_cohort

pytest.importorskip("monai")
REPO = Path(__file__).resolve().parents[2]


def argv(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[linear]", "encoders=[]",
            "encoders3d=[{name: monai-r10, key: 3d/monai_resnet10, weights: random,"
            " kwargs: {input_size: [32, 32, 32], spacing: 4.0, seed: 0}}]",
            "baselines={sets: [head_volume], chance: true}", "reference=monai-r10",
            "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2}", "n_bootstrap=20", "n_permutations=10",
            "plots=[]", *extra]


def test_registered_3d_network_joins_the_tables(tmp_path):
    from slice2vol.cache import FeatureStore
    from slice2vol.encoders3d import build_encoder3d

    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    assert main(argv(manifest, out)) == 0
    data = json.loads((out / "results.json").read_text())
    entry = data["sets"]["monai-r10"]
    assert entry["kind"] == "3d" and entry["encoder_key"] == "3d/monai_resnet10" and entry["n"] == 12
    assert entry["dim"] == build_encoder3d("3d/monai_resnet10", "random").info.embed_dim
    assert entry["fitted"] is None and entry["pretraining"] is None
    assert {p["encoder"] for p in data["paired"]} == {"head_volume", "chance"}
    assert {r["encoder"] for r in data["rows"]} == {"monai-r10", "head_volume", "chance"}
    # the set is what embed_cohort3d wrote into its store under the entry's name
    (store,) = (out / "stores").glob("monai-r10-*.h5")
    ids, X, prov = FeatureStore(store, mode="r").volume_embeddings("monai-r10")
    assert prov["encoder_key"] == "3d/monai_resnet10" and X.shape == (12, entry["dim"])
    assert np.isfinite(X).all() and float(X.std(0).max()) > 0
    # rerun: read from the store, nothing re-embedded (the network is not even built)
    mtime = store.stat().st_mtime_ns
    assert main(argv(manifest, out)) == 0
    assert store.stat().st_mtime_ns == mtime
    # other encoder options: another store, never the old embeddings
    assert main(argv(manifest, out, "encoders3d.0.kwargs.seed=1")) == 0
    assert len(list((out / "stores").glob("monai-r10-*.h5"))) == 2


def test_unknown_3d_key_is_one_line(tmp_path, capsys):
    manifest = blob_cohort(tmp_path / "data")
    assert main(argv(manifest, tmp_path / "run", "encoders3d.0.key=3d/nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3d/nope" in err[0], err


def _missing_file_entry(tmp_path: Path, optional: bool) -> str:
    # a 3D key whose weights are a file that is not there: what a missing weights package looks like
    return (f"encoders3d=[{{name: monai-r10, key: 3d/monai_resnet10, weights: random,"
            f" kwargs: {{input_size: [32, 32, 32], spacing: 4.0, seed: 0}}}},"
            f" {{name: gone, key: 3d/medicalnet_resnet10, weights: {tmp_path / 'resnet_10.pth'},"
            f" optional: {str(optional).lower()}}}]")


def test_optional_3d_network_without_weights_is_skipped_and_listed(tmp_path):
    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    assert main(argv(manifest, out, _missing_file_entry(tmp_path, True))) == 0
    data = json.loads((out / "results.json").read_text())
    assert "gone" not in data["sets"] and "monai-r10" in data["sets"]
    (skip,) = [s for s in data["skipped"] if s["name"] == "gone"]
    assert "resnet_10.pth" in skip["reason"]
    assert "gone" in (out / "report.html").read_text()


def test_required_3d_network_without_weights_fails_the_run(tmp_path, capsys):
    manifest = blob_cohort(tmp_path / "data")
    assert main(argv(manifest, tmp_path / "run", _missing_file_entry(tmp_path, False))) != 0


def test_a_rerun_from_the_stored_3d_set_reports_its_failures_again(tmp_path, capsys):
    """Only the 3D stage reads the images here (no 2D encoder, no computed baseline): a rerun that
    reads the stored set used to forget the subject that failed and exit 0."""
    manifest = blob_cohort(tmp_path / "data")
    (manifest.parent / "s5.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "run"
    args = argv(manifest, out, "baselines={sets: [], chance: true}")
    assert main(args) == 1
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 subject(s) failed or were left out" in err and "s5.nii.gz" in err
