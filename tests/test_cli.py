"""The CLI in-process: help, info on a file and on a manifest, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

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


def test_info_on_a_file_with_a_newline_in_its_name_keeps_one_row_per_fact(tmp_path, capsys):
    """The subject row printed the newline as is and broke the table (fuzz round 17)."""
    path = write_nifti(tmp_path / "new\nline.nii.gz", blob_volume())
    assert main(["info", str(path)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split(":", 1) == ["subject", " new\\nline"]
    assert all(": " in row for row in rows)


def test_info_shows_tiny_intensities_as_they_are(tmp_path, capsys):
    """Values around 1e-28 were shown as "(-0, 0)", which reads as an empty volume."""
    path = write_nifti(tmp_path / "tiny.nii.gz", (blob_volume() * 1e-28).astype(np.float32))
    assert main(["info", str(path)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "intensity_range" in l)
    low, high = (float(v) for v in line.split(":", 1)[1].strip(" ()").split(","))
    assert low == 0 and 1e-28 < high < 1e-25


def test_info_on_bad_file_names_it(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage")
    assert main(["info", str(bad)]) == 2  # an unusable input is a usage/input error (docs/cli.md)
    err = capsys.readouterr().err.strip()
    assert err.startswith("slice2vol info: error:") and str(bad) in err and "\n" not in err


def test_info_on_manifest_reports_failures_and_goes_on(tmp_path, capsys):
    good = write_nifti(tmp_path / "a.nii.gz", blob_volume())
    other = write_nifti(tmp_path / "a2.nii.gz", blob_volume(seed=1))
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\na,{good.name}\nb,missing.nii.gz\na2,{other.name}\n")
    assert main(["info", str(csv)]) == 1
    out = capsys.readouterr().out
    assert "subject: a2" in out and "missing.nii.gz" in out and "file not found" in out


def test_info_on_manifest_names_the_row_of_a_file_that_fails_to_read(tmp_path, capsys):
    good = write_nifti(tmp_path / "a.nii.gz", blob_volume())
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\na,{good.name}\nsub-7,broken.nii.gz\n")
    assert main(["info", str(csv)]) == 1
    lines = [l.strip() for l in capsys.readouterr().out.splitlines() if "broken.nii.gz" in l]
    assert len(lines) == 1 and lines[0].startswith("row 3 (sub-7): ") and str(tmp_path / "broken.nii.gz") in lines[0]


def test_subjects_know_their_manifest_line_and_glob_cohorts_have_none(tmp_path):
    from slice2vol.data.manifest import cohort_from_glob, load_manifest

    for seed, sid in enumerate(("sub-01", "sub-02")):  # two scans, not one under two IDs
        write_nifti(tmp_path / sid / "anat" / f"{sid}_T1w.nii.gz", blob_volume(seed=seed))
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\n,,\nsub-01,sub-01/anat/sub-01_T1w.nii.gz\nsub-02,sub-02/anat/sub-02_T1w.nii.gz\n")
    assert [s.row for s in load_manifest(csv).subjects] == [3, 4]  # line 2 is an empty row
    assert [s.row for s in cohort_from_glob(tmp_path).subjects] == [None, None]


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


# -- the one CLI convention ------------------------------------------------------------------------
import argparse  # noqa: E402

from slice2vol.cli import COMMANDS, build_parser, command_parser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _subparser(name: str) -> argparse.ArgumentParser:
    return command_parser(build_parser(), name)


def _takes_positional_overrides(name: str) -> bool:
    return any(a.dest == "overrides" and a.nargs == "*" and not a.option_strings
               for a in _subparser(name)._actions)


class _Stop(Exception):
    """Raised by the spy once the job's config is built, so the job itself does not run."""


def _spy_on_config(monkeypatch, config_path: Path) -> dict:
    """Intercepts slice2vol.config.from_dict: every job builds its config through load_config, which
    calls from_dict with the config file as ``where`` for the top-level dataclass."""
    import slice2vol.config as config_module

    real = config_module.from_dict
    seen: dict = {}

    def spy(cls, data, where=""):
        result = real(cls, data, where)
        try:
            top = Path(where).resolve() == config_path.resolve()
        except (OSError, ValueError):
            top = False
        if top:
            seen["cfg"] = result
            raise _Stop
        return result

    monkeypatch.setattr(config_module, "from_dict", spy)
    return seen


def _manifest(tmp_path: Path) -> Path:
    image = write_nifti(tmp_path / "a.nii.gz", blob_volume())
    path = tmp_path / "m.csv"
    path.write_text(f"subject_id,t1,grp\na,{image.name},0\nb,{image.name},1\n")
    return path


# command, config, extra arguments, overrides (one with a list index), check on the built config
OVERRIDE_CASES = {
    "bench": ("configs/experiments/ci.yaml", lambda t: ["--out", str(t / "run")],
              ["encoders.0.weights=hub", "tasks=[knn,linear]"],
              lambda c: c.encoders[0].weights == "hub" and list(c.tasks) == ["knn", "linear"]),
    "pretrain": ("configs/ssl/simclr_cpu.yaml", lambda t: ["--manifest", str(_manifest(t)), "--out", str(t / "run")],
                 ["data.crop_size.0=16", "train.lr=0.01"],
                 lambda c: list(c.data.crop_size) == [16, 32, 32] and c.train.lr == 0.01),
    "aggregate": ("configs/aggregate/mean.yaml", lambda t: ["--store", str(t / "store.h5")],
                  ["planes=[axial,coronal]", "planes.1=sagittal"],
                  lambda c: list(c.planes) == ["axial", "sagittal"]),
    "finetune": ("configs/finetune/cpu_smoke.yaml", lambda t: ["--manifest", str(_manifest(t)), "--out", str(t / "run")],
                 ["data.planes=[axial,coronal]", "data.planes.0=sagittal", "lora.rank=2"],
                 lambda c: list(c.data.planes) == ["sagittal", "coronal"] and c.lora.rank == 2),
}


@pytest.mark.parametrize("command", sorted(OVERRIDE_CASES))
def test_same_override_syntax_for_every_config_job(command, tmp_path, monkeypatch):
    """bench, pretrain, aggregate and finetune take the same positional Hydra-style KEY=VALUE overrides,
    list indices included, and they reach the job's typed config."""
    # every config job takes them now: one that stops would fail here, not pass as an expected failure
    assert _takes_positional_overrides(command), f"slice2vol {command} lost its positional KEY=VALUE overrides"
    config, extra, overrides, check = OVERRIDE_CASES[command]
    config_path = REPO / config
    seen = _spy_on_config(monkeypatch, config_path)
    with pytest.raises(_Stop):
        main([command, "--config", str(config_path), *extra(tmp_path), *overrides])
    assert check(seen["cfg"]), seen["cfg"]


@pytest.mark.parametrize("command", sorted(OVERRIDE_CASES))
def test_bad_list_index_is_one_line_exit_2(command, tmp_path, capsys):
    # every config job takes them now: one that stops would fail here, not pass as an expected failure
    assert _takes_positional_overrides(command), f"slice2vol {command} lost its positional KEY=VALUE overrides"
    config, extra, overrides, _ = OVERRIDE_CASES[command]
    bad = {"bench": "encoders.7.weights=hub", "pretrain": "data.crop_size.9=16",
           "aggregate": "planes=[axial]", "finetune": "data.planes.9=axial"}[command]
    argv = [command, "--config", str(REPO / config), *extra(tmp_path), bad]
    if command == "aggregate":
        argv.append("planes.4=coronal")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slice2vol {command}: error:") and "out of range" in err and "\n" not in err


OLD_FLAG_VARIANTS = {"--set", "--out-dir", "--output", "--store-path", "--progress", "--no-progress-bar"}
MINE = ("synth", "demo", "export")


def _convention_violations(command: str) -> list[str]:
    parser = _subparser(command)
    problems = []
    flags = {s for a in parser._actions for s in a.option_strings}
    if flags & OLD_FLAG_VARIANTS:
        problems.append(f"old flag names {sorted(flags & OLD_FLAG_VARIANTS)}")
    device = next((a for a in parser._actions if "--device" in a.option_strings), None)
    # unset (None) only where the config file's own device key stands, and --help says so
    if device is not None and device.default != "auto" and not (device.default is None
                                                                and "the config's" in (device.help or "")):
        problems.append(f"--device defaults to {device.default!r}, not auto")
    if "store" in {a.dest for a in parser._actions if not a.option_strings}:
        problems.append("the store is positional, not --store")
    if parser.formatter_class.__name__ != "HelpFormatter":
        problems.append("--help without defaults")
    return problems


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_follows_the_convention(command):
    """One flag name per concept, --device auto, --store as a flag, defaults in --help."""
    problems = _convention_violations(command)
    assert not problems, problems
    if command in MINE:
        assert "(default:" in _subparser(command).format_help()


def test_export_csv_npz_parquet_match_the_store(tmp_path, capsys):
    from slice2vol.cache import FeatureStore

    store = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    ids = [f"sub-{i}" for i in range(5)]
    # 400 dims: %.8g missed about 1 float32 in 200 by one ulp (fuzz round 16); %.9g round-trips all
    X = (rng.normal(size=(5, 400)) * 10.0 ** rng.integers(-12, 3, size=(5, 400))).astype(np.float32)
    fs = FeatureStore(store, mode="a")
    fs.write_volume_embeddings("3d/deepbet", ids, X, {"encoder": "3d/deepbet", "weights_sha256": "ab12"})
    fs.write_labels({s: {"grp": i % 2} for i, s in enumerate(ids)}, {"grp": "categorical"})

    assert main(["export", "--store", str(store)]) == 0  # no --embeddings: lists the sets
    assert capsys.readouterr().out.strip() == "3d/deepbet"
    out_csv = tmp_path / "e.csv"
    assert main(["export", "--store", str(store), "--embeddings", "3d/deepbet", "--out", str(out_csv),
                 "--labels"]) == 0
    import json

    import pandas as pd

    table = pd.read_csv(out_csv)
    assert list(table.columns[:2]) == ["subject_id", "grp"] and table.shape == (5, 2 + 400)
    np.testing.assert_array_equal(table.filter(regex=r"^e\d+$").to_numpy().astype(np.float32), X)  # exact
    meta = json.loads((tmp_path / "e.csv.provenance.json").read_text())
    assert meta["provenance"]["weights_sha256"] == "ab12" and meta["dim"] == 400

    out_npz = tmp_path / "e.npz"
    assert main(["export", "--store", str(store), "--embeddings", "3d/deepbet", "--to", "npz", "--out",
                 str(out_npz)]) == 0
    with np.load(out_npz, allow_pickle=False) as data:
        assert list(data["ids"]) == ids
        np.testing.assert_array_equal(data["X"], X)
        assert json.loads(str(data["provenance"]))["provenance"]["encoder"] == "3d/deepbet"

    pytest.importorskip("pyarrow", reason="Parquet export needs pyarrow (the 'export' extra)")
    import pyarrow.parquet as pq

    out_pq = tmp_path / "e.parquet"
    assert main(["export", "--store", str(store), "--embeddings", "3d/deepbet", "--out", str(out_pq)]) == 0
    read = pq.read_table(out_pq)
    np.testing.assert_array_equal(read.to_pandas().filter(regex=r"^e\d+$").to_numpy(), X)
    assert b"slice2vol.provenance" in read.schema.metadata


def test_export_errors_name_the_problem(tmp_path, capsys):
    from slice2vol.cache import FeatureStore

    store = tmp_path / "s.h5"
    FeatureStore(store, mode="a").write_volume_embeddings("mean", ["a", "b"], np.ones((2, 3)), {})
    assert main(["export", "--store", str(tmp_path / "none.h5"), "--embeddings", "mean", "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert "none.h5: feature store not found" in capsys.readouterr().err
    assert main(["export", "--store", str(store), "--embeddings", "max", "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "no volume embeddings 'max'" in err and "mean" in err
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(tmp_path / "x.txt")]) == 2
    assert "pass --to csv|parquet|npz" in capsys.readouterr().err
    # a suffix naming another format than --to (a zip named .parquet), and a folder given as --out
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(tmp_path / "x.parquet"),
                 "--to", "npz"]) == 2
    assert "x.parquet: the suffix says parquet but --to is npz" in capsys.readouterr().err
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(tmp_path / "d") + "/",
                 "--to", "csv"]) == 2
    assert "--out ends in a folder separator" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["2", "nan", "-0.1"])
def test_info_min_foreground_is_a_fraction(small_nifti, capsys, value):
    """Fuzz round 9: --min-foreground 2 (or nan) was accepted and reported 0 slices kept."""
    assert main(["info", str(small_nifti), "--min-foreground", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--min-foreground must be a fraction from 0 to 1, got {float(value)}") and "\n" not in err


def _labelled_store(path):
    from slice2vol.cache import FeatureStore

    ids = ["a", "b", "c"]
    fs = FeatureStore(path, mode="a")
    fs.write_volume_embeddings("mean", ids, np.arange(6, dtype=np.float32).reshape(3, 2), {})
    # a text label (IXI's sex), a numeric one, and one named like the first embedding column
    fs.write_labels({s: {"sex": "MFM"[i], "age": 20.5 + i, "e0": i} for i, s in enumerate(ids)},
                    {"sex": "categorical", "age": "continuous", "e0": "continuous"})
    return path


def test_export_labels_keep_text_labels_and_never_replace_a_column(tmp_path, capsys):
    store = _labelled_store(tmp_path / "s.h5")
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(tmp_path / "e.npz"),
                 "--labels"]) == 0
    with np.load(tmp_path / "e.npz", allow_pickle=False) as data:
        assert list(data["label_sex"]) == ["M", "F", "M"]  # was: could not convert string to float: 'M'
        np.testing.assert_array_equal(data["label_age"], [20.5, 21.5, 22.5])
    import pandas as pd

    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(tmp_path / "e.csv"),
                 "--labels"]) == 0
    table = pd.read_csv(tmp_path / "e.csv")
    np.testing.assert_array_equal(table["e0"], [0, 2, 4])  # the embedding, not the label of the same name
    np.testing.assert_array_equal(table["label_e0"], [0, 1, 2])
    assert list(table["sex"]) == ["M", "F", "M"]


def test_export_never_overwrites_a_store(tmp_path, capsys, monkeypatch):
    store = _labelled_store(tmp_path / "s.h5")
    before = store.read_bytes()
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(store), "--to", "csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("s.h5: --out is the store being exported; write the export to another file")
    other = _labelled_store(tmp_path / "other.h5")
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(other), "--to", "npz"]) == 2
    assert "other.h5: is an HDF5 file (a feature store?); refusing to overwrite it" in capsys.readouterr().err
    assert store.read_bytes() == before and not list(tmp_path.glob(".*tmp"))
    # Parquet without pyarrow: what to install, in one line (it was a traceback)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slice2vol export: error: Parquet export needs pyarrow: pip install pyarrow") and "\n" not in err
    assert not (tmp_path / "e.parquet").exists() and not list(tmp_path.glob(".*tmp"))


def test_export_replaces_an_earlier_export_but_no_other_file(tmp_path, capsys):
    """Fuzz round 6 (F14): ``--out cohort.csv`` replaced the manifest with embeddings, exit 0."""
    store = _labelled_store(tmp_path / "s.h5")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("subject_id,t1\na,a.nii.gz\n")
    argv = ["export", "--store", str(store), "--embeddings", "mean", "--out", str(manifest)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{manifest}: already exists and is no earlier export (no cohort.csv.provenance.json beside "
                        "it); choose another --out, or pass --overwrite to replace it")
    assert manifest.read_text() == "subject_id,t1\na,a.nii.gz\n"
    assert main([*argv, "--overwrite"]) == 0 and manifest.read_text().startswith("subject_id,e0")
    out = tmp_path / "e.npz"
    for _ in range(2):  # an earlier export (its sidecar beside it) is replaced without --overwrite
        assert main(["export", "--store", str(store), "--embeddings", "mean", "--out", str(out)]) == 0


def test_command_line_is_recorded_and_run_log_written(tmp_path, monkeypatch):
    from slice2vol.commands import _common

    recorded = {}

    def fake_run(args):
        recorded["line"] = args.command_line
        log_path = _common.add_run_log(tmp_path / "run")
        import logging

        logging.getLogger("slice2vol.test").info("hello from the job")
        recorded["log"] = log_path
        return 0

    from slice2vol.commands import synth

    monkeypatch.setattr(synth, "run", fake_run)
    assert main(["synth", "--out", str(tmp_path / "x y"), "--n", "3"]) == 0
    assert recorded["line"] == f"slice2vol synth --out '{tmp_path / 'x y'}' --n 3"
    assert "hello from the job" in recorded["log"].read_text()
    import logging

    for handler in list(logging.getLogger().handlers):  # do not leak the file handler into other tests
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()


def test_wheel_ships_the_configs_and_finds_them_from_any_folder(tmp_path):
    """`pip install .` outside the checkout: the wheel holds configs/ as slice2vol/_configs, and the
    demo's config lookup works from another folder with only the installed package on the path."""
    import subprocess
    import sys
    import zipfile

    import shutil

    # build from a clean copy: setuptools reuses a checkout's build/ folder, stale files included
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("slice2vol", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(source), "-w", str(wheel_dir)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheel_dir.glob("slice2vol-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n.split("_configs/", 1)[1] for n in names if n.startswith("slice2vol/_configs/")}
        expected = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
        assert shipped == expected
        site = tmp_path / "site"
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -I: no PYTHONPATH, no user site, no cwd on the path; the extracted wheel goes first
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); "
            "import slice2vol.config as c; from slice2vol.commands import demo; "
            "p = c.resolve_config_path(demo.DEFAULT_CONFIG); "
            f"assert str(p).startswith({str(site)!r}), p; "
            "assert c.resolve_config_path('configs/experiments/ci.yaml').name == 'ci.yaml'; print(p)")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("slice2vol/_configs/experiments/demo.yaml")


def test_config_lookup_errors_say_where_they_looked(tmp_path, monkeypatch):
    from slice2vol.config import ConfigError, resolve_config_path

    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("experiments/demo").name == "demo.yaml"
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert resolve_config_path("mine.yaml") == Path("mine.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found .*packaged configs"):
        resolve_config_path("nope.yaml")


def test_demo_runs_bench_on_the_packaged_config_then_adds_cohort_and_command_line(tmp_path, monkeypatch, capsys):
    """The demo is bench on experiments/demo.yaml (found without a checkout path), plus the cohort
    overview as the report's first figure and the demo's own command line in the provenance."""
    import json

    from slice2vol.commands import bench
    from slice2vol.eval.report import SCHEMA, write_report

    seen = {}

    def fake_bench(args):
        seen.update(config=args.config, out=args.out, overrides=list(args.overrides),
                    no_progress=args.no_progress, command_line=args.command_line,
                    device=getattr(args, "device", None))
        out = Path(args.out)
        cohort = out / "cohort"
        for i in range(2):
            write_nifti(cohort / f"s{i}.nii.gz", blob_volume(seed=i))
        (cohort / "manifest.csv").write_text("subject_id,t1,site\ns0,s0.nii.gz,A\ns1,s1.nii.gz,B\n")
        write_report(out, {"schema": SCHEMA, "title": "t", "config": {}, "provenance": {}, "cohort": {},
                           "reference": None, "sets": {}, "skipped": [], "summary": [], "rows": [], "paired": [],
                           "figures": [], "notes": []})
        return 0

    monkeypatch.setattr(bench, "run", fake_bench)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--device", "cpu", "splits.n_repeats=1"]) == 0
    assert Path(seen["config"]).parts[-3:] == ("_configs", "experiments", "demo.yaml")
    assert seen["out"] == str(out) and seen["no_progress"] is True
    assert "splits.n_repeats=1" in seen["overrides"]
    assert seen["device"] == "cpu" or "device=cpu" in seen["overrides"]  # bench's --device, or the config key
    results = json.loads((out / "results.json").read_text())
    assert results["figures"][0]["section"] == "cohort" and results["figures"][0]["png"] == "figures/cohort.png"
    assert results["provenance"]["command_line"].startswith("slice2vol demo --out ")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "figures/cohort.svg" in html
    assert (out / "slice2vol.log").exists()
    import logging

    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()


@pytest.mark.parametrize("store", [".", "..", "folder"])
def test_a_store_that_is_a_folder_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, store):
    """'--store .' said "PosixPath('.') has an empty name" and left a file '.log' behind; a folder name
    wrote its log next to the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    write_nifti(tmp_path / "a.nii.gz", blob_volume())
    (tmp_path / "m.csv").write_text("subject_id,t1\na,a.nii.gz\n")
    before = sorted(p.name for p in tmp_path.parent.iterdir()), sorted(p.name for p in tmp_path.iterdir())
    assert main(["cache", "--manifest", "m.csv", "--encoder", "tv/resnet18", "--store", store, "--size", "32",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"slice2vol cache: error: {store}: is a directory; a feature store "
                                               f"is a file, e.g. {Path(store) / 'feats.h5'}")
    assert (sorted(p.name for p in tmp_path.parent.iterdir()), sorted(p.name for p in tmp_path.iterdir())) == before
    assert main(["info", store]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_seed_out_of_range_is_a_usage_error_naming_the_flag(capsys, tmp_path, monkeypatch):
    """Fuzz round 8 (H8): ``cache --seed 99999999999999999999`` said "Overflow when unpacking long long"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5", "--seed",
              "99999999999999999999"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --seed: must be from 0 to 2**32 - 1, got 99999999999999999999")
    assert not list(tmp_path.iterdir())


def test_a_set_name_the_store_cannot_hold_is_refused_before_aggregating(tmp_path, capsys):
    """Fuzz round 8 (H6): ``--name .`` ran the aggregation, then called the store damaged."""
    assert main(["aggregate", "--store", str(tmp_path / "s.h5"), "--method", "mean", "--name", "."]) == 2
    assert capsys.readouterr().err.strip() == (
        f"slice2vol aggregate: error: {tmp_path / 's.h5'}: volume-embedding set name '.': '.' and '..' are HDF5's "
        "names for a group itself and its parent; choose another --name")


def test_a_store_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path, capsys):
    """Fuzz round 7 (G2): HDF5 opening a named pipe waited for a writer for ever."""
    import os

    fifo = tmp_path / "s.h5"
    os.mkfifo(fifo)
    for argv in (["info", str(fifo)], ["aggregate", "--store", str(fifo), "--method", "mean"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{fifo}: a named pipe (FIFO), not a regular file; a feature store is an HDF5 file")


def test_overrides_may_sit_between_options(monkeypatch, capsys):
    """`bench --config x a=1 --out y b=2` used to fail with the top-level usage and 'unrecognized
    arguments: b=2'."""
    from slice2vol.commands import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda args: seen.update(overrides=args.overrides, out=args.out) or 0)
    assert main(["bench", "--config", "x.yaml", "splits.n_folds=3", "--out", "runs/y", "tasks=[knn]"]) == 0
    assert seen == {"overrides": ["splits.n_folds=3", "tasks=[knn]"], "out": "runs/y"}
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--config", "x.yaml", "--out", "runs/y", "--nosuch", "a=1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("slice2vol bench: error: unrecognized arguments: --nosuch")
    with pytest.raises(SystemExit):  # a command without overrides keeps argparse's refusal
        main(["info", "x.nii.gz", "a=1"])
    assert "unrecognized arguments: a=1" in capsys.readouterr().err


def test_operating_system_errors_name_the_path_in_words(tmp_path, capsys):
    """`--out` that is a file where a folder is needed printed '[Errno 17] File exists: ...'."""
    from slice2vol.cache import FeatureStore

    FeatureStore(tmp_path / "s.h5", mode="a").write_volume_embeddings("mean", ["a", "b"], np.eye(2, 3), {})
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["index", "build", "--store", str(tmp_path / "s.h5"), "--embeddings", "mean", "--out",
                 str(afile), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"slice2vol index: error: {afile}: already exists (a file where a folder is needed?)"


@pytest.mark.parametrize("argv, message", [
    (["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5", "--workers", "-1"],
     "--workers must be >= 0, got -1"),
    (["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5", "--commit-every", "0"],
     "--commit-every must be >= 1, got 0"),
    (["info", "x.nii.gz", "--stride", "0"], "--stride must be >= 1, got 0"),  # was 'slice step cannot be zero'
    # was exit 0, "2 subject(s) cached", 0 slices
    (["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5", "--planes", ","],
     "no plane given; choose one or more of sagittal, coronal, axial"),
    (["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5", "--planes", "axial,axial"],
     "plane(s) axial given more than once"),
    # a plane lost between two commas was dropped without a word (fuzz round 7)
    (["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5", "--planes", "axial,,coronal"],
     "planes 'axial,,coronal': an empty plane name between commas; give e.g. 'axial,coronal'"),
    (["aggregate", "--store", "s.h5", "--method", "mean", "--planes", "axial, ,coronal"],
     "planes 'axial, ,coronal': an empty plane name between commas; give e.g. 'axial,coronal'"),
])
def test_out_of_range_counts_name_their_flag(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: nothing lands in the checkout, even on the code before
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(message)


@pytest.mark.parametrize("command", [["cache", "--manifest", "m.csv", "--encoder", "tv/mobilenet_v2", "--store", "s.h5"],
                                     ["embed", "--manifest", "m.csv", "--encoder", "3d/deepbet"],
                                     ["finetune", "--manifest", "m.csv"]])
def test_empty_weights_are_a_usage_error(command, capsys, tmp_path, monkeypatch):
    """Fuzz round 6: ``--weights "$CKPT"`` with the variable unset built random weights, exit 0."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*command, "--weights", ""])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --weights: empty value (an unset shell variable?): give random, pretrained, hub[:tag], package or "
        "a local file")
    assert not list(tmp_path.iterdir())


def test_a_bench_config_without_a_cohort_is_named(tmp_path, capsys):
    """An empty config file gave 'cohort: set manifest or synthetic', naming no file (fuzz round 6)."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{config}: no cohort: set cohort.manifest (a CSV, e.g. cohort.manifest=cohort.csv) or "
                        "cohort.synthetic (e.g. cohort.synthetic={n_subjects: 24})") and "\n" not in err
    # a file with no document at all (truncated, or only comments) is refused as such, not run on defaults
    for command in (["bench", "--out", str(tmp_path / "run")], ["pretrain", "--manifest", "m.csv", "--out",
                                                                  str(tmp_path / "ssl")]):
        config.write_text("# nothing yet\n")
        assert main([*command, "--config", str(config), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{config}: the config file is empty (no YAML document, only blanks or comments); "
                            "write `{}` to mean every default") and "\n" not in err


def test_cache_into_a_file_that_is_no_store_leaves_nothing_beside_it(tmp_path, capsys):
    """A CSV named .h5 is refused in one line before the job's log and lock are created beside it."""
    store = tmp_path / "s.h5"
    store.write_text("subject_id,t1\n")
    assert main(["cache", "--manifest", str(tmp_path / "m.csv"), "--encoder", "tv/mobilenet_v2", "--store",
                 str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"slice2vol cache: error: {store}: cannot open as HDF5 (not an HDF5 file); the file is damaged "
                   "or not a feature store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_cache_warns_about_one_scan_cached_under_two_ids(tmp_path, monkeypatch, capsys):
    """b.nii holds a.nii.gz's voxels (other bytes, so the manifest keeps both): the job caches all three,
    then names a and b in one line; the store's same_features finds them from its checksums."""
    import nibabel as nib

    from slice2vol.cache import FeatureStore

    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "a.nii.gz", blob_volume(seed=0))
    write_nifti(tmp_path / "c.nii.gz", blob_volume(seed=1))
    a = nib.load(tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(a.dataobj), a.affine, a.header), tmp_path / "b.nii")
    (tmp_path / "m.csv").write_text("subject_id,t1\na,a.nii.gz\nb,b.nii\nc,c.nii.gz\n")
    assert main(["cache", "--manifest", "m.csv", "--encoder", "tv/resnet18", "--store", "s.h5", "--size", "32",
                 "--stride", "4", "--no-progress"]) == 0
    assert FeatureStore(tmp_path / "s.h5").same_features() == [["a", "b"]]
    lines = [line for line in capsys.readouterr().err.splitlines() if "identical features" in line]
    assert lines == ["s.h5: subjects 'a' (a.nii.gz), 'b' (b.nii) have identical "
                     "features in every plane: one scan under 2 IDs? In subject-level splits it would sit on both "
                     "sides (bench leaves such subjects out); keep one ID"]


def test_info_fails_a_scan_the_caching_job_would_fail(tmp_path, capsys):
    """A scan with a speck of foreground kept 0 slices per plane; info said so in its table only and
    exited 0, although `slice2vol cache` fails the same file (fuzz round 10)."""
    from tests.conftest import write_nifti

    # specks over 2.5% of the grid: a volume, but no slice with 5% foreground
    data = np.where(np.random.default_rng(0).random((40, 40, 40)) < 0.025, 500.0, 0.0).astype(np.float32)
    write_nifti(tmp_path / "speck.nii.gz", data, np.diag([4.0, 4.0, 4.0, 1.0]))
    assert main(["info", str(tmp_path / "speck.nii.gz")]) == 1
    out = capsys.readouterr().out
    assert "speck.nii.gz: no sagittal/coronal/axial slice has 5% foreground or more" in out
    (tmp_path / "m.csv").write_text("subject_id,t1\ns1,speck.nii.gz\n")
    assert main(["info", "--manifest", str(tmp_path / "m.csv"), "--no-progress"]) == 1
    assert "row 2 (s1): " in capsys.readouterr().out


@pytest.mark.parametrize("flag, expected", [([], ("cuda:7", "device")), (["--device", "auto"], ("auto", "--device"))])
def test_bench_uses_the_configs_device_unless_device_is_given_even_as_auto(tmp_path, monkeypatch, flag, expected):
    """An explicit ``--device auto`` used to be taken for "not given": the config's device stood."""
    from slice2vol.commands import _common
    from slice2vol.eval import runner

    config = tmp_path / "exp.yaml"
    config.write_text("name: x\ndevice: cuda:7\n")
    seen = []

    def resolve(device, source="--device"):
        seen.append((device, source))
        raise SystemExit(0)  # stop before any data is read

    monkeypatch.setattr(_common, "resolve_device", resolve)
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("ran past the device"))
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(config), "--out", str(tmp_path / "run"), *flag])
    assert seen == [expected]


@pytest.mark.parametrize("flag, expected", [([], "cuda:7"), (["--device", "auto"], "auto"), (["--device", "cpu"], "cpu")])
def test_embed_uses_the_configs_device_unless_device_is_given_even_as_auto(tmp_path, monkeypatch, flag, expected):
    from slice2vol import config as config_module

    config = tmp_path / "enc.yaml"
    config.write_text("key: 3d/medicalnet_resnet10\ndevice: cuda:7\n")
    seen = []
    real = config_module.load_config

    def load_config(cls, path, overrides):
        seen.append(real(cls, path, overrides).device)
        raise SystemExit(0)  # stop before the cohort and the weights are read

    monkeypatch.setattr(config_module, "load_config", load_config)
    with pytest.raises(SystemExit):
        main(["embed", "--config", str(config), "--manifest", str(tmp_path / "m.csv"), "--store",
              str(tmp_path / "f.h5"), *flag])
    assert seen == [expected]


def test_the_cache_jobs_log_file_ends_with_its_summary_and_failures(tmp_path, monkeypatch, capsys):
    """The log beside the store held the per-subject warnings but not the job's summary: a batch job's
    log did not say how many subjects were cached or failed."""
    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "a.nii.gz", blob_volume(seed=0))
    (tmp_path / "b.nii.gz").write_bytes((tmp_path / "a.nii.gz").read_bytes()[:200])  # truncated
    (tmp_path / "m.csv").write_text("subject_id,t1\na,a.nii.gz\nb,b.nii.gz\n")
    assert main(["cache", "--manifest", "m.csv", "--encoder", "tv/resnet18", "--store", "s.h5", "--size", "32",
                 "--stride", "4", "--no-progress"]) == 1
    console = capsys.readouterr().err
    log = (tmp_path / "s.h5.log").read_text()
    assert "s.h5: feature set " in log and "1 subject(s) cached, 0 already present, 1 failed" in log
    failed = [line for line in console.splitlines() if line.startswith("  b: ")]
    assert len(failed) == 1 and failed[0] in log.splitlines()
    assert console.count("1 subject(s) cached") == 1  # the summary is not printed twice


def test_volume_settings_reach_cache_and_info_and_bad_ones_are_one_line(tmp_path, monkeypatch, capsys):
    """A refusal names its VolumeConfig setting, but `cache` and `info` had no way to set one."""
    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "mask.nii.gz", (blob_volume(seed=0) > 0).astype(np.uint8))
    (tmp_path / "m.csv").write_text("subject_id,t1\nm,mask.nii.gz\n")
    cache = ["cache", "--manifest", "m.csv", "--encoder", "tv/resnet18", "--store", "s.h5", "--size", "32",
             "--stride", "4", "--no-progress"]
    assert main(["info", "mask.nii.gz"]) == 2
    assert "looks like a label map or mask" in capsys.readouterr().err
    assert main(["info", "mask.nii.gz", "--volume", "refuse_label_maps=false"]) == 0
    assert main(["info", "mask.nii.gz", "--volume", "refuse_label_maps=false", "--volume", "spacing=4"]) == 0
    assert " spacing_mm: (4, 4, 4)" in capsys.readouterr().out  # one number: isotropic
    assert main(cache) == 1
    capsys.readouterr()
    # the setting is part of the feature set: the store made without it refuses these features
    assert main(cache + ["--volume", "refuse_label_maps=false"]) == 2
    assert "differs in: volume_config.refuse_label_maps: (absent) -> False" in capsys.readouterr().err
    assert main(cache + ["--volume", "spacing=2"]) == 2
    assert "--volume spacing: set it with --spacing" in capsys.readouterr().err
    assert main([*cache[:6], "s2.h5", *cache[7:], "--volume", "refuse_label_maps=false"]) == 0
    from slice2vol.cache import FeatureStore

    assert FeatureStore(tmp_path / "s2.h5").subjects() == ["m"]
    capsys.readouterr()
    for flag, message in [("foo=1", "--volume foo: not a VolumeConfig setting; known: clip_percentiles, "),
                          ("max_foreground_fraction=2", "--volume: max_foreground_fraction must be a number in "),
                          ("spacing=[2,x,2]", "--volume: spacing must be 3 voxel sizes of 0.05-20 mm (or one, "
                                              "isotropic), got [2, 'x', 2]"),
                          ("refuse_label_maps", "--volume 'refuse_label_maps': expected KEY=VALUE"),
                          ("clip_percentiles=[1,", "--volume clip_percentiles: cannot read '[1,' (expected "),
                          # fuzz round 23: YAML leaves 'inf', 'nan' and '1e9' strings; these three keys were
                          # not checked (a traceback in `info`, every subject failed in `cache`), an unknown
                          # normalize fell through to min-max, and limits could cross
                          ("max_obliquity_deg=inf", "--volume: max_obliquity_deg must be a finite number, got 'inf'"),
                          ("max_fov_mm=nan", "--volume: max_fov_mm must be a finite number, got 'nan'"),
                          ("max_obliquity_deg=-1", "--volume: max_obliquity_deg must be in [0, 90), got -1"),
                          ("normalize=ZSCORE", "--volume: normalize must be one of ('minmax', 'zscore', 'none'), "
                                               "got 'ZSCORE'"),
                          ("crop_foreground=maybe", "--volume: crop_foreground must be true or false, got 'maybe'"),
                          ("crop_margin=1.5", "--volume: crop_margin must be a whole number, got 1.5"),
                          ("min_spacing=30", "--volume: min_spacing (30 mm) must be below max_spacing (20 mm)"),
                          ("min_fov_mm=2e3", "--volume: min_fov_mm and max_fov_mm must satisfy 0 < min_fov_mm < "
                                             "max_fov_mm, got 2000 and 1000")]:
        assert main(["info", "mask.nii.gz", "--volume", flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # a number in exponent notation is a number
    assert main(["info", "mask.nii.gz", "--volume", "refuse_label_maps=false", "--volume", "max_fov_mm=1e9"]) == 0
