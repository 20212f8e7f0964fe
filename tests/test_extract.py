"""The caching job: features vs direct encode, SIGKILL resume, shards + merge, failures, refusals."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cache import FeatureStore, StoreMismatch
from slice2vol.cli import main
from slice2vol.data.manifest import load_manifest, load_subject
from slice2vol.data.slicing import SliceConfig, slice_volume
from slice2vol.encoders import build_encoder
from slice2vol.extract import cache_cohort, parse_shard, shard_from_env, shard_path
from tests._tiny_encoder import KEY, make_tiny_cohort

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


def test_workers_give_the_same_store(manifest: Path, tmp_path: Path) -> None:
    cohort = load_manifest(manifest).subset(["sub0", "sub1", "sub2"])
    one = cache_cohort(cohort, KEY, tmp_path / "w0.h5", slice_cfg=SLICES, batch_size=4, progress=False)
    two = cache_cohort(cohort, KEY, tmp_path / "w2.h5", slice_cfg=SLICES, batch_size=16, num_workers=2,
                       progress=False)
    assert one.ok and two.ok and one.slices == two.slices
    assert_same_store(FeatureStore(tmp_path / "w0.h5"), FeatureStore(tmp_path / "w2.h5"))


def _job_command(manifest: Path, out: Path) -> list[str]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests._tiny_encoder; "
            "from slice2vol.cli import main; sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(REPO), "cache", "--manifest", str(manifest), "--out", str(out),
            *CLI_ARGS, "--commit-every", "1", "--workers", "0"]


def test_sigkill_mid_run_then_resume(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    env = {**os.environ, "TINY_ENCODER_DELAY": "0.12", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_job_command(manifest, out), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + 90
    try:
        while time.time() < deadline and len(list(parts.glob("part-*.h5"))) < 2:
            assert proc.poll() is None, "job ended before it could be killed; raise the delay"
            time.sleep(0.02)
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
    assert main([*base, "--out", str(tmp_path / "single.h5")]) == 0
    for i in (0, 1):
        assert main([*base, "--out", str(tmp_path / "sh.h5"), "--shard", f"{i}/2"]) == 0
    shards = [tmp_path / "sh.shard-0-of-2.h5", tmp_path / "sh.shard-1-of-2.h5"]
    assert [len(FeatureStore(p).subjects()) for p in shards] == [3, 3]
    assert set(FeatureStore(shards[0]).subjects()).isdisjoint(FeatureStore(shards[1]).subjects())
    assert main(["cache", "merge", str(tmp_path / "merged.h5"), *map(str, shards)]) == 0
    merged = FeatureStore(tmp_path / "merged.h5")
    assert_same_store(merged, FeatureStore(tmp_path / "single.h5"))
    assert merged.history[-1]["event"] == "merge"


def test_merge_refuses_other_provenance(manifest: Path, tmp_path: Path, capsys) -> None:
    base = ["cache", "--manifest", str(manifest), *CLI_ARGS, "--shard", "0/2"]
    assert main([*base, "--out", str(tmp_path / "a.h5")]) == 0
    assert main([*base[:-2], "--shard", "1/2", "--out", str(tmp_path / "b.h5"), "--encoder-arg", "img_size=40"]) == 0
    code = main(["cache", "merge", str(tmp_path / "ab.h5"), str(tmp_path / "a.shard-0-of-2.h5"),
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
    code = main(["cache", "--manifest", str(manifest), "--out", str(out), *CLI_ARGS])
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


def test_refuses_append_under_another_config(manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.h5"
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    cache_cohort(cohort, KEY, out, slice_cfg=SLICES, progress=False)
    before = out.stat().st_mtime_ns
    code = main(["cache", "--manifest", str(manifest), "--out", str(out), *CLI_ARGS[:-5], "--stride", "3",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "slice_config.stride: 2 -> 3" in err and "another store" in err
    assert out.stat().st_mtime_ns == before and FeatureStore(out).subjects() == ["sub0", "sub1"]
    # the same settings with another plane add to the same feature set
    more = cache_cohort(cohort, KEY, out, slice_cfg=SliceConfig(planes=("axial",), size=32, stride=2),
                        progress=False)
    assert more.skipped == ["sub0", "sub1"] and more.done == []


def test_empty_plane_subject_is_complete(manifest: Path, tmp_path: Path) -> None:
    cohort = load_manifest(manifest).subset(["sub0", "sub1"])
    cfg = SliceConfig(size=32, stride=2, min_foreground=0.99)  # no slice is that full
    report = cache_cohort(cohort, KEY, tmp_path / "e.h5", slice_cfg=cfg, progress=False)
    store = FeatureStore(tmp_path / "e.h5")
    assert report.ok and report.slices == 0 and sorted(store.subjects()) == ["sub0", "sub1"]
    assert store.slice_features("sub0", "axial").shape == (0, 16)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, None),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (4, 8)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (0, 2)),
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
    weights = Path("/work/shared/weights/mobilenet_v2-b0353104.pth")
    weights_arg = str(weights) if weights.exists() else "random"
    cohort = load_manifest(ixi_manifest)
    cohort = cohort.subset(cohort.ids[:n_subjects])
    cfg = SliceConfig(size=64, stride=8)
    report = cache_cohort(cohort, "tv/mobilenet_v2", tmp_path / "ixi.h5", weights=weights_arg,
                          encoder_kwargs={"img_size": 64}, slice_cfg=cfg, batch_size=16, progress=False,
                          num_workers=1)
    assert report.ok and len(report.done) == n_subjects
    store = FeatureStore(tmp_path / "ixi.h5")
    assert store.provenance["weights_sha256"] == (
        __import__("slice2vol.encoders", fromlist=["sha256_file"]).sha256_file(weights) if weights.exists() else "")
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
