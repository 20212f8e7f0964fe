"""The caching job: features vs direct encode, SIGKILL resume, shards + merge, failures, refusals,
float16 range checks, verified resume, input fingerprints, lock conflicts, cluster scripts (issue 14)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cache import FeatureStore, StaleEmbeddings, StoreMismatch
from slice2vol.cli import main
from slice2vol.data.manifest import load_manifest, load_subject
from slice2vol.data.slicing import SliceConfig, slice_volume
from slice2vol.encoders import build_encoder
from slice2vol.extract import cache_cohort, parse_shard, shard_from_env, shard_path
from tests._tiny_encoder import KEY, TinyEncoder, make_tiny_cohort
from tests.conftest import blob_volume, fail_subject, shared_weight, write_nifti

REPO = Path(__file__).resolve().parents[1]
SLICES = SliceConfig(size=32, stride=2)
CLI_ARGS = ["--encoder", KEY, "--size", "32", "--stride", "2", "--batch-size", "5", "--no-progress"]


def assert_fp16_close(stored: np.ndarray, reference: np.ndarray) -> None:
    """float16 keeps ~11 bits: relative error <= 2^-11 per value, plus the scale of the row."""
    scale = np.abs(reference).max()
    np.testing.assert_allclose(stored, reference, rtol=2e-3, atol=2e-3 * scale)


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert sorted(a.subjects()) == sorted(b.subjects())
    assert a.planes == b.planes and a.feature_set == b.feature_set
    for sid in a.subjects():
        for plane in a.planes:
            # batches are packed differently in the two runs: allow float16 rounding of conv results
            assert_fp16_close(a.slice_features(sid, plane), b.slice_features(sid, plane))
            np.testing.assert_array_equal(a.slice_meta(sid, plane)["indices"], b.slice_meta(sid, plane)["indices"])
    assert a.labels().sort_index().equals(b.labels().sort_index())


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_tiny_cohort(tmp_path / "cohort", n=6)


def test_features_equal_direct_encode(manifest: Path, tmp_path: Path) -> None:
    cohort = load_manifest(manifest)
    report = cache_cohort(cohort, KEY, tmp_path / "f.h5", slice_cfg=SLICES, batch_size=7,
                          save_tokens=True, progress=False, commit_every=2)
    assert report.ok and report.done == cohort.ids and report.skipped == []
    encoder = build_encoder(KEY)
    store = FeatureStore(tmp_path / "f.h5")
    total = 0
    for subject in cohort.subjects:
        sliced = slice_volume(load_subject(subject), SLICES)
        for plane, ps in sliced.items():
            with torch.inference_mode():
                reference = encoder.encode(ps.images).numpy()
                tokens, grid = encoder.tokens(ps.images)
            stored = store.slice_features(subject.subject_id, plane)
            assert stored.shape == (len(ps), 16) and stored.dtype == np.float32
            assert_fp16_close(stored, reference)
            meta = store.slice_meta(subject.subject_id, plane)
            np.testing.assert_array_equal(meta["indices"], ps.indices)
            np.testing.assert_allclose(meta["positions"], ps.positions, atol=1e-4)
            cached_tokens, cached_grid = store.slice_tokens(subject.subject_id, plane)
            assert cached_grid == grid == (4, 4)
            assert_fp16_close(cached_tokens, tokens.numpy())
            total += len(ps)
    assert report.slices == total
    prov = store.provenance
    assert prov["encoder"] == KEY and prov["dtype"] == "float16" and prov["tokens"] is True
    assert prov["slice_config"]["size"] == 32 and "planes" not in prov["slice_config"]
    assert prov["versions"]["torch"] == importlib.metadata.version("torch")
    assert len(prov["state_sha256"]) == 64 and prov["host"] and prov["created"]
    labels = store.labels()
    assert store.label_types == {"age": "continuous", "sex": "categorical"}
    assert labels.loc["sub3", "age"] == pytest.approx(20.5 + 7.25 * 3) and labels.loc["sub3", "sex"] == "F"
    assert not store.parts_dir.exists()  # compacted into one file


@pytest.mark.parametrize("reader", ["thread", "process"])
def test_workers_give_the_same_store(manifest: Path, tmp_path: Path, reader: str) -> None:
    cohort = load_manifest(manifest).subset(["sub0", "sub1", "sub2"])
    one = cache_cohort(cohort, KEY, tmp_path / "w0.h5", slice_cfg=SLICES, batch_size=4, num_workers=0,
                       progress=False)
    two = cache_cohort(cohort, KEY, tmp_path / "w2.h5", slice_cfg=SLICES, batch_size=16, num_workers=2,
                       reader=reader, progress=False)
    assert one.ok and two.ok and one.slices == two.slices
    assert_same_store(FeatureStore(tmp_path / "w0.h5"), FeatureStore(tmp_path / "w2.h5"))


def wait_for_parts(proc: subprocess.Popen, parts: Path, n: int, timeout: float = 90) -> None:
    """Returns once the job ``proc`` has committed ``n`` parts into the folder ``parts``."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(parts.glob("part-*.h5"))) < n:
        assert proc.poll() is None, "the job ended before it could be stopped; raise TINY_ENCODER_DELAY"
        time.sleep(0.02)


def _job_command(manifest: Path, out: Path) -> list[str]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests._tiny_encoder; "
            "from slice2vol.cli import main; sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(REPO), "cache", "--manifest", str(manifest), "--store", str(out),
            *CLI_ARGS, "--commit-every", "1", "--workers", "0"]


def test_sigkill_mid_run_then_resume(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    env = {**os.environ, "TINY_ENCODER_DELAY": "0.12", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_job_command(manifest, out), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_name(out.name + ".parts")
    try:
        wait_for_parts(proc, parts, 2)
        time.sleep(0.05)  # land somewhere inside the next subject (encoding or writing)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # the store opens after the kill and holds whole subjects only, each once
    killed = FeatureStore(out)
    committed = killed.subjects()
    assert 2 <= len(committed) < 6
    assert len(set(committed)) == len(committed)
    for sid in committed:
        for plane in killed.planes:
            assert np.isfinite(killed.slice_features(sid, plane)).all()
    killed.close()

    cohort = load_manifest(manifest)
    report = cache_cohort(cohort, KEY, out, slice_cfg=SLICES, batch_size=5, progress=False)
    assert report.ok
    assert sorted(report.skipped) == sorted(committed)  # none that completed was recomputed
    assert sorted(report.done) == sorted(set(cohort.ids) - set(committed))
    assert not parts.exists() and not list(tmp_path.glob("*.tmp"))

    fresh = cache_cohort(cohort, KEY, tmp_path / "fresh.h5", slice_cfg=SLICES, batch_size=5, progress=False)
    assert fresh.ok
    resumed = FeatureStore(out)
    assert sorted(resumed.subjects()) == sorted(cohort.ids)
    assert_same_store(resumed, FeatureStore(tmp_path / "fresh.h5"))
    assert [e["event"] for e in resumed.history] == ["cache"]  # the killed run never finished


def test_shards_and_merge_equal_single_run(manifest: Path, tmp_path: Path) -> None:
    base = ["cache", "--manifest", str(manifest), *CLI_ARGS]
    assert main([*base, "--out", str(tmp_path / "single.h5")]) == 0  # --out: the deprecated alias of --store
    for i in (0, 1):
        assert main([*base, "--store", str(tmp_path / "sh.h5"), "--shard", f"{i}/2"]) == 0
    shards = [tmp_path / "sh.shard-0-of-2.h5", tmp_path / "sh.shard-1-of-2.h5"]
    assert [len(FeatureStore(p).subjects()) for p in shards] == [3, 3]
    assert set(FeatureStore(shards[0]).subjects()).isdisjoint(FeatureStore(shards[1]).subjects())
    assert main(["cache", "merge", "--store", str(tmp_path / "merged.h5"), *map(str, shards)]) == 0
    merged = FeatureStore(tmp_path / "merged.h5")
    assert_same_store(merged, FeatureStore(tmp_path / "single.h5"))
    assert merged.history[-1]["event"] == "merge"


def test_merge_refuses_one_id_made_from_two_scans_and_names_overlapping_copies(manifest: Path, tmp_path: Path,
                                                                                 capsys, caplog) -> None:
    """Fuzz round 16: two inputs holding sub0 made from different files merged silently ('kept the first
    copy', no subject named), so the merged store depended on the order of the arguments."""
    from slice2vol.cache import merge_stores

    cohort = load_manifest(manifest)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert cache_cohort(cohort.subset(["sub0", "sub1"]), KEY, a, slice_cfg=SLICES, progress=False).ok
    assert cache_cohort(cohort.subset(["sub0", "sub2"]), KEY, b, slice_cfg=SLICES, progress=False).ok
    with caplog.at_level("WARNING"):
        merge_stores(tmp_path / "same.h5", [a, b])  # the same file under sub0 in both: one copy, said
    assert "1 subject(s) appeared in several inputs, made from the same files (e.g. sub0;" in caplog.text
    write_nifti(manifest.parent / "sub0.nii.gz", blob_volume((24, 28, 20), seed=77))  # another scan for sub0
    c = tmp_path / "c.h5"
    assert cache_cohort(cohort.subset(["sub0", "sub3"]), KEY, c, slice_cfg=SLICES, progress=False).ok
    assert main(["cache", "merge", "--store", str(tmp_path / "ac.h5"), str(a), str(c)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"subject 'sub0' is in {a} and {c} made from different t1 files" in err
    assert not (tmp_path / "ac.h5").exists()


def test_merge_refuses_other_provenance(manifest: Path, tmp_path: Path, capsys) -> None:
    base = ["cache", "--manifest", str(manifest), *CLI_ARGS, "--shard", "0/2"]
    assert main([*base, "--store", str(tmp_path / "a.h5")]) == 0
    assert main([*base[:-2], "--shard", "1/2", "--store", str(tmp_path / "b.h5"), "--encoder-arg", "img_size=40"]) == 0
    code = main(["cache", "merge", "--store", str(tmp_path / "ab.h5"), str(tmp_path / "a.shard-0-of-2.h5"),
                 str(tmp_path / "b.shard-1-of-2.h5")])
    err = capsys.readouterr().err
    assert code == 2
    assert "encoder_kwargs.img_size" in err and "encoder_info.input_size" in err
    assert not (tmp_path / "ab.h5").exists()
    with pytest.raises(StoreMismatch, match="img_size"):
        from slice2vol.cache import merge_stores

        merge_stores(tmp_path / "ab.h5", [tmp_path / "a.shard-0-of-2.h5", tmp_path / "b.shard-1-of-2.h5"])


def test_corrupt_volume_others_finish_exit_1(tmp_path: Path, capsys) -> None:
    manifest = make_tiny_cohort(tmp_path / "cohort", n=3, corrupt=True)
    out = tmp_path / "c.h5"
    code = main(["cache", "--manifest", str(manifest), "--store", str(out), *CLI_ARGS])
    err = capsys.readouterr().err
    assert code == 1
    assert "1 subject(s) failed" in err and "bad: " in err and "bad.nii.gz" in err
    store = FeatureStore(out)
    assert sorted(store.subjects()) == ["sub0", "sub1", "sub2"]
    recorded = store.history[-1]["failures"]
    assert [f["subject_id"] for f in recorded] == ["bad"] and "bad.nii.gz" in recorded[0]["message"]
    # a rerun retries only the failed subject
    report = cache_cohort(load_manifest(manifest), KEY, out, slice_cfg=SLICES, progress=False)
    assert report.done == [] and sorted(report.skipped) == ["sub0", "sub1", "sub2"]
    assert [f.subject_id for f in report.failures] == ["bad"]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unexpected_error_in_one_subject_fails_that_subject_only(tmp_path: Path, monkeypatch,
                                                                    workers: int) -> None:
    """Any exception a subject's files cause (here a TypeError from deep inside loading) is recorded as
    that subject's failure, naming its file and the error type; the job caches the others."""
    import slice2vol.extract as extract

    manifest = make_tiny_cohort(tmp_path / "cohort", n=3)
    fail_subject(monkeypatch, extract, "sub1", TypeError("cannot promote void to float32"))
    report = cache_cohort(load_manifest(manifest), KEY, tmp_path / "u.h5", slice_cfg=SLICES, progress=False,
                          num_workers=workers)
    assert sorted(report.done) == ["sub0", "sub2"]
    assert [f.subject_id for f in report.failures] == ["sub1"]
    message = report.failures[0].message
    assert "sub1" in message and "TypeError: cannot promote void to float32" in message and "\n" not in message
    assert sorted(FeatureStore(tmp_path / "u.h5").subjects()) == ["sub0", "sub2"]


def test_refuses_append_under_another_config(manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.h5"
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False)
    before = out.stat().st_mtime_ns
    code = main(["cache", "--manifest", str(manifest), "--store", str(out), *CLI_ARGS[:-5], "--stride", "3",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "slice_config.stride: 2 -> 3" in err and "another store" in err
    assert out.stat().st_mtime_ns == before and FeatureStore(out).subjects() == ["sub0", "sub1"]
    # the same settings with another plane add to the same feature set
    more = cache_cohort(cohort, KEY, out, slice_cfg=SliceConfig(planes=("axial",), size=32, stride=2),
                        progress=False)
    assert more.skipped == ["sub0", "sub1"] and more.done == []


def test_a_store_cached_before_a_new_refusal_gate_keeps_its_feature_set(manifest: Path, tmp_path: Path) -> None:
    """min_extent_ratio (a gate: it refuses files, never changes the features of the others) joined
    VolumeConfig after stores existed: recorded at its default, it made every older store "another
    feature set" (StoreMismatch: volume_config.min_extent_ratio: 0.2 -> (absent))."""
    from slice2vol.data.io import VolumeConfig

    out = tmp_path / "old.h5"
    cohort = load_manifest(manifest)
    cache_cohort(cohort.subset(["sub0", "sub1"]), KEY, out, slice_cfg=SLICES, progress=False)
    # recorded only when changed: the provenance of a store written before the gate existed
    assert "min_extent_ratio" not in FeatureStore(out).provenance["volume_config"]
    more = cache_cohort(cohort.subset(["sub0", "sub1", "sub2"]), KEY, out, slice_cfg=SLICES, progress=False)
    assert more.skipped == ["sub0", "sub1"] and more.done == ["sub2"]
    changed = cache_cohort(cohort.subset(["sub3"]), KEY, tmp_path / "new.h5", slice_cfg=SLICES, progress=False,
                           volume_cfg=VolumeConfig(min_extent_ratio=0.1))
    assert changed.done == ["sub3"]
    assert FeatureStore(tmp_path / "new.h5").provenance["volume_config"]["min_extent_ratio"] == 0.1


def test_a_subject_without_slices_in_a_plane_fails_and_the_others_are_cached(manifest: Path, tmp_path: Path) -> None:
    """A subject with an empty plane used to be stored as complete: its empty bag then stopped every
    aggregation of the store (and the bench) for the whole cohort."""
    cohort = load_manifest(manifest)
    # specks over 2.5% of the grid: enough foreground for a volume, but no slice reaches 5%
    blank = np.where(np.random.default_rng(0).random((40, 40, 40)) < 0.025, 100.0, 0.0).astype(np.float32)
    small = write_nifti(tmp_path / "small.nii.gz", blank)
    cohort.subjects.append(dataclasses.replace(cohort.subjects[0], subject_id="small", images={"T1": small}))
    report = cache_cohort(cohort, KEY, tmp_path / "e.h5", slice_cfg=SLICES, progress=False)
    (failure,) = report.failures
    assert failure.subject_id == "small" and failure.message.startswith(f"{small}: no axial, coronal or sagittal "
                                                                           "slice has 5% foreground or more")
    fullest = re.search(r"the fullest of the slices looked at, stride 2, has ([\d.]+)%", failure.message)
    assert fullest and 2.5 < float(fullest.group(1)) < 5
    store = FeatureStore(tmp_path / "e.h5")
    assert sorted(store.subjects()) == sorted(cohort.ids[:-1])
    # a threshold no slice meets fails every subject, naming each file
    strict = cache_cohort(load_manifest(manifest).subset(["sub0"]), KEY, tmp_path / "s.h5",
                          slice_cfg=SliceConfig(size=32, stride=2, min_foreground=0.99), progress=False)
    assert not strict.ok and "slice has 99% foreground or more" in strict.failures[0].message


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, None),
    # SLURM array variables never make a shard: --array=3 (a rerun of one task) used to become 0/1
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "3"}, None),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, None),
])
def test_shard_from_env(env: dict, expected) -> None:
    assert shard_from_env(env) == expected


def test_shard_parsing_and_paths() -> None:
    assert parse_shard("1/3") == (1, 3) and parse_shard((0, 1)) == (0, 1) and parse_shard(None) is None
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    assert shard_path("out/feats.h5", 3, 12).name == "feats.shard-03-of-12.h5"


@pytest.mark.ixi
@pytest.mark.parametrize("n_subjects", [2, pytest.param(48, marks=pytest.mark.slow)])
def test_ixi_mobilenet_small(ixi_manifest: Path, tmp_path: Path, n_subjects: int) -> None:
    from slice2vol.encoders import ENCODERS

    if "tv/mobilenet_v2" not in ENCODERS:
        pytest.skip("tv/mobilenet_v2 not registered")
    weights = shared_weight("mobilenet_v2-b0353104.pth")  # skips, naming SLICE2VOL_WEIGHTS, when absent
    weights_arg = str(weights)
    cohort = load_manifest(ixi_manifest)
    cohort = cohort.subset(cohort.ids[:n_subjects])
    cfg = SliceConfig(size=64, stride=8)
    report = cache_cohort(cohort, "tv/mobilenet_v2", tmp_path / "ixi.h5", weights=weights_arg,
                          encoder_kwargs={"img_size": 64}, slice_cfg=cfg, batch_size=16, progress=False,
                          num_workers=1)
    assert report.ok and len(report.done) == n_subjects
    store = FeatureStore(tmp_path / "ixi.h5")
    from slice2vol.encoders import sha256_file

    assert store.provenance["weights_sha256"] == sha256_file(weights) and store.provenance["dtype"] == "float16"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = build_encoder("tv/mobilenet_v2", weights=weights_arg, img_size=64)
    for subject in cohort.subjects[1:]:  # every plane of every subject but the first
        sliced = slice_volume(load_subject(subject, with_seg=False), cfg)
        for plane, ps in sliced.items():
            with torch.inference_mode():
                reference = encoder.encode(ps.images).numpy()
            assert_fp16_close(store.slice_features(subject.subject_id, plane), reference)
    assert set(store.labels().columns) >= {"age", "sex"}


def test_empty_shard_still_makes_a_mergeable_store(manifest: Path, tmp_path: Path) -> None:
    cohort = load_manifest(manifest).subset(["sub0"])
    empty = cache_cohort(cohort, KEY, tmp_path / "e.h5", slice_cfg=SLICES, shard="1/2", progress=False)
    full = cache_cohort(cohort, KEY, tmp_path / "e.h5", slice_cfg=SLICES, shard="0/2", progress=False)
    assert empty.done == [] and full.done == ["sub0"] and empty.feature_set == full.feature_set
    assert FeatureStore(empty.store).feature_set == full.feature_set  # provenance even without subjects
    from slice2vol.cache import merge_stores

    merge_stores(tmp_path / "m.h5", [full.store, empty.store])
    assert FeatureStore(tmp_path / "m.h5").subjects() == ["sub0"]


def test_exception_keeps_completed_subjects(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    cohort = load_manifest(manifest)
    monkeypatch.setenv("TINY_ENCODER_FAIL_AFTER", "8")
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        cache_cohort(cohort, KEY, tmp_path / "x.h5", slice_cfg=SLICES, batch_size=5, commit_every=100,
                     progress=False)
    kept = FeatureStore(tmp_path / "x.h5").subjects()
    assert 1 <= len(kept) < 6  # committed on the way out although commit_every was not reached
    monkeypatch.delenv("TINY_ENCODER_FAIL_AFTER")
    report = cache_cohort(cohort, KEY, tmp_path / "x.h5", slice_cfg=SLICES, batch_size=5, progress=False)
    assert sorted(report.skipped) == sorted(kept) and len(report.done) == 6 - len(kept)


# -- float16 range checks (issue 14 point 2) -------------------------------------------------------
class ScaledTiny(TinyEncoder):
    """The tiny encoder with its features multiplied by ``scale`` (1e-8: the size of random-init
    MobileNetV2 features, which float16 stores as exact zeros; 1e6: beyond float16)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(x) * self.scale


@pytest.mark.parametrize("scale", [1e-8, 1e6])
def test_float16_out_of_range_falls_back_to_float32(manifest: Path, tmp_path: Path, scale: float) -> None:
    cohort = load_manifest(manifest).subset(["sub0", "sub1", "sub2"])
    out = tmp_path / "tiny.h5"
    report = cache_cohort(cohort, ScaledTiny(scale), out, slice_cfg=SLICES, batch_size=5, progress=False)
    assert report.ok and len(report.done) == 3
    assert any("storing this feature set as float32" in n for n in report.notes)
    store = FeatureStore(out)
    prov = store.provenance
    assert prov["dtype"] == "float32" and prov["dtype_fallback"]["requested"] == "float16"
    assert ("underflow" if scale < 1 else "overflow") in prov["dtype_fallback"]["reason"]
    encoder = ScaledTiny(scale)
    sliced = slice_volume(load_subject(cohort.subjects[1]), SLICES)
    with torch.inference_mode():
        reference = encoder.encode(sliced["axial"].images).numpy()
    stored = store.slice_features("sub1", "axial")
    assert np.abs(stored).min() > 0 or np.abs(reference).min() == 0  # never silent zeros
    np.testing.assert_allclose(stored, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
    # a rerun with the default dtype keeps the store's float32 (same feature set): nothing recomputed
    more = cache_cohort(load_manifest(manifest).subset(["sub0", "sub1", "sub2", "sub3"]), ScaledTiny(scale), out,
                        slice_cfg=SLICES, batch_size=5, progress=False)
    assert more.ok and more.skipped == ["sub0", "sub1", "sub2"] and more.done == ["sub3"]
    assert FeatureStore(out).provenance["dtype"] == "float32"


def test_float16_underflow_in_an_existing_float16_store_fails_the_subject(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed.h5"
    cohort = load_manifest(manifest)
    first = cache_cohort(cohort.subset(["sub0"]), ScaledTiny(1.0), out, slice_cfg=SLICES, progress=False)
    assert first.ok and FeatureStore(out).provenance["dtype"] == "float16"
    tiny = ScaledTiny(1.0)
    tiny.scale = 1e-8  # same parameters, same feature set, but these features do not fit float16
    report = cache_cohort(cohort.subset(["sub0", "sub1"]), tiny, out, slice_cfg=SLICES, progress=False)
    assert [f.subject_id for f in report.failures] == ["sub1"]
    assert "underflow float16" in report.failures[0].message and "--dtype float32" in report.failures[0].message
    assert FeatureStore(out).subjects() == ["sub0"]


def test_random_mobilenet_is_not_stored_as_zeros(manifest: Path, tmp_path: Path, capsys) -> None:
    """The issue's case: random-init tv/mobilenet_v2 gives ~1e-8 features; float16 made them 0."""
    out = tmp_path / "mnv2.h5"
    small = make_tiny_cohort(tmp_path / "two", n=2)
    code = main(["cache", "--manifest", str(small), "--store", str(out), "--encoder", "tv/mobilenet_v2",
                 "--weights", "random", "--encoder-arg", "img_size=64", "--size", "64", "--stride", "4",
                 "--planes", "axial", "--no-progress"])
    assert code == 0
    assert "float32" in capsys.readouterr().out
    store = FeatureStore(out)
    X = store.slice_features("sub0", "axial")
    assert store.provenance["dtype"] == "float32" and np.linalg.norm(X, axis=1).min() > 0
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the job's seed for random weights
        encoder = build_encoder("tv/mobilenet_v2", weights="random", img_size=64)
    sliced = slice_volume(load_subject(load_manifest(small).subjects[0]),
                          SliceConfig(planes=("axial",), size=64, stride=4))
    with torch.inference_mode():
        reference = encoder.encode(sliced["axial"].images).numpy()
    assert np.abs(reference).max() < 1e-7  # the scale float16 cannot hold
    np.testing.assert_allclose(X, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


# -- verified resume (issue 14 point 4) --------------------------------------------------------------
def _raw(store: FeatureStore, sid: str, plane: str) -> bytes:
    group, start, stop = store._where(sid, plane)
    return group["features"][start:stop].tobytes()


def test_flipped_bit_caught_by_verify_and_recomputed_on_resume(manifest: Path, tmp_path: Path, capsys) -> None:
    base = ["cache", "--manifest", str(manifest), *CLI_ARGS]
    damaged, clean = tmp_path / "damaged.h5", tmp_path / "clean.h5"
    assert main([*base, "--store", str(damaged)]) == 0
    assert main([*base, "--store", str(clean)]) == 0
    assert main(["cache", "verify", "--store", str(damaged)]) == 0
    with FeatureStore(damaged) as store:
        group, start, stop = store._where("sub3", "coronal")
        byte = (start + 1) * group["features"].shape[1] * 2 + 7  # a value of sub3's second coronal slice
    from tests.test_cache import flip_bit

    flip_bit(damaged, "planes/coronal/features", byte=byte, bit=2)
    capsys.readouterr()
    assert main(["cache", "verify", str(damaged)]) == 1
    err = capsys.readouterr().err
    assert "1 damaged" in err and "damaged: sub3 coronal: features fail their checksum" in err
    # aggregate (any reader) leaves the damaged subject out instead of using it, and says so (exit 1)
    assert main(["aggregate", "--store", str(damaged), "--method", "mean", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "damaged.h5: subject 'sub3' coronal features fail their checksum" in err
    assert "sub3" not in FeatureStore(damaged).volume_embeddings("mean")[0]
    # resume: only the damaged subject is recomputed, the store verifies, the others are untouched
    report = cache_cohort(load_manifest(manifest), KEY, damaged, slice_cfg=SLICES, batch_size=5, progress=False)
    assert report.ok and report.done == ["sub3"] and sorted(report.skipped) == ["sub0", "sub1", "sub2", "sub4", "sub5"]
    assert "stored coronal rows are damaged" in report.recomputed["sub3"]
    assert main(["cache", "verify", "--store", str(damaged)]) == 0
    resumed, reference = FeatureStore(damaged), FeatureStore(clean)
    for sid in reference.subjects():
        for plane in reference.planes:
            if sid != "sub3":  # bit-identical: never rewritten from anything but their own bytes
                assert _raw(resumed, sid, plane) == _raw(reference, sid, plane)
            else:
                assert_fp16_close(resumed.slice_features(sid, plane), reference.slice_features(sid, plane))
    assert not resumed.parts_dir.exists()


# -- input fingerprints (issue 14 point 5) ----------------------------------------------------------
def test_changed_input_is_recomputed(manifest: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "fp.h5"
    cohort = load_manifest(manifest).subset(["sub0", "sub1", "sub2"])
    assert cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False).ok
    before = FeatureStore(out).slice_features("sub0", "axial")
    # a touched file (same bytes, new mtime) is not a change ...
    os.utime(manifest.parent / "sub0.nii.gz", ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False)
    assert touched.done == [] and touched.recomputed == {}
    # ... a new image under the same name is
    write_nifti(manifest.parent / "sub1.nii.gz", blob_volume((24, 28, 20), seed=99))
    caplog.clear()
    report = cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False)
    assert report.done == ["sub1"] and sorted(report.skipped) == ["sub0", "sub2"]
    assert report.recomputed["sub1"].startswith("input changed since it was cached (t1 (sub1.nii.gz):")
    assert any("sub1: input changed since it was cached" in r.message for r in caplog.records)
    store = FeatureStore(out)
    sliced = slice_volume(load_subject(cohort.subjects[1]), SLICES)
    with torch.inference_mode():
        reference = build_encoder(KEY).encode(sliced["axial"].images).numpy()
    assert_fp16_close(store.slice_features("sub1", "axial"), reference)
    np.testing.assert_array_equal(store.slice_features("sub0", "axial"), before)
    stored = store.subject_inputs("sub1", "sagittal")
    assert stored["files"]["t1"]["sha256"] and stored["oblique"] == {"degrees": 0.0, "action": "none"}
    assert "recomputed" in store.history[-1] and "sub1" in store.history[-1]["recomputed"]


def test_a_changed_input_voids_the_stored_planes_a_planes_job_does_not_compute(manifest: Path, tmp_path: Path,
                                                                                caplog) -> None:
    """`cache --planes axial` after sub1's scan was replaced recomputed axial only: the stored coronal and
    sagittal rows of the old scan stayed beside it (a 3-plane fusion mixed two scans)."""
    out = tmp_path / "planes.h5"
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    assert cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False).ok
    before = FeatureStore(out).slice_features("sub0", "coronal")
    write_nifti(manifest.parent / "sub1.nii.gz", blob_volume((24, 28, 20), seed=98))
    axial_only = SliceConfig(size=32, stride=2, planes=("axial",))
    caplog.clear()
    report = cache_cohort(cohort, KEY, out, slice_cfg=axial_only, progress=False)
    assert report.ok and report.done == ["sub1"]
    assert any("sub1: its input changed: its stored coronal, sagittal features, which this job (--planes) does not "
               "compute, are removed from" in r.message for r in caplog.records)
    store = FeatureStore(out)
    assert store.has("sub1", "axial") and not store.has("sub1", "coronal") and not store.has("sub1", "sagittal")
    np.testing.assert_array_equal(store.slice_features("sub0", "coronal"), before)  # the others untouched
    assert store.history[-1]["voided_planes"] == {"sub1": ["coronal", "sagittal"]}
    again = cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False)  # all planes: they come back
    assert again.ok and FeatureStore(out).has("sub1", "coronal") and again.recomputed == {}


def test_a_rerun_takes_changed_and_new_manifest_labels_for_subjects_already_cached(manifest: Path, tmp_path: Path
                                                                                 ) -> None:
    """Fuzz round 16: '0 cached, N already present' kept the labels of the first caching (age 23.35
    after the manifest said 99, no new column), and aggregate --label / index took those."""
    import pandas as pd

    out = tmp_path / "labels.h5"
    assert cache_cohort(load_manifest(manifest), KEY, out, slice_cfg=SLICES, progress=False).ok
    before = FeatureStore(out)
    history = len(before.history)
    again = cache_cohort(load_manifest(manifest), KEY, out, slice_cfg=SLICES, progress=False)
    assert again.done == [] and len(FeatureStore(out).history) == history  # unchanged labels: nothing written
    table = pd.read_csv(manifest)
    label = next(c for c in table.columns if c not in ("subject_id", "t1", "seg") and
                 pd.api.types.is_numeric_dtype(table[c]))
    table.loc[0, label] = 99.5
    table["site"] = ["A", "B"] * (len(table) // 2) + ["A"] * (len(table) % 2)
    changed = manifest.parent / "changed.csv"  # the same images
    table.to_csv(changed, index=False)
    report = cache_cohort(load_manifest(changed), KEY, out, slice_cfg=SLICES, progress=False)
    assert report.done == [] and report.ok
    labels = FeatureStore(out).labels()
    assert labels.loc[table.loc[0, "subject_id"], label] == 99.5
    assert list(labels["site"]) == list(table.set_index("subject_id").loc[labels.index, "site"])
    assert FeatureStore(out).history[-1]["relabelled"] == sorted(table["subject_id"])


# -- lock conflicts (issue 14 point 6) ------------------------------------------------------------
def test_second_writer_and_aggregate_during_a_job_get_one_line_exit_2(manifest: Path, tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "busy.h5"
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    assert cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False).ok
    running = FeatureStore(out, mode="a")
    with running.writer_lock():  # a caching job holds the store
        capsys.readouterr()
        assert main(["cache", "--manifest", str(manifest), "--store", str(out), *CLI_ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "busy.h5: another process is writing this store (pid" in err
        assert "busy.h5.lock" in err
        assert main(["aggregate", "--store", str(out), "--method", "mean", "--no-plot"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "busy.h5: another process is writing this store" in err


# -- cluster (issue 14 point 8) ----------------------------------------------------------------------
def test_slurm_array_without_shard_is_refused(manifest: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert main(["cache", "--manifest", str(manifest), "--store", str(tmp_path / "s.h5"), *CLI_ARGS]) == 2
    err = capsys.readouterr().err
    assert "SLURM array task 3 without --shard" in err and not (tmp_path / "s.h5").exists()
    # the explicit shard of a rerun task: shard 3 of 4, whatever the array spec
    assert main(["cache", "--manifest", str(manifest), "--store", str(tmp_path / "s.h5"), *CLI_ARGS,
                 "--shard", "3/4"]) == 0
    assert FeatureStore(tmp_path / "s.shard-3-of-4.h5").subjects() == ["sub3"]


def _stub(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("task, shards, expected", [("3", "8", "3/8"), ("4", "7", "4/7"), ("7", "8", "7/8")])
def test_slurm_script_passes_explicit_shard(tmp_path: Path, task: str, shards: str, expected: str) -> None:
    _stub(tmp_path / "bin", "slice2vol", 'echo "$@" > "$ARGS_FILE"\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": task,
           "ARGS_FILE": str(tmp_path / "args")}
    proc = subprocess.run(["bash", str(REPO / "scripts/slurm_cache.sh"), shards, "m.csv", KEY, "random", "f.h5",
                           "--planes", "axial"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--shard") + 1] == expected and args[args.index("--store") + 1] == "f.h5"
    assert "--allow-failures" in args and args[-2:] == ["--planes", "axial"]
    bad = subprocess.run(["bash", str(REPO / "scripts/slurm_cache.sh"), "2", "m.csv", KEY],
                         env={**env, "SLURM_ARRAY_TASK_ID": "5"}, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "array task 5 but only 2 shard(s)" in bad.stderr


def test_slurm_submit_creates_logs_and_a_merge_step(tmp_path: Path) -> None:
    _stub(tmp_path / "bin", "sbatch", 'echo "$@" >> "$ARGS_FILE"; echo "4242;cluster"\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"),
           "S2V_LOGS": str(tmp_path / "run logs")}
    proc = subprocess.run(["bash", str(REPO / "scripts/slurm_submit.sh"), "8", "my cohort.csv", KEY, "hub",
                           "f.h5"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run logs").is_dir()
    array, merge = (tmp_path / "args").read_text().splitlines()
    assert "--array=0-7" in array and f"--output={tmp_path / 'run logs'}/%x-%A_%a.out" in array
    assert array.endswith("slurm_cache.sh 8 my cohort.csv test/tiny_cnn hub f.h5")
    assert "--dependency=afterany:4242" in merge and "slice2vol cache merge --store f.h5 --manifest my\\ cohort.csv" in merge


def test_merge_refuses_missing_shards_and_reports_coverage(tmp_path: Path, capsys) -> None:
    manifest = make_tiny_cohort(tmp_path / "cohort", n=3, corrupt=True)  # 4 rows, 'bad' is not NIfTI
    base = ["cache", "--manifest", str(manifest), *CLI_ARGS, "--store", str(tmp_path / "f.h5")]
    assert main([*base, "--shard", "0/3"]) == 0  # rows sub0, sub1, bad, sub2: shard 0 = sub0, sub2
    assert main([*base, "--shard", "2/3"]) == 1  # shard 2 = bad: exit 1 would block an afterok merge ...
    assert main([*base, "--shard", "2/3", "--allow-failures"]) == 0  # ... unless failures are allowed
    capsys.readouterr()
    assert main(["cache", "merge", "--store", str(tmp_path / "f.h5"), "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "missing shard(s) [1] of 3 (f.shard-1-of-3.h5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.h5").exists()
    assert main([*base, "--shard", "1/3"]) == 0
    assert main(["cache", "merge", "--store", str(tmp_path / "f.h5"), "--manifest", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "merged 3 store(s)" in captured.out and "coverage of" in captured.out and "3 of 4 subject(s)" in captured.out
    assert "bad: " in captured.err and "bad.nii.gz" in captured.err
    assert sorted(FeatureStore(tmp_path / "f.h5").subjects()) == ["sub0", "sub1", "sub2"]


# -- oblique volumes through the job (issue 14 point 3) ----------------------------------------------
def _rotation(degrees: float, axis: int = 0) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [i for i in range(3) if i != axis]
    rot = np.eye(4)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    return rot


def test_oblique_volume_is_resliced_and_recorded(tmp_path: Path) -> None:
    manifest = make_tiny_cohort(tmp_path / "cohort", n=2)
    write_nifti(manifest.parent / "sub1.nii.gz", blob_volume((24, 28, 20), seed=1), _rotation(17.0))
    report = cache_cohort(load_manifest(manifest), KEY, tmp_path / "o.h5", slice_cfg=SLICES, progress=False)
    assert report.ok and report.oblique == {"sub1": pytest.approx(17.0, abs=0.01)}
    store = FeatureStore(tmp_path / "o.h5")
    assert store.provenance["volume_config"]["oblique"] == "reslice"
    assert store.subject_inputs("sub1", "axial")["oblique"] == {"degrees": pytest.approx(17.0, abs=0.01),
                                                                "action": "resliced"}
    assert store.history[-1]["oblique"] == {"sub1": pytest.approx(17.0, abs=0.01)}
    refused = cache_cohort(load_manifest(manifest), KEY, tmp_path / "r.h5", slice_cfg=SLICES, progress=False,
                           volume_cfg=__import__("slice2vol.data.io", fromlist=["VolumeConfig"]).VolumeConfig(oblique="refuse"))
    assert [f.subject_id for f in refused.failures] == ["sub1"] and "oblique affine (17.0 deg" in refused.failures[0].message


def _stamp_reader(monkeypatch) -> None:
    """Stamps each VolumeItem with the (pid, thread) that read it (worker processes fork after this)."""
    import threading

    from slice2vol.extract import VolumeSlicesDataset

    original = VolumeSlicesDataset.__getitem__

    def stamped(self, i):
        item = original(self, i)
        item.inputs = {**(item.inputs or {}), "reader": (os.getpid(), threading.get_ident()),
                       "threads": torch.get_num_threads()}
        return item

    monkeypatch.setattr(VolumeSlicesDataset, "__getitem__", stamped)


def _read_here(item) -> bool:
    import threading

    return item.inputs["reader"] == (os.getpid(), threading.get_ident())


@pytest.mark.parametrize("reader", ["thread", "process"])
def test_first_volume_is_read_here_and_the_rest_by_readers_in_job_order(manifest: Path, tmp_path: Path,
                                                                        monkeypatch, reader: str) -> None:
    import multiprocessing
    import threading

    from slice2vol.data.io import VolumeConfig
    from slice2vol.extract import VolumeSlicesDataset, _VolumeItems

    cohort = load_manifest(manifest)
    missing = dataclasses.replace(cohort.subjects[2], subject_id="gone",
                                  images={"T1": str(tmp_path / "gone.nii.gz")})
    jobs = [(s, SLICES.planes) for s in [*cohort.subjects[:2], missing, *cohort.subjects[3:5]]]
    reference = VolumeSlicesDataset(jobs, VolumeConfig(), SLICES)
    _stamp_reader(monkeypatch)
    threads = torch.get_num_threads()
    items = _VolumeItems(jobs, VolumeConfig(), SLICES, num_workers=2, reader=reader)
    got = list(items)
    items.close()
    assert torch.get_num_threads() == threads  # the encoder's intra-op threads are untouched
    # the first volume is read with one intra-op thread beside reader threads (which share its cores)
    assert got[0].inputs["threads"] == (1 if reader == "thread" else threads)
    # reader threads and worker processes run one intra-op thread each (no second OpenMP team)
    assert {item.inputs["threads"] for item in got[1:] if item.inputs} == {1}
    assert [item.subject_id for item in got] == [s.subject_id for s, _ in jobs]
    assert _read_here(got[0])  # the encoder's own thread read the first volume
    assert not any(_read_here(item) for item in got[1:] if item.inputs)  # readers read the others
    others = {item.inputs["reader"][0] for item in got[1:] if item.inputs}
    assert others == {os.getpid()} if reader == "thread" else os.getpid() not in others
    assert got[2].error and "gone.nii.gz" in got[2].error
    for i, item in enumerate(got):
        if i == 2:
            continue
        expected = reference[i]
        assert item.planes.keys() == expected.planes.keys()
        for plane, (images, indices, positions) in item.planes.items():
            torch.testing.assert_close(images, expected.planes[plane][0], rtol=0, atol=0)
            np.testing.assert_array_equal(indices, expected.planes[plane][1])
    assert not multiprocessing.active_children()
    assert not [t for t in threading.enumerate() if t.name.startswith("slice2vol-reader")]


@pytest.mark.parametrize("reader", ["thread", "process"])
def test_volume_items_start_no_reader_for_one_job_and_stop_them_halfway(manifest: Path, monkeypatch,
                                                                        reader: str) -> None:
    import multiprocessing
    import threading

    from slice2vol.data.io import VolumeConfig
    from slice2vol.extract import _VolumeItems

    def readers() -> list:
        threads = [t for t in threading.enumerate() if t.name.startswith("slice2vol-reader")]
        return threads + multiprocessing.active_children()

    cohort = load_manifest(manifest)
    _stamp_reader(monkeypatch)
    single = _VolumeItems([(cohort.subjects[0], SLICES.planes)], VolumeConfig(), SLICES, num_workers=2,
                          reader=reader)
    assert not readers()
    assert [_read_here(item) for item in single] == [True]
    jobs = [(s, SLICES.planes) for s in cohort.subjects]
    items = _VolumeItems(jobs, VolumeConfig(), SLICES, num_workers=1, reader=reader)
    iterator = iter(items)
    assert [next(iterator).subject_id for _ in range(2)] == ["sub0", "sub1"]
    assert readers()
    items.close()  # what _run_jobs does after an exception
    assert not readers()
    serial = _VolumeItems(jobs[:3], VolumeConfig(), SLICES, num_workers=0, reader=reader)
    assert not readers() and all(_read_here(item) for item in serial)


def test_reader_choice() -> None:
    from slice2vol.extract import resolve_reader

    assert resolve_reader("auto", torch.device("cpu")) == "thread"
    assert resolve_reader("auto", torch.device("cuda", 0)) == "process"
    assert resolve_reader("process", torch.device("cpu")) == "process"
    with pytest.raises(ValueError, match="reader must be one of auto, thread, process, got 'fork'"):
        resolve_reader("fork", torch.device("cpu"))


def test_report_splits_the_job_time_into_encoder_waiting_and_store(manifest: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """Slow reads show up as waiting for volumes, slow commits as writing the store; with the
    encoder's time they add up to no more than the job's wall time."""
    from slice2vol.extract import VolumeSlicesDataset

    read, commit = VolumeSlicesDataset.__getitem__, FeatureStore.commit_subjects

    def slow_read(self, i):
        time.sleep(0.15)
        return read(self, i)

    def slow_commit(self, *args, **kwargs):
        time.sleep(0.2)
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(VolumeSlicesDataset, "__getitem__", slow_read)
    monkeypatch.setattr(FeatureStore, "commit_subjects", slow_commit)
    cohort = load_manifest(manifest)
    report = cache_cohort(cohort, KEY, tmp_path / "f.h5", slice_cfg=SLICES, batch_size=5, num_workers=0,
                          progress=False, commit_every=2)
    assert report.ok and len(report.done) == 6
    assert report.wait_seconds >= 6 * 0.15  # every volume read while the encoder waited (no readers)
    assert report.store_seconds >= 3 * 0.2  # three commits of two subjects
    assert report.encode_seconds + report.wait_seconds + report.store_seconds <= report.seconds
    assert f"waiting for volumes {report.wait_seconds:.1f} s, writing the store {report.store_seconds:.1f} s" \
        in report.summary()


@pytest.mark.parametrize("option, message", [
    (["--spacing", "0"], "spacing must be 3 voxel sizes of 0.05-20 mm, got (0.0, 0.0, 0.0)"),  # was ignored
    (["--spacing", "-1"], "spacing must be 3 voxel sizes of 0.05-20 mm, got (-1.0, -1.0, -1.0)"),  # one voxel
    (["--spacing", "nan"], "spacing must be 3 voxel sizes"),  # failed every subject
    (["--spacing", "0.01"], "spacing must be 3 voxel sizes"),  # 10^10 voxels per head
    (["--min-foreground", "2"], "min_foreground must be a fraction of the plane between 0 and 1, got 2.0"),
    (["--min-foreground", "nan"], "min_foreground must be a fraction of the plane between 0 and 1, got nan"),
    (["--batch-size", "0"], "batch_size must be >= 1 slice, got 0"),  # was an IndexError traceback
    # fuzz round 6 (F12): every subject failed with "DefaultCPUAllocator: can't allocate memory"
    (["--size", "100000"], "size must be <= 4096 pixels, got 100000 (one 100000x100000 float32 slice is 37.3 GiB"),
])
def test_cache_options_out_of_range_are_refused_in_one_line(manifest: Path, tmp_path: Path, capsys, option,
                                                            message) -> None:
    store = tmp_path / "f.h5"
    assert main(["cache", "--manifest", str(manifest), "--store", str(store), *CLI_ARGS, *option]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not store.exists()


def test_a_batch_larger_than_the_memory_left_is_refused_before_any_read(manifest: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    import slice2vol.data.io as io

    monkeypatch.setattr(io, "available_memory", lambda: 100 << 20)  # 100 MiB left
    store = tmp_path / "f.h5"
    read = []
    monkeypatch.setattr(io, "read_nifti", lambda *a, **k: read.append(a))
    # 2 copies x 64 slices x 3 channels x 512 x 512 x 4 bytes = 384 MiB
    assert main(["cache", "--manifest", str(manifest), "--store", str(store), *CLI_ARGS, "--size", "512",
                 "--batch-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("batch_size 64 at size 512: one batch of slices needs 384.0 MiB before the encoder's "
                        "activations, and 100.0 MiB is available; lower --batch-size or --size")
    assert not read and not store.exists()


def test_a_damaged_part_says_how_to_go_on(manifest: Path, tmp_path: Path) -> None:
    """A truncated part of an unfinished job blocked the store with no way forward; the message says
    to move it aside, and after that the next run recomputes its subjects."""
    cohort = load_manifest(manifest).subset(["sub0", "sub1", "sub2"])
    store = tmp_path / "f.h5"
    cache_cohort(cohort, KEY, store, slice_cfg=SLICES, progress=False, commit_every=1, compact=False)
    parts = sorted((tmp_path / "f.h5.parts").glob("part-*.h5"))
    with_subjects = [p for p in parts if p.stat().st_size > 4096][0]
    with_subjects.write_bytes(with_subjects.read_bytes()[:1000])
    with pytest.raises(Exception, match=r"cannot open as HDF5 .*a damaged part of an unfinished job: move it out "
                                        r"of .*f\.h5\.parts to go on without the subjects it held"):
        FeatureStore(store).subjects()
    with_subjects.rename(tmp_path / with_subjects.name)
    report = cache_cohort(cohort, KEY, store, slice_cfg=SLICES, progress=False)
    assert report.ok and sorted(FeatureStore(store).subjects()) == cohort.ids


def test_a_small_job_on_a_new_store_writes_its_rows_once(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """Up to ``commit_every`` subjects on a new store: one part (the last subjects and the job's
    record) renamed into place, no copy; the store equals one compacted from a part per subject,
    and a second job on it is merged as before."""
    import slice2vol.cache as cache_mod

    merges: list[Path] = []
    merge = cache_mod._merge_segments

    def counting_merge(segments, out, **kwargs):
        merges.append(Path(out))
        return merge(segments, out, **kwargs)

    monkeypatch.setattr(cache_mod, "_merge_segments", counting_merge)
    cohort = load_manifest(manifest)
    first, rest = cohort.subset(["sub0", "sub1", "sub2"]), cohort.subset(["sub3", "sub4", "sub5"])
    once = cache_cohort(first, KEY, tmp_path / "once.h5", slice_cfg=SLICES, batch_size=5, progress=False)
    assert once.ok and once.done == ["sub0", "sub1", "sub2"] and merges == []
    assert not (tmp_path / "once.h5.parts").exists()
    assert sorted(p.name for p in tmp_path.glob("once.h5*")) == ["once.h5", "once.h5.lock"]
    # the reference: one part per subject, merged into the main file
    each = cache_cohort(first, KEY, tmp_path / "each.h5", slice_cfg=SLICES, batch_size=5, progress=False,
                        commit_every=1)
    assert each.ok and merges == [tmp_path / "each.h5"]
    a, b = FeatureStore(tmp_path / "once.h5"), FeatureStore(tmp_path / "each.h5")
    assert_same_store(a, b)
    assert [e["event"] for e in a.history] == [e["event"] for e in b.history] == ["cache"]
    assert a.history[0]["done"] == 3 and a.segment_paths() == [tmp_path / "once.h5"]
    a.close()
    again = cache_cohort(cohort, KEY, tmp_path / "once.h5", slice_cfg=SLICES, batch_size=5, progress=False)
    assert again.done == ["sub3", "sub4", "sub5"] and sorted(again.skipped) == ["sub0", "sub1", "sub2"]
    assert merges[-1] == tmp_path / "once.h5"  # an existing main file: merged, not replaced
    whole = FeatureStore(tmp_path / "once.h5")
    assert sorted(whole.subjects()) == cohort.ids and [e["done"] for e in whole.history] == [3, 3]
    full = cache_cohort(rest, KEY, tmp_path / "each.h5", slice_cfg=SLICES, batch_size=5, progress=False)
    assert full.ok
    assert_same_store(whole, FeatureStore(tmp_path / "each.h5"))


def _limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    """``slice2vol ARGV`` in a subprocess whose files may not grow beyond ``limit`` bytes (RLIMIT_FSIZE:
    a write past it fails with EFBIG, as a full disk fails with ENOSPC; no root or small disk needed)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2]))); "
            "sys.path.insert(0, sys.argv[1]); import tests._tiny_encoder; "
            "from slice2vol.cli import main; sys.exit(main(sys.argv[3:]))")
    return subprocess.run([sys.executable, "-c", code, str(REPO), str(limit), *argv], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith(("INFO ", "WARNING "))]


def test_a_full_disk_stops_the_job_in_one_line_and_keeps_what_was_committed(manifest: Path, tmp_path: Path) -> None:
    """Parts of two subjects fit, the compacted store does not: one line naming the file, no h5py
    traceback, no temporary file left; the rerun with room skips the committed subjects and finishes."""
    store = tmp_path / "full.h5"
    argv = ["cache", "--manifest", str(manifest), "--store", str(store), *CLI_ARGS, "--commit-every", "2",
            "--workers", "0"]
    done = _limited(24_000, *argv)
    assert done.returncode == 2, done.stderr
    errors = _errors(done.stderr)
    # every subject is committed by then: the message says that only the folding is left to do (it said
    # "the store is as it was before this write", and users cached everything again; fuzz round 17)
    assert errors[-1] == (f"slice2vol cache: error: {store}: every commit is safe in {FeatureStore(store).parts_dir}, "
                          "but folding the parts into the main file failed: no space left on the device (or the disk "
                          "quota or file size limit is reached); free space, then run `slice2vol cache compact --store "
                          f"{store}` (the store reads as it is meanwhile)"), done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert not store.exists() and not list(tmp_path.rglob("*.tmp"))
    parts = FeatureStore(store)
    assert sorted(parts.subjects()) == [f"sub{i}" for i in range(6)]  # every subject committed in a part
    parts.close()
    assert main(["cache", "compact", "--store", str(store)]) == 0  # what the message advises
    assert FeatureStore(store).segment_paths() == [store]
    rerun = subprocess.run(_job_command(manifest, store)[:-4] + ["--workers", "0"], capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "6 already cached" in rerun.stdout + rerun.stderr or "0 to do" in rerun.stdout + rerun.stderr
    final = FeatureStore(store)
    assert sorted(final.subjects()) == [f"sub{i}" for i in range(6)] and final.segment_paths() == [store]


def test_a_full_disk_leaves_the_store_as_it_was_when_writing_volume_embeddings(manifest: Path, tmp_path: Path) -> None:
    from slice2vol.data.io import file_sha256

    store = tmp_path / "f.h5"
    assert cache_cohort(load_manifest(manifest), KEY, store, slice_cfg=SLICES, progress=False).ok
    before = file_sha256(store)
    failed = _limited(store.stat().st_size // 2, "aggregate", "--store", str(store), "--method", "mean", "--no-progress")
    assert failed.returncode == 2
    (line,) = _errors(failed.stderr)
    assert line.startswith(f"slice2vol aggregate: error: {store}: could not be written: no space left on the device")
    assert file_sha256(store) == before and not list(tmp_path.glob("*.tmp"))
    assert main(["aggregate", "--store", str(store), "--method", "mean", "--no-progress"]) == 0


# -- stores that hold no features, empty shards, a stride beyond the volume (fuzz round 8) -----------
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_store_whose_first_job_cached_nothing_is_new_for_the_dtype(manifest: Path, tmp_path: Path,
                                                                      compact: bool, dtype: str) -> None:
    """H1: a first job with every manifest path wrong left a float16 feature set and no row; the next
    job needs the float32 fallback (or asks for --dtype float32). Without compaction the first job's
    record is a history-only part."""
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    typo = dataclasses.replace(cohort, subjects=[dataclasses.replace(s, images={"T1": tmp_path / f"typo_{s.subject_id}.nii.gz"})
                                                 for s in cohort.subjects])
    out = tmp_path / "p.h5"
    first = cache_cohort(typo, ScaledTiny(1e-8), out, slice_cfg=SLICES, progress=False, compact=compact)
    assert first.done == [] and len(first.failures) == 2
    assert FeatureStore(out).feature_set == first.feature_set and not FeatureStore(out).holds_features
    report = cache_cohort(cohort, ScaledTiny(1e-8), out, slice_cfg=SLICES, progress=False, dtype=dtype)
    assert report.ok and sorted(report.done) == ["sub0", "sub1"]
    store = FeatureStore(out)
    assert store.provenance["dtype"] == "float32" and store.feature_set == report.feature_set
    assert store.verify().ok and [e["done"] for e in store.history if e["event"] == "cache"] == [0, 2]
    assert np.abs(store.slice_features("sub0", "axial")).min() > 0


def test_shards_without_subjects_do_not_stop_the_merge_of_fallback_shards(manifest: Path, tmp_path: Path,
                                                                         capsys) -> None:
    """H2: 4 shards of 2 subjects; shards 0 and 1 take the float32 fallback, 2 and 3 cache nothing and
    keep float16; a rerun of an empty shard with --dtype float32 is accepted too."""
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    reports = [cache_cohort(cohort, ScaledTiny(1e-8), tmp_path / "f.h5", slice_cfg=SLICES, shard=f"{i}/4",
                            progress=False) for i in range(4)]
    assert [len(r.done) for r in reports] == [1, 1, 0, 0]
    assert reports[0].feature_set == reports[1].feature_set != reports[2].feature_set == reports[3].feature_set
    again = cache_cohort(cohort, ScaledTiny(1e-8), tmp_path / "f.h5", slice_cfg=SLICES, shard="3/4",
                         progress=False, dtype="float32")
    assert again.ok and again.done == []
    assert main(["cache", "merge", "--store", str(tmp_path / "f.h5")]) == 0, capsys.readouterr().err
    merged = FeatureStore(tmp_path / "f.h5")
    assert sorted(merged.subjects()) == ["sub0", "sub1"] and merged.provenance["dtype"] == "float32"
    assert merged.feature_set == reports[0].feature_set and merged.verify().ok
    assert sorted(tuple(e["shard"]) for e in merged.history if e["event"] == "cache") == [
        (0, 4), (1, 4), (2, 4), (3, 4)]  # the rerun of shard 3 had nothing new to record


def test_a_stride_beyond_the_volume_is_named_instead_of_the_volume(manifest: Path, tmp_path: Path) -> None:
    """H7: --stride 1000 looks at slice 0 of each plane only: the message names the stride."""
    cohort = load_manifest(manifest).subset(["sub0"])
    report = cache_cohort(cohort, KEY, tmp_path / "s.h5", slice_cfg=SliceConfig(size=32, stride=1000),
                          progress=False)
    (failure,) = report.failures
    message = failure.message
    assert "stride 1000 looked at only 1 axial slice(s) of " in message and "use a smaller --stride" in message
    assert "blank or corrupt" not in message and "--min-foreground" not in message and "\n" not in message


# -- a store given through a symbolic link ----------------------------------------------------------
def test_cache_and_aggregate_through_a_symbolic_link_update_its_target(manifest: Path, tmp_path: Path,
                                                                      capsys) -> None:
    """`ln -s big/x.h5 l.h5`: caching and aggregating on l.h5 update big/x.h5 in place and leave the link
    a link; a lock held on the target stops a job given the link (one line naming the target's lock)."""
    target = tmp_path / "big" / "x.h5"
    assert cache_cohort(load_manifest(manifest).subset(["sub0", "sub1", "sub2"]), KEY, target, slice_cfg=SLICES,
                        progress=False).ok
    link, other = tmp_path / "l.h5", tmp_path / "l2.h5"
    link.symlink_to(Path("big") / "x.h5")
    other.symlink_to(target)
    assert main(["cache", "--manifest", str(manifest), "--store", str(link), *CLI_ARGS]) == 0
    assert link.is_symlink() and sorted(FeatureStore(target).subjects()) == [f"sub{i}" for i in range(6)]
    assert main(["aggregate", "--store", str(other), "--method", "mean", "--no-plot"]) == 0
    assert other.is_symlink() and sorted(FeatureStore(target).volume_embeddings("mean")[0]) == [
        f"sub{i}" for i in range(6)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("l")) == ["l.h5", "l2.h5"]

    with FeatureStore(target, mode="a").writer_lock():
        capsys.readouterr()
        assert main(["cache", "--manifest", str(manifest), "--store", str(link), *CLI_ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another process is writing this store (pid" in err
        assert f"{target}.lock" in err
        assert main(["aggregate", "--store", str(other), "--method", "mean", "--no-plot"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"lock {target}.lock" in err
    assert link.is_symlink() and other.is_symlink()


# -- a changed input whose recompute fails -----------------------------------------------------------
@pytest.mark.parametrize("compact", [True, False])
def test_a_changed_input_that_fails_to_cache_again_leaves_no_stale_features(tmp_path: Path, capsys,
                                                                             compact: bool) -> None:
    """sub2's file is replaced by a truncated one: its rerun fails (exit 1) and its old rows, made from
    the old file, go in the part that records the failure; aggregate, export and verify see sub0 and
    sub1 only. The others keep their bytes; restoring the file caches sub2 again."""
    manifest = make_tiny_cohort(tmp_path / "cohort", n=3)
    out = tmp_path / "c.h5"
    job = ["cache", "--manifest", str(manifest), "--store", str(out), *CLI_ARGS, *([] if compact else ["--no-compact"])]
    assert main(job) == 0
    assert main(["aggregate", "--store", str(out), "--method", "mean", "--no-plot"]) == 0
    before = {sid: FeatureStore(out).slice_features(sid, "axial") for sid in ("sub0", "sub1", "sub2")}
    image = manifest.parent / "sub2.nii.gz"
    good = image.read_bytes()
    image.write_bytes(good[:len(good) // 2])
    capsys.readouterr()

    assert main(job) == 1
    err = capsys.readouterr().err
    assert "1 stored subject(s) removed from the store: their input changed and caching it again failed" in err
    assert "sub2: input changed since it was cached" in err and "stored subject(s) recomputed" not in err
    assert "volume embeddings 'mean' were aggregated from features that this run recomputed or removed" in err
    store = FeatureStore(out)
    with pytest.raises(StaleEmbeddings):  # the set aggregated with sub2's old vector is refused
        store.volume_embeddings("mean")
    assert sorted(store.subjects()) == ["sub0", "sub1"] and not any(store.has("sub2", p) for p in store.planes)
    assert store.parts_dir.exists() != compact
    event = store.history[-1]
    assert [f["subject_id"] for f in event["failures"]] == ["sub2"]
    assert event["withdrawn"] == {"sub2": ["axial", "coronal", "sagittal"]}
    for sid in ("sub0", "sub1"):
        np.testing.assert_array_equal(store.slice_features(sid, "axial"), before[sid])
    assert main(["cache", "info", "--store", str(out)]) == 0
    assert "complete subjects: 2;" in capsys.readouterr().out
    assert main(["aggregate", "--store", str(out), "--method", "mean", "--no-plot"]) == 0
    assert "sub2" not in capsys.readouterr().err
    assert FeatureStore(out).volume_embeddings("mean")[0] == ["sub0", "sub1"]
    assert main(["export", "--store", str(out), "--embeddings", "mean", "--out", str(tmp_path / "x.csv")]) == 0
    assert "sub2" not in (tmp_path / "x.csv").read_text()
    assert main(["cache", "verify", "--store", str(out)]) == 0

    image.write_bytes(good)  # the input reads again: sub2 is cached like a new subject
    capsys.readouterr()
    assert main(job) == 0
    again = FeatureStore(out)
    assert sorted(again.subjects()) == ["sub0", "sub1", "sub2"]
    assert_fp16_close(again.slice_features("sub2", "axial"), before["sub2"])


def test_feature_provenance_records_the_weights_files_sha256(tmp_path):
    """The store's identity of a checkpoint is its sha256 (paths differ between machines)."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from slice2vol.data.io import VolumeConfig
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.encoders import build_encoder
    from slice2vol.extract import feature_provenance

    torch.manual_seed(0)
    state = build_encoder("tv/resnet18", weights="random").model.state_dict()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    encoder = build_encoder("tv/resnet18", weights=str(path))
    prov = feature_provenance(encoder, "tv/resnet18", {}, VolumeConfig(), SliceConfig(), dtype="float16", tokens=False)
    assert prov["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["weights"] == "file" and prov["weights_path"] == str(path)
