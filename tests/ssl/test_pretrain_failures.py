"""``slice2vol pretrain`` and the subjects that fail: with none left, the one-line error names the
manifest and the first failure (not an internal cache folder); the rows the manifest left out are
recorded in the checkpoint's meta.json with the subjects that failed to load."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slice2vol.cli import main
from tests.ssl.test_pretrain_checks import pretrain_args  # noqa: F401 - a fixture


def _with_bad_row(manifest, tmp_path, keep_good: bool):
    """``manifest`` plus a subject ``bad`` whose t1 is a dangling symlink (alone when not ``keep_good``)."""
    table = pd.read_csv(manifest)
    link = tmp_path / "nii" / "dangling.nii.gz"
    link.symlink_to(tmp_path / "nowhere" / "gone.nii.gz")
    bad = pd.DataFrame([{"subject_id": "bad", "age": 30.0, "sex": "F", "t1": str(link)}])
    table = pd.concat([table, bad] if keep_good else [bad], ignore_index=True)
    table.to_csv(manifest, index=False)
    return manifest


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_no_loadable_subject_names_the_manifest_and_the_first_failure(pretrain_args, blob_manifest, tmp_path,
                                                                      capsys, streaming):
    manifest = _with_bad_row(blob_manifest, tmp_path, keep_good=False)
    out = tmp_path / "run"
    assert main(pretrain_args + ["--out", str(out), "--steps", "1", f"data.streaming={streaming}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"slice2vol pretrain: error: {manifest}: no subject could be loaded (1 failures; "
                          "first: bad: "), err
    assert "dangling.nii.gz" in err and "volumes" not in err
    assert not (out / "last").exists()


def test_rows_the_manifest_left_out_are_recorded_in_meta(pretrain_args, blob_manifest, tmp_path, capsys):
    _with_bad_row(blob_manifest, tmp_path, keep_good=True)
    out = tmp_path / "run"
    assert main(pretrain_args + ["--out", str(out), "--steps", "1"]) == 1  # 1: a row failed
    meta = json.loads((out / "last" / "meta.json").read_text())
    assert meta["n_subjects"] == 3 and "bad" not in meta["subject_ids"]
    assert [f for f in meta["failures"] if f.startswith("bad: ")] == meta["failures"]
    assert len(meta["failures"]) == 1 and "dangling.nii.gz" in meta["failures"][0]
    out = capsys.readouterr().out.splitlines()
    assert sum("dangling.nii.gz" in line for line in out) == 1  # listed once, not again as "failed:"
