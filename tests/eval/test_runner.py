"""End to end: ``slice2vol bench`` on the CI config (tiny cohort, tiny encoder), then a cached rerun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cli import main
from slice2vol.eval.runner import expand, load_experiment
from tests.conftest import write_nifti

REPO = Path(__file__).resolve().parents[2]


def blob_cohort(root: Path, n: int = 12, shape=(24, 28, 20)) -> Path:
    """Ellipsoid heads whose bright core (seg 2) is larger for ``grp`` = 1; ``score`` tracks its size."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    rows = []
    for i in range(n):
        grp = i % 2
        core = 0.35 + 0.2 * grp + rng.uniform(-0.05, 0.05)
        vol = np.where(radius < 0.9, 40.0, 0.0) + np.where(radius < core, 60.0, 0.0) + rng.normal(0, 2, shape)
        seg = np.where(radius < core, 2, np.where(radius < 0.9, 1, 0)).astype(np.int16)
        write_nifti(root / f"s{i}.nii.gz", vol.astype(np.float32))
        write_nifti(root / f"s{i}_seg.nii.gz", seg)
        rows.append({"subject_id": f"s{i:02d}", "t1": f"s{i}.nii.gz", "seg": f"s{i}_seg.nii.gz", "grp": grp,
                     "score": round(core * 10, 3)})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    # brought-in features: a "region volume" table (core size + noise), keyed by its own ID column
    regions = pd.DataFrame({"MRID": [r["subject_id"] for r in rows], "core_mm3": [r["score"] * 100 for r in rows],
                            "noise": rng.normal(size=n)})
    regions.to_csv(root / "regions.csv", index=False)
    return path


OVERRIDES = [
    "cohort.labels=[grp,score]",
    "encoders=[{name: tiny, key: test/tiny_cnn, weights: random, dtype: float32, aggregators: [mean, max, mil],"
    " aggregator_params: {mil: {hidden: 8, attn_dim: 4, epochs: 5}}}]",
    "baselines={sets: [head_volume, brain_volume], chance: true}",
    "segmentation.structures={outer: [1], core: [2]}",
    "segmentation.epochs=10",
    "anomaly.max_subjects=8",
    "splits.n_folds=3",
]


def test_bench_end_to_end_and_cached_rerun(tmp_path, capsys, monkeypatch):
    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", *OVERRIDES,
            f"features={{path: {manifest.parent / 'regions.csv'}, id_column: MRID}}"]
    assert main(argv) == 0
    for name in ("report.html", "report.md", "results.csv", "paired.csv", "results.json"):
        assert (out / name).exists()
    data = json.loads((out / "results.json").read_text())
    rows = data.get("rows", data.get("results"))
    tasks = {(r["task"], r["label"]) for r in rows}
    assert {("knn", "grp"), ("linear", "grp"), ("knn", "score"), ("linear", "score"), ("segmentation", "outer"),
            ("segmentation", "core"), ("anomaly", "subject-level"), ("anomaly", "slice-level")} <= tasks
    sets = data["sets"]
    assert set(sets) == {"tiny/mean", "tiny/max", "tiny/mil", "head_volume", "brain_volume", "regions", "chance"}
    assert data["reference"] == "tiny/mean" and data["schema"] == "slice2vol.results/2"
    assert sets["tiny/mil"]["fitted"] == {"what": "mil aggregator, supervised on the evaluated label",
                                          "labels": ["grp", "score"], "scope": "inside folds"}
    assert sets["tiny/mean"]["fitted"] is None and sets["regions"]["kind"] == "features"
    assert (sets["chance"]["kind"], sets["head_volume"]["kind"]) == ("chance", "baseline")
    # every other set is compared with the reference in every probe table, Holm-adjusted per table
    assert {p["encoder"] for p in data["paired"] if p["task"] == "linear"} == set(sets) - {"tiny/mean"}
    # k-NN on a 1-D feature is only its sign: skipped, and said so
    assert {p["encoder"] for p in data["paired"] if p["task"] == "knn"} == set(sets) - {"tiny/mean", "head_volume",
                                                                                         "brain_volume"}
    assert any("head_volume" in s["name"] and "k-NN" in s["reason"] for s in data["skipped"])
    assert all(0 <= p["p_value"] <= p["p_holm"] <= 1 for p in data["paired"])
    assert len(data["summary"]) == len(sets) * 2  # one row per set x label
    chance = [r for r in rows if r["encoder"] == "chance" and r["metric"] == "roc_auc"]
    assert {r["task"] for r in chance} == {"knn", "linear"} and all(0.2 < r["estimate"] < 0.8 for r in chance)
    byo = [r["estimate"] for r in rows if r["encoder"] == "regions" and r["task"] == "linear" and r["metric"] == "roc_auc"]
    assert byo and byo[0] > 0.8  # the core size separates the groups
    for r in rows:  # both estimators in every row, the headline says which
        assert {"pooled", "fold_mean", "estimate", "estimate_kind"} <= set(r)
        assert r["estimate"] == r[r["estimate_kind"]]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(data["figures"]) >= 7
    # the bright, larger core is an easy signal for the linear probe
    auc = [r["estimate"] for r in rows if r["task"] == "linear" and r["label"] == "grp" and r["metric"] == "roc_auc"
           and r["encoder"].startswith("tiny/")]
    assert min(auc) > 0.8
    core = [r["estimate"] for r in rows if r["task"] == "segmentation" and r["label"] == "core"]
    assert min(core) > 0.3
    # same splits file for every encoder, subject-level
    (split_file,) = (out / "splits").glob("grp-*.json")
    splits = json.loads(split_file.read_text())
    assert sorted(splits["subject_ids"]) == [f"s{i:02d}" for i in range(12)]
    # rerun: everything cached (no slice embedded, no result computed again), identical numbers
    import slice2vol.extract
    from slice2vol.eval.resultcache import ResultCache

    def no_caching(*args, **kwargs):
        raise AssertionError("the rerun cached slice features again")

    computed = []
    put = ResultCache.put
    monkeypatch.setattr(slice2vol.extract, "cache_cohort", no_caching)
    monkeypatch.setattr(ResultCache, "put", lambda self, kind, key, value: (computed.append(kind),
                                                                             put(self, kind, key, value)))
    assert main(argv) == 0
    rerun = json.loads((out / "results.json").read_text())
    assert computed == []
    rerun_rows = rerun.get("rows", rerun.get("results"))
    assert [r["estimate"] for r in rerun_rows] == [r["estimate"] for r in rows]
    assert "fold-fitting:tiny/mil" not in rerun["provenance"]["timings_s"]  # fold fits come from the cache


def test_config_errors_are_clear(tmp_path):
    assert main(["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(tmp_path),
                 "tasks=[knn,clustering]"]) == 2
    with pytest.raises(ValueError, match="unknown task"):
        load_experiment(REPO / "configs/experiments/ci.yaml", ["tasks=[clustering]"])
    # fuzz round 17: a misspelt reference compared every set with the first one instead (a log warning, exit 0)
    cfg, _ = load_experiment(REPO / "configs/experiments/ci.yaml")
    made = [f"{e.name}/{agg}" for e in cfg.encoders for agg in e.aggregators]
    assert load_experiment(REPO / "configs/experiments/ci.yaml", [f"reference={made[-1]}"])[0].reference == made[-1]
    with pytest.raises(ValueError, match=rf"ci\.yaml: reference 'nosuch' is not one of the sets this experiment makes "
                                         rf"\({re.escape(made[0])}, "):
        load_experiment(REPO / "configs/experiments/ci.yaml", ["reference=nosuch"])


def test_expand_env_and_relative(monkeypatch, tmp_path):
    monkeypatch.setenv("S2V_TEST_DIR", str(tmp_path))
    assert expand("${S2V_TEST_DIR}/x.csv") == f"{tmp_path}/x.csv"
    monkeypatch.delenv("S2V_TEST_DIR")
    assert expand("${S2V_TEST_DIR:-data}/x.csv", tmp_path) == str(tmp_path / "data" / "x.csv")
    assert expand("random", tmp_path) == "random"


@pytest.mark.parametrize("name", ["ci", "demo", "ixi"])
def test_shipped_configs_load(name):
    cfg, base = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml")
    assert base == REPO and cfg.encoders


@pytest.mark.parametrize("override, message", [
    ("knn.ks=[0]", r"knn.ks must be whole numbers >= 1, got \[0\]"),  # was an AssertionError traceback
    ("n_bootstrap=-5", r"n_bootstrap must be a whole number >= 1, got -5"),  # was 'need at least one array'
    ("splits.n_folds=1", r"splits.n_folds must be a whole number >= 2, got 1"),  # was scikit-learn's words
    ("primary_k=0", r"primary_k must be a whole number >= 1, got 0"),
])
def test_out_of_range_experiment_values_name_the_key(override, message):
    from slice2vol.config import apply_overrides, from_dict, to_dict
    from slice2vol.eval.experiment import ExperimentConfig

    with pytest.raises(ValueError, match=message):
        from_dict(ExperimentConfig, apply_overrides(to_dict(ExperimentConfig()), [override]))


def test_an_encoder_option_the_family_does_not_take_is_named():
    from slice2vol.encoders import build_encoder

    # it named an internal function ("apply_preprocess_overrides() got an unexpected keyword argument")
    for key in ("timm/resnet18", "tv/mobilenet_v2"):
        with pytest.raises(ValueError, match=rf"^encoder '{key}' has no option 'nosuch'; it takes img_size, pooling, "
                                             r"gem_p, .*mean, std, crop_pct, interpolation, channel_mode$"):
            build_encoder(key, nosuch=1)


@pytest.mark.parametrize("size", ["abc", 0, (224,), [224, "x"], True])
def test_an_image_size_that_is_not_one_says_so(size):
    """``encoders.0.kwargs.img_size=abc`` used to end in 'too many values to unpack (expected 2)'."""
    from slice2vol.encoders.base import to_2tuple

    with pytest.raises(ValueError, match=r"img_size must be"):
        to_2tuple(size)
    assert to_2tuple(96) == (96, 96) and to_2tuple([64, 80]) == (64, 80)


def test_bench_goes_on_without_subjects_whose_files_are_broken(tmp_path, capsys):
    """Two unreadable subjects fail in every stage that reads them (2D cache, computed baselines,
    segmentation, anomaly): each stage leaves them out and goes on; the run exits 1 and lists them
    once each. The baselines and dense tasks used to end the whole run (or skip every set) instead."""
    manifest = blob_cohort(tmp_path / "data")
    data = tmp_path / "data"
    raw = (data / "s3.nii.gz").read_bytes()
    (data / "s3.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated
    write_nifti(data / "s6.nii.gz", np.random.default_rng(0).random((24, 28, 20, 2)).astype(np.float32))  # 4D
    # a row the manifest checks leave out (its file is missing): the cache's report repeats it, and
    # it was listed (and counted) twice
    lines = manifest.read_text().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    row = dict(zip(header, last), subject_id="s99", **{header[1]: "missing.nii.gz"})
    manifest.write_text("\n".join(lines + [",".join(row[h] for h in header)]) + "\n")
    out = tmp_path / "run"
    argv = ["bench", "--config", "experiments/ci", "--out", str(out), "--no-progress",  # a packaged config by name
            f"cohort.manifest={manifest}", *OVERRIDES, "encoders.0.aggregators=[mean]", "tasks=[knn,segmentation,anomaly]",
            "segmentation.epochs=2", "splits.n_folds=2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    failures = results["cohort"]["failures"]
    assert len(failures) == 3 and {f.split(":")[0] for f in failures} == {"s03", "s06", "s99"}
    assert "truncated" in "".join(failures) and "4D data with 2 volumes" in "".join(failures)
    assert "3 subject(s) failed or were left out" in err
    assert results["sets"]["head_volume"]["n"] == 10
    rows = results["rows"]
    assert {(r["task"], r["label"]) for r in rows} >= {("knn", "grp"), ("segmentation", "core"),
                                                       ("anomaly", "subject-level")}
    assert sorted(results["tasks"]["segmentation"]["subjects"]) == [f"s{i:02d}" for i in range(12) if i not in (3, 6)]
    left_out = {s["name"] for s in results["skipped"]}
    assert {"segmentation: subject s03", "segmentation: subject s06", "anomaly: subject s03",
            "anomaly: subject s06"} <= left_out


def test_a_subject_left_out_of_a_dense_task_only_makes_the_run_exit_1(tmp_path, capsys):
    """Fuzz round 15: a seg map off the image grid left its subject out of the segmentation task (one
    warning, a 'Skipped' entry) while the run exited 0, as if nothing had been left out."""
    manifest = blob_cohort(tmp_path / "data")
    import nibabel as nib

    seg = tmp_path / "data" / "s5_seg.nii.gz"
    image = nib.load(str(seg))
    shifted = image.affine.copy()
    shifted[0, 3] += 4.0  # 4 mm off the image's grid
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), shifted), str(seg))
    out = tmp_path / "run"
    argv = ["bench", "--config", "experiments/ci", "--out", str(out), "--no-progress", f"cohort.manifest={manifest}",
            *OVERRIDES, "encoders.0.aggregators=[mean]", "baselines={sets: [], chance: false}",
            "tasks=[knn,segmentation]", "segmentation.epochs=2", "splits.n_folds=2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "[bench] 1 subject(s) left out of a task (listed in the report):" in err
    assert "  segmentation: subject s05: " in err and "seg map is not on the image grid" in err
    results = json.loads((out / "results.json").read_text())
    assert results["cohort"]["failures"] == [] and "s05" not in results["tasks"]["segmentation"]["subjects"]


@pytest.mark.parametrize("relabel, expected", [
    # fuzz round 15: an all-zero seg map was taken as truth (every voxel background) without a word
    (lambda labels: np.zeros_like(labels), "the seg map labels no voxel (all 0)"),
    # fuzz round 17: a map of another label table (the structures are labels 1 and 2) trained the
    # probe on its whole head as background
    (lambda labels: np.where(labels > 0, labels + 6, 0), "the seg map holds none of the labels of "
                                                         "segmentation.structures (1, 2); it holds 7, 8 (another atlas "
                                                         "or label table?)"),
])
def test_a_seg_map_without_the_structures_leaves_its_subject_out_of_the_dense_tasks(relabel, expected, tmp_path,
                                                                                    capsys):
    import nibabel as nib

    manifest = blob_cohort(tmp_path / "data")
    seg = tmp_path / "data" / "s4_seg.nii.gz"
    image = nib.load(str(seg))
    labels = np.asanyarray(image.dataobj).astype(np.int16)
    assert set(np.unique(labels)) == {0, 1, 2}
    nib.save(nib.Nifti1Image(relabel(labels).astype(np.int16), image.affine), str(seg))
    out = tmp_path / "run"
    argv = ["bench", "--config", "experiments/ci", "--out", str(out), "--no-progress", f"cohort.manifest={manifest}",
            *OVERRIDES, "encoders.0.aggregators=[mean]", "baselines={sets: [], chance: false}",
            "tasks=[knn,segmentation]", "segmentation.epochs=2", "splits.n_folds=2"]
    assert main(argv) == 1
    assert f"  segmentation: subject s04: {seg}: {expected}" in capsys.readouterr().err


def test_overlapping_structures_are_refused_before_any_caching(tmp_path, capsys):
    """Fuzz round 15: the refusal came after the encoders had cached every subject, and named one structure."""
    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["bench", "--config", "experiments/ci", "--out", str(out), "--no-progress", f"cohort.manifest={manifest}",
            *OVERRIDES, "segmentation.structures={outer: [1, 2], core: [2]}", "tasks=[segmentation]"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "slice2vol bench: error: segmentation.structures: label 2 is in two structures ('outer' and 'core'); a voxel "
        "can be in one class only")
    assert not (out / "stores").exists()


def test_bench_with_more_folds_than_the_cohort_allows_is_refused_before_caching(tmp_path, capsys):
    """Fuzz round 17: every label was skipped after all the caching, exit 1."""
    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", *OVERRIDES, "encoders.0.aggregators=[mean]", "baselines={sets: []}",
            "tasks=[knn]", "splits.n_folds=7"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"slice2vol bench: error: {manifest}: 12 subject(s) to benchmark, but splits.n_folds=7 needs at least 14 "
        "(2 x n_folds) for the k-NN and linear probes; lower splits.n_folds or add subjects")
    assert not (out / "stores").exists()


def test_bench_with_more_folds_than_a_labels_subjects_allow_says_so_and_exits_1(tmp_path, capsys):
    manifest = blob_cohort(tmp_path / "data")
    table = pd.read_csv(manifest)
    table.loc[:1, ["grp", "score"]] = np.nan  # 10 of the 12 subjects have values
    table.to_csv(manifest, index=False)
    out = tmp_path / "run"
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", *OVERRIDES, "encoders.0.aggregators=[mean]", "baselines={sets: []}",
            "tasks=[knn]", "splits.n_folds=6"]
    assert main(argv) == 1
    assert "no result: every task or label was skipped" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    skipped = {s["name"]: s["reason"] for s in results["skipped"]}
    assert skipped["label grp"] == ("10 subjects have a value and an embedding in every set (10 have a value, 12 are "
                                    "in every set): fewer than 2 x splits.n_folds = 12")
    assert "label grp: skipped" in (out / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("plots=[pca3d]", r"ci.yaml: unknown plot\(s\) \['pca3d'\]; known: umap, tsne"),  # a warning after every probe
    ("primary_k=7", r"ci.yaml: primary_k=7 is not one of knn.ks \[3, 5\]"),  # k=3 became the headline silently
])
def test_plots_and_primary_k_are_checked_with_the_config(override, message):
    from slice2vol.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_experiment(REPO / "configs/experiments/ci.yaml", [override])


def test_no_set_left_says_which_optional_encoders_were_skipped(tmp_path, capsys):
    manifest = blob_cohort(tmp_path / "data", n=4)
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(tmp_path / "run"),
            "--no-progress", f"cohort.manifest={manifest}", "cohort.labels=[grp]", "baselines={sets: [], chance: true}",
            "encoders3d=[]", f"encoders=[{{name: local, key: test/tiny_cnn, weights: {tmp_path / 'none.pth'}, "
            "optional: true}]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"(skipped: local: weights file {tmp_path / 'none.pth'} not found)")


def test_a_cohort_whose_every_image_is_broken_says_so(tmp_path, capsys):
    manifest = blob_cohort(tmp_path / "data", n=4)
    for i in range(4):
        (manifest.parent / f"s{i}.nii.gz").write_bytes(b"garbage %d" % i)  # four broken files, not copies
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(tmp_path / "run"),
            "--no-progress", f"cohort.manifest={manifest}", *OVERRIDES, "encoders.0.aggregators=[mean]",
            "baselines={sets: [], chance: true}", "tasks=[knn]", "splits.n_folds=2"]
    assert main(argv) == 2  # was: 'run/stores/tiny-....h5: the store holds no cached slice features'
    err = capsys.readouterr().err.strip()
    assert "encoder 'tiny': no subject of the cohort could be cached (4 failed; first: s00: " in err
    assert "s0.nii.gz: not a NIfTI image" in err


def test_the_chance_note_gives_the_majority_class_accuracy_per_categorical_label():
    from types import SimpleNamespace

    from slice2vol.eval.runner import _chance_note

    frames = {"sex": SimpleNamespace(kind="categorical", y=np.array(["F"] * 7 + ["M"] * 3)),
              "age": SimpleNamespace(kind="continuous", y=np.arange(10.0))}
    note = _chance_note(frames)
    assert "sex 0.700 ('F')" in note and "age" not in note.split("accuracy")[1]
