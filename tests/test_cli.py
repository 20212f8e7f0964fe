"""The CLI in-process: help, info on a file and on a manifest, one-line errors."""

from __future__ import annotations

from slice2vol.cli import main
from tests.conftest import blob_volume, write_nifti


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "info" in out and "synth" in out


def test_info_on_file(small_nifti, capsys):
    assert main(["info", str(small_nifti)]) == 0
    out = capsys.readouterr().out
    for field in ("shape", "spacing_mm", "orientation", "intensity_range", "foreground_fraction",
                  "axial_slices", "coronal_slices", "sagittal_slices"):
        assert field in out
    assert "(24, 28, 20)" in out


def test_info_on_bad_file_names_it(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage")
    assert main(["info", str(bad)]) == 1
    out = capsys.readouterr().out
    assert str(bad) in out and "\n" not in out.strip()


def test_info_on_manifest_reports_failures_and_goes_on(tmp_path, capsys):
    good = write_nifti(tmp_path / "a.nii.gz", blob_volume())
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\na,{good.name}\nb,missing.nii.gz\na2,{good.name}\n")
    assert main(["info", str(csv)]) == 1
    out = capsys.readouterr().out
    assert "subject: a2" in out and "missing.nii.gz" in out and "file not found" in out


def test_our_errors_are_one_line_and_bugs_keep_tracebacks(monkeypatch, small_nifti, capsys):
    import pytest

    from slice2vol.commands import info
    from slice2vol.encoders.base import WeightsUnavailable

    def offline(args):
        raise WeightsUnavailable("timm/resnet18: cannot download ... Pass a local checkpoint instead")

    monkeypatch.setattr(info, "run", offline)
    assert main(["info", str(small_nifti)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slice2vol info: error: timm/resnet18") and "\n" not in err

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["info", str(small_nifti)])
