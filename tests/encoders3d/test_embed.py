"""``embed_cohort3d``: one vector per subject in the feature store, provenance, failures, resumption."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slice2vol.cache import FeatureStore
from slice2vol.data.manifest import load_manifest
from slice2vol.encoders3d import build_encoder3d, embed_cohort3d
from slice2vol.encoders3d.embed import partial_path

KW = {"input_size": (32, 32, 32), "levels": [-1]}


def test_writes_one_row_per_subject_with_provenance_and_labels(head_manifest, tmp_path):
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store_path = tmp_path / "feats.h5"
    report = embed_cohort3d(enc, cohort, store_path, "3d/monai_resnet10", progress=False)
    assert report.ok and report.done == ["s0", "s1", "s2", "s3"] and report.embed_dim == 512
    ids, X, prov = FeatureStore(store_path).volume_embeddings("3d/monai_resnet10")
    assert list(ids) == report.done and X.shape == (4, 512) and X.dtype == np.float32
    # a stored row is what the encoder gives for that subject loaded as it asks
    from slice2vol.data.manifest import load_subject

    volume = load_subject(cohort.subjects[2], enc.volume_config(), with_seg=False)
    assert np.allclose(X[2], enc.embed_volume(volume).numpy(), atol=1e-6)
    assert prov["encoder_key"] == "3d/monai_resnet10" and prov["kind"] == "native-3d" and prov["mode"] == "whole"
    assert prov["weights"] == "random:seed=0" and len(prov["state_sha256"]) == 64
    assert prov["encoder_info"]["input_size"] == [32, 32, 32] and prov["volume_config"]["normalize"] == "none"
    assert prov["seconds_per_volume"] > 0 and prov["n_failures"] == 0
    store = FeatureStore(store_path)
    assert store.label_types["sex"] == "categorical" and not partial_path(store_path, "3d/monai_resnet10").exists()


def test_sliding_window_options_are_used_and_recorded(head_manifest, tmp_path):
    cohort = load_manifest(head_manifest)
    cohort = cohort.subset(cohort.ids[:2])
    enc = build_encoder3d("3d/monai_resnet10", levels=[-1], input_size=(32, 32, 64))
    window = {"roi_size": [32, 32, 32], "overlap": 0.25}
    report = embed_cohort3d(enc, cohort, tmp_path / "f.h5", "sw", progress=False, sliding_window=window)
    ids, X, prov = FeatureStore(tmp_path / "f.h5").volume_embeddings("sw")
    assert report.ok and X.shape == (2, 512) and np.isfinite(X).all()
    assert prov["mode"] == "sliding" and prov["sliding_window"]["roi_size"] == [32, 32, 32]
    assert prov["sliding_window"]["overlap"] == 0.25
    from slice2vol.data.manifest import load_subject

    volume = load_subject(cohort.subjects[0], enc.volume_config(), with_seg=False)
    assert np.allclose(X[0], enc.embed_volume(volume, window).numpy(), atol=1e-6)
    # the options reach MONAI: other windows give other (boundary-affected) features, and so does one pass
    others = [enc.embed_volume(volume, {**window, "overlap": 0.0}), enc.embed_volume(volume)]
    assert all(not np.allclose(X[0], o.numpy(), atol=1e-4) for o in others)


def test_a_broken_subject_is_recorded_and_the_others_written(head_manifest, tmp_path):
    table = pd.read_csv(head_manifest)
    (head_manifest.parent / "nii" / "s1.nii.gz").write_bytes(b"not a nifti file")
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    report = embed_cohort3d(enc, cohort, tmp_path / "f.h5", "x", progress=False)
    assert report.done == ["s0", "s2", "s3"] and [f.subject_id for f in report.failures] == ["s1"]
    assert "s1.nii.gz" in report.failures[0].message and "not a NIfTI" in report.failures[0].message
    ids, X, prov = FeatureStore(tmp_path / "f.h5").volume_embeddings("x")
    assert list(ids) == ["s0", "s2", "s3"] and prov["n_failures"] == 1
    assert len(table) == 4


def test_nothing_embeddable_raises_and_writes_nothing(head_manifest, tmp_path):
    for i in range(4):  # distinct bytes: identical files would be left out by the manifest checks already
        (head_manifest.parent / "nii" / f"s{i}.nii.gz").write_bytes(b"x%d" % i)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    with pytest.raises(ValueError, match=r"no subject could be embedded with 3d/monai_resnet10 \(4 failures; "
                                         r"first: s0: "):
        embed_cohort3d(enc, load_manifest(head_manifest), tmp_path / "f.h5", "x", progress=False)
    assert not FeatureStore(tmp_path / "f.h5").exists()


def test_resumes_after_a_kill_and_matches_a_clean_run(head_manifest, tmp_path, monkeypatch):
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    clean = tmp_path / "clean.h5"
    embed_cohort3d(enc, cohort, clean, "set", progress=False)

    calls = []
    original = type(enc).embed_volume

    def dying(self, volume, sliding_window=None):
        calls.append(volume.subject_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while embedding the third subject
        return original(self, volume, sliding_window)

    store = tmp_path / "resumed.h5"
    monkeypatch.setattr(type(enc), "embed_volume", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert partial_path(store, "set").exists() and not FeatureStore(store).exists()
    monkeypatch.setattr(type(enc), "embed_volume", original)
    calls.clear()
    seen = []
    monkeypatch.setattr(type(enc), "embed_volume", lambda self, v, sw=None: seen.append(v.subject_id) or original(self, v, sw))
    report = embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert report.resumed == 2 and seen == ["s2", "s3"]
    a, b = FeatureStore(clean).volume_embeddings("set"), FeatureStore(store).volume_embeddings("set")
    assert list(a[0]) == list(b[0]) and np.array_equal(a[1], b[1])
    assert not partial_path(store, "set").exists()


def test_a_partial_file_of_other_options_is_not_reused(head_manifest, tmp_path):
    cohort = load_manifest(head_manifest)
    store = tmp_path / "f.h5"
    side = partial_path(store, "set")
    np.savez(side, ids=np.asarray(["s0"]), X=np.zeros((1, 512), np.float32), identity=np.asarray("other"))
    report = embed_cohort3d(build_encoder3d("3d/monai_resnet10", **KW), cohort, store, "set", progress=False)
    assert report.resumed == 0
    _, X, _ = FeatureStore(store).volume_embeddings("set")
    assert not np.allclose(X[0], 0)


# -- running again on a store that holds the set ---------------------------------------------------
def _counting(monkeypatch, enc, fail_at: int | None = None, error: BaseException | None = None) -> list[str]:
    """Records the subject of every ``embed_volume`` call of ``enc``'s class (and still embeds); call
    number ``fail_at`` (1-based) raises ``error`` instead (a kill, a device error)."""
    calls: list[str] = []
    original = type(enc).embed_volume

    def counted(self, volume, sliding_window=None):
        calls.append(volume.subject_id)
        if len(calls) == fail_at:
            raise error
        return original(self, volume, sliding_window)

    monkeypatch.setattr(type(enc), "embed_volume", counted)
    return calls


def _rows(store_path, name="set") -> dict[str, np.ndarray]:
    ids, X, _ = FeatureStore(store_path).volume_embeddings(name)
    return dict(zip(ids, X))


def _reference(enc, subject) -> np.ndarray:
    """The embedding of ``subject`` computed directly, as the encoder loads it (not through the job)."""
    from slice2vol.data.manifest import load_subject

    return enc.embed_volume(load_subject(subject, enc.volume_config(), with_seg=False)).numpy()


def test_a_rerun_keeps_the_rows_of_failing_and_absent_subjects_and_skips_unchanged_ones(head_manifest, tmp_path,
                                                                                      monkeypatch):
    """A rerun with a subject now corrupt and one left out of the manifest used to delete both rows."""
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store = tmp_path / "f.h5"
    embed_cohort3d(enc, cohort, store, "set", progress=False)
    before = _rows(store)
    (head_manifest.parent / "nii" / "s1.nii.gz").write_bytes(b"not a nifti file")
    calls = _counting(monkeypatch, enc)
    report = embed_cohort3d(enc, cohort.subset(["s0", "s1", "s2"]), store, "set", progress=False)
    assert calls == [] and report.unchanged == ["s0", "s2"] and [f.subject_id for f in report.failures] == ["s1"]
    # s1's file changed (now corrupt): its row described the old scan and is dropped (fuzz round 13:
    # the slice-feature cache voids such rows; the 3D set kept it and benches scored the old scan)
    assert report.kept == {"s3": "not in this run's manifest"}
    assert report.removed == {"s1": "failed in this run; its row was of its input before it changed"}
    after = _rows(store)
    assert list(after) == ["s0", "s2", "s3"] and all(np.array_equal(after[i], before[i]) for i in after)
    summary = report.summary()
    assert "wrote 'set', 3 subjects" in summary and "0 embedded, 2 unchanged, 1 kept from before" in summary
    assert "kept from before (not in this run's manifest): s3" in summary
    assert "removed (failed in this run; its row was of its input before it changed): s1" in summary
    prov = FeatureStore(store).volume_embeddings("set")[2]
    assert set(prov["inputs"]) == {"s0", "s2", "s3"} and prov["kept"]["s3"] == "not in this run's manifest"
    assert prov["removed"] == {"s1": "failed in this run; its row was of its input before it changed"}


def test_a_rerun_embeds_again_only_the_subject_whose_input_changed(head_manifest, tmp_path, monkeypatch):
    from tests.conftest import write_nifti
    from tests.encoders3d.conftest import SPACING_2MM, head

    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store = tmp_path / "f.h5"
    embed_cohort3d(enc, cohort, store, "set", progress=False)
    before = _rows(store)
    write_nifti(head_manifest.parent / "nii" / "s2.nii.gz", head((34, 30, 30), seed=7), SPACING_2MM)
    calls = _counting(monkeypatch, enc)
    report = embed_cohort3d(enc, cohort, store, "set", progress=False)
    assert calls == ["s2"] and report.unchanged == ["s0", "s1", "s3"] and report.ok and not report.kept
    after = _rows(store)
    assert list(after) == ["s0", "s1", "s2", "s3"]
    assert np.allclose(after["s2"], _reference(enc, cohort.subjects[2]), atol=1e-6)
    assert not np.allclose(after["s2"], before["s2"], atol=1e-4)
    assert all(np.array_equal(after[i], before[i]) for i in ("s0", "s1", "s3"))


def test_a_set_made_with_other_settings_is_refused_unless_replaced(head_manifest, tmp_path):
    from slice2vol.cache import StoreMismatch

    cohort = load_manifest(head_manifest)
    store = tmp_path / "f.h5"
    embed_cohort3d(build_encoder3d("3d/monai_resnet10", **KW), cohort, store, "set", progress=False)
    before = _rows(store)
    other = build_encoder3d("3d/monai_resnet10", input_size=(32, 32, 32), levels=[-2])
    with pytest.raises(StoreMismatch, match=r"f\.h5: set 'set' holds 4 embeddings made with other settings "
                                            r"\(.*levels.*--replace"):
        embed_cohort3d(other, cohort.subset(["s0"]), store, "set", progress=False)
    assert all(np.array_equal(_rows(store)[i], before[i]) for i in before)
    report = embed_cohort3d(other, cohort.subset(["s0"]), store, "set", progress=False, replace=True)
    assert report.replaced == 4 and "4 earlier rows were dropped" in report.summary()
    after = _rows(store)
    assert list(after) == ["s0"] and np.allclose(after["s0"], _reference(other, cohort.subjects[0]), atol=1e-6)


def test_a_resume_embeds_again_a_subject_whose_input_changed_after_the_kill(head_manifest, tmp_path, monkeypatch):
    """The partial file's rows used to be taken over whatever happened to the images since the kill."""
    from tests.conftest import write_nifti
    from tests.encoders3d.conftest import SPACING_2MM, head

    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    original = type(enc).embed_volume
    # killed while embedding the third subject: s0 and s1 are in the partial
    _counting(monkeypatch, enc, fail_at=3, error=KeyboardInterrupt())
    store = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt):
        embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    monkeypatch.setattr(type(enc), "embed_volume", original)
    write_nifti(head_manifest.parent / "nii" / "s0.nii.gz", head((34, 30, 30), seed=9), SPACING_2MM)
    calls = _counting(monkeypatch, enc)
    report = embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert report.resumed == 1 and calls == ["s0", "s2", "s3"]
    assert np.allclose(_rows(store)["s0"], _reference(enc, cohort.subjects[0]), atol=1e-6)


def test_a_locked_store_fails_before_anything_is_embedded(head_manifest, tmp_path, monkeypatch):
    import fcntl

    from slice2vol.cache import StoreLocked

    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store = tmp_path / "f.h5"
    calls = _counting(monkeypatch, enc)
    with open(FeatureStore(store).lock_path, "a+") as fh:  # another writer holds the lock
        fh.write("pid 1 on elsewhere: slice2vol cache")
        fh.flush()
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreLocked, match=r"f\.h5: another process is writing this store \(pid 1 on elsewhere"):
            embed_cohort3d(enc, load_manifest(head_manifest), store, "set", progress=False)
    assert calls == [] and not partial_path(store, "set").exists()


def test_an_immutable_store_fails_before_anything_is_embedded(head_manifest, tmp_path, monkeypatch):
    import subprocess

    from slice2vol.cache import StoreError

    cohort = load_manifest(head_manifest).subset(["s0"])
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store = tmp_path / "f.h5"
    embed_cohort3d(enc, cohort, store, "set", progress=False)
    if subprocess.run(["chattr", "+i", str(store)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE) and a file system with attributes")
    try:
        calls = _counting(monkeypatch, enc)
        with pytest.raises(StoreError, match=r"f\.h5: not writable \(read-only or immutable\)"):
            embed_cohort3d(enc, load_manifest(head_manifest), store, "set", progress=False)
        assert calls == []
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)


def test_a_failed_final_write_keeps_the_rows_for_the_rerun(head_manifest, tmp_path, monkeypatch):
    """The rows embedded since the last commit (here: all, commit_every=0) used to be lost."""
    from slice2vol.cache import StoreWriteFailed

    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    clean = tmp_path / "clean.h5"
    embed_cohort3d(enc, cohort, clean, "set", progress=False)
    store = tmp_path / "f.h5"
    real_write = FeatureStore.write_volume_embeddings

    def failing(self, *args, **kwargs):
        raise StoreWriteFailed(f"{self.path}: could not be written: no space left on the device")

    monkeypatch.setattr(FeatureStore, "write_volume_embeddings", failing)
    with pytest.raises(StoreWriteFailed):
        embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=0)
    assert partial_path(store, "set").exists()
    monkeypatch.setattr(FeatureStore, "write_volume_embeddings", real_write)
    calls = _counting(monkeypatch, enc)
    report = embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=0)
    assert calls == [] and report.resumed == 4 and not partial_path(store, "set").exists()
    a, b = FeatureStore(clean).volume_embeddings("set"), FeatureStore(store).volume_embeddings("set")
    assert list(a[0]) == list(b[0]) and np.array_equal(a[1], b[1])


def test_a_non_finite_embedding_fails_its_subject_naming_the_file(head_manifest, tmp_path, monkeypatch):
    """A volume whose raw intensities overflow the network (a 1e30-scaled scan) was recorded as
    's1: non-finite embedding', without the file or a hint."""
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    real = enc.embed_volume

    def overflowing(volume, window=None):
        x = real(volume, window)
        return x * float("nan") if volume.subject_id == "s1" else x

    monkeypatch.setattr(enc, "embed_volume", overflowing)
    report = embed_cohort3d(enc, load_manifest(head_manifest), tmp_path / "f.h5", "x", progress=False)
    assert report.done == ["s0", "s2", "s3"] and [f.subject_id for f in report.failures] == ["s1"]
    message = report.failures[0].message
    assert message.startswith(str(head_manifest.parent / "nii" / "s1.nii.gz") + ": the embedding is not finite")
    assert "as given to 3d/monai_resnet10: rescale the image" in message


def test_a_sticky_cuda_error_stops_the_job_and_keeps_the_finished_rows(head_manifest, tmp_path, monkeypatch):
    """GPU review: a device-side assert leaves the CUDA context unusable, and each later subject was
    recorded as failing with the same error; the job stops instead, and a rerun resumes the rows done."""
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    original = type(enc).embed_volume
    _counting(monkeypatch, enc, fail_at=3, error=RuntimeError("CUDA error: device-side assert triggered"))
    store = tmp_path / "f.h5"
    with pytest.raises(RuntimeError, match="CUDA error"):
        embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=8)
    monkeypatch.setattr(type(enc), "embed_volume", original)
    calls = _counting(monkeypatch, enc)
    report = embed_cohort3d(enc, cohort, store, "set", progress=False)
    assert report.resumed == 2 and calls == ["s2", "s3"] and not report.failures
