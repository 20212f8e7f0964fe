"""``slice2vol finetune`` names every subject it left out: on stderr, in finetune.json, and in the exit status."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import blob_volume, write_nifti


def _manifest(tmp_path, bad: str | None, n_good: int = 2) -> str:
    """``n_good`` blob subjects, plus subject ``bad`` ("missing": a t1 that does not exist; "speck": a
    volume that is zero but for specks over 2.5% of the grid: enough foreground for a volume, but no
    slice reaches the 5% a slice needs)."""
    rows = ["subject_id,t1"]
    for i in range(n_good):
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume((24, 28, 20), seed=i))
        rows.append(f"s{i},s{i}.nii.gz")
    if bad == "speck":
        rng = np.random.default_rng(0)
        vol = np.where(rng.random((24, 28, 20)) < 0.025, 100.0, 0.0).astype(np.float32)
        write_nifti(tmp_path / "bad.nii.gz", vol)
    if bad:
        rows.append("bad,bad.nii.gz")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "m.csv")


def _finetune(manifest, out) -> int:
    from slice2vol.cli import main

    return main(["finetune", "--config", "configs/finetune/cpu_smoke.yaml", "--manifest", manifest,
                 "--steps", "1", "--out", str(out), "--no-progress", "data.stride=4"])


def test_a_manifest_row_left_out_is_reported_and_fails_the_run(tmp_path, capsys):
    code = _finetune(_manifest(tmp_path, "missing"), tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1
    assert "bad" in err and "bad.nii.gz" in err and "not found" in err
    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["trained_subjects"] == ["s0", "s1"]
    assert len(record["failures"]) == 1 and "bad.nii.gz" in record["failures"][0]


def test_a_subject_without_slices_is_reported_with_its_file_and_foreground(tmp_path, capsys):
    code = _finetune(_manifest(tmp_path, "speck"), tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("failed: "))
    assert "bad.nii.gz" in line and "foreground or more" in line and "%" in line
    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["trained_subjects"] == ["s0", "s1"]
    assert len(record["failures"]) == 1 and record["failures"][0].startswith("bad: ")
    assert "bad.nii.gz" in record["failures"][0] and "foreground" in record["failures"][0]


def test_when_every_subject_fails_the_error_counts_them_and_names_the_first(tmp_path, capsys):
    manifest = _manifest(tmp_path, "speck", n_good=0)
    with open(manifest, "a") as f:
        f.write("gone,gone.nii.gz\n")  # a manifest failure, counted too
    code = _finetune(manifest, tmp_path / "out")
    err = capsys.readouterr().err
    assert code != 0
    assert "m.csv: no subject gave slices (2 failures; first: " in err
    assert "gone.nii.gz" in err  # the manifest's own failure comes first
