"""The feature store: layout, reads (single, bulk, Dataset, workers), crash leftovers, merge checks."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from slice2vol.cache import (
    FeatureStore,
    PlaneFeatures,
    SliceBagDataset,
    StoreError,
    StoreMismatch,
    SubjectFeatures,
    config_hash_of,
    diff_dicts,
    merge_stores,
    pad_bags,
    run_context,
)

PROV = {"encoder": "test/x", "encoder_kwargs": {}, "weights": "random", "weights_sha256": "",
        "state_sha256": "ab" * 32, "encoder_info": {"key": "test/x", "embed_dim": 8},
        "volume_config": {"spacing": None}, "slice_config": {"size": 32, "stride": 1},
        "dtype": "float16", "tokens": True, "amp": "none", **run_context()}
TYPES = {"age": "continuous", "sex": "categorical", "site": "categorical"}


def fake_subject(i: int, planes=("axial", "coronal"), dim: int = 8) -> SubjectFeatures:
    """Subject i: S = 3 + i slices whose features encode (subject, plane, slice) exactly in float16."""
    out = {}
    for k, plane in enumerate(planes):
        s = 3 + i
        feats = np.zeros((s, dim), np.float32)
        feats[:, 0], feats[:, 1], feats[:, 2] = i, k, np.arange(s)
        feats[:, 3:] = np.random.default_rng(10 * i + k).normal(size=(s, dim - 3))
        out[plane] = PlaneFeatures(feats, np.arange(s) * 2 + k, np.tile([i, k, 0.5], (s, 1)),
                                   tokens=np.full((s, 4, 2), i, np.float32), grid=(2, 2))
    return SubjectFeatures(f"s{i}", out, {"age": 30.0 + i, "sex": "MF"[i % 2], "site": i % 3})


def write_store(path: Path, ids=range(4), commit_every: int = 2, compact: bool = True) -> FeatureStore:
    store = FeatureStore(path, mode="a")
    subjects = [fake_subject(i) for i in ids]
    with store.writer_lock():
        for start in range(0, len(subjects), commit_every):
            store.commit_subjects(subjects[start:start + commit_every], PROV, label_types=TYPES)
        if compact:
            store.compact()
    return FeatureStore(path)


def test_layout_and_roundtrip(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.h5")
    assert store.subjects() == ["s0", "s1", "s2", "s3"] and store.planes == ["axial", "coronal"]
    assert store.feature_set == config_hash_of(PROV) and store.provenance["encoder"] == "test/x"
    X = store.slice_features("s2", "coronal")
    assert X.dtype == np.float32 and X.shape == (5, 8)
    np.testing.assert_array_equal(X[:, :3], np.c_[np.full(5, 2), np.ones(5), np.arange(5)])
    np.testing.assert_allclose(X, fake_subject(2).planes["coronal"].features, rtol=1e-3, atol=1e-3)
    meta = store.slice_meta("s2", "coronal")
    np.testing.assert_array_equal(meta["indices"], [1, 3, 5, 7, 9])
    np.testing.assert_array_equal(meta["positions"][0], [2, 1, 0.5])
    tokens, grid = store.slice_tokens("s3", "axial")
    assert tokens.shape == (6, 4, 2) and grid == (2, 2) and (tokens == 3).all()
    labels = store.labels()
    assert list(labels.columns) == ["age", "sex", "site"] and labels.index.name == "subject_id"
    assert labels.loc["s1"].tolist() == [31.0, "F", 1] and store.label_types == TYPES
    # one contiguous float16 dataset per plane, subjects located by offsets
    with h5py.File(tmp_path / "s.h5", "r") as f:
        group = f["planes/axial"]
        assert group["features"].shape == (3 + 4 + 5 + 6, 8) and group["features"].dtype == np.float16
        assert group["features"].chunks is None and group["features"].compression is None
        np.testing.assert_array_equal(group["offsets"][()], [0, 3, 7, 12, 18])
        assert f.attrs["format"] == "slice2vol.features"
    with pytest.raises(KeyError, match="no plane 'sagittal'"):
        store.slice_features("s0", "sagittal")
    with pytest.raises(KeyError, match="'nobody' has no axial"):
        store.slice_features("nobody", "axial")


def test_bulk_reads_match_single_reads(tmp_path: Path) -> None:
    # main file + two uncompacted parts: the reader sees them as one store
    write_store(tmp_path / "b.h5", ids=range(6), commit_every=3)
    store = FeatureStore(tmp_path / "b.h5", mode="a")
    with store.writer_lock():
        store.commit_subjects([fake_subject(6)], PROV, label_types=TYPES)
        store.commit_subjects([fake_subject(7)], PROV, label_types=TYPES)
    store = FeatureStore(tmp_path / "b.h5")
    assert len(store.segment_paths()) == 3 and len(store) == 8
    for subset in (["s7", "s1"], ["s5", "s0", "s7", "s3", "s6", "s2", "s1", "s4"]):  # sparse, dense paths
        X, offsets, meta = store.load_packed(subset, "coronal", meta=True)
        assert offsets[-1] == len(X) == sum(3 + int(s[1]) for s in subset)
        for i, sid in enumerate(subset):
            np.testing.assert_array_equal(X[offsets[i]:offsets[i + 1]], store.slice_features(sid, "coronal"))
            np.testing.assert_array_equal(meta["indices"][offsets[i]:offsets[i + 1]],
                                          store.slice_meta(sid, "coronal")["indices"])
    raw, _ = store.load_packed(["s2", "s6"], "axial", dtype=None)
    assert raw.dtype == np.float16 and np.array_equal(raw.astype(np.float32)[:5], store.slice_features("s2", "axial"))
    bags = store.load_slices(["s4", "s6"], ["axial"])
    assert [b.shape for b in bags["axial"]] == [(7, 8), (9, 8)]
    with pytest.raises(KeyError, match="1 subject"):
        store.load_packed(["s0", "zz"], "axial")


def test_dataset_in_dataloader_workers(tmp_path: Path) -> None:
    store = write_store(tmp_path / "d.h5", ids=range(5))
    store.slice_features("s0", "axial")  # open handles in the parent first: workers must reopen
    pickle.loads(pickle.dumps(store)).slice_features("s1", "axial")
    dataset = SliceBagDataset(store, planes=["axial", "coronal"], label="age")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=lambda items: (pad_bags(items, "axial"), items))
    seen = []
    for (padded, mask), items in loader:
        assert padded.shape[0] == mask.shape[0] == len(items)
        for row, item in enumerate(items):
            n = 3 + int(item["subject_id"][1:])
            assert mask[row].sum() == n and item["label"] == 30.0 + n - 3
            torch.testing.assert_close(padded[row, :n], torch.from_numpy(store.slice_features(item["subject_id"], "axial")))
            seen.append(item["subject_id"])
    assert seen == store.subjects()
    preloaded = SliceBagDataset(tmp_path / "d.h5", preload=True)
    torch.testing.assert_close(preloaded[3]["features"]["coronal"], dataset[3]["features"]["coronal"])


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "k.h5"
    write_store(path, ids=range(3))
    store = FeatureStore(path, mode="a")
    # a kill while writing leaves half a file under a temporary name ...
    (store.parts_dir).mkdir()
    (store.parts_dir / "part-x.h5.1234abcd.tmp").write_bytes(b"\x89HDF\r\n half a file")
    (tmp_path / "k.h5.deadbeef.tmp").write_bytes(b"\x89HDF")
    # ... and a kill after compaction but before the parts were deleted leaves a duplicate part
    with store.writer_lock():
        store.commit_subjects([fake_subject(1), fake_subject(3)], PROV, label_types=TYPES)
    reader = FeatureStore(path)
    assert reader.subjects() == ["s0", "s1", "s2", "s3"]  # s1 once, from the main file
    with store.writer_lock():
        assert store.clean_tmp() == 2
        store.compact()
    with h5py.File(path, "r") as f:
        assert [x.decode() for x in f["planes/axial/ids"][()]] == ["s0", "s1", "s2", "s3"]
    assert not store.parts_dir.exists() and not list(tmp_path.glob("*.tmp"))


def test_writer_lock_and_read_only(tmp_path: Path) -> None:
    store = write_store(tmp_path / "l.h5", ids=[0])
    with pytest.raises(PermissionError, match="read-only"):
        store.write_volume_embeddings("mean", ["s0"], np.zeros((1, 2)))
    writer = FeatureStore(tmp_path / "l.h5", mode="a")
    with writer.writer_lock():
        with pytest.raises(RuntimeError, match="another process is writing"):
            with FeatureStore(tmp_path / "l.h5", mode="a").writer_lock():
                pass
    with pytest.raises(FileNotFoundError, match="feature store not found"):
        FeatureStore(tmp_path / "none.h5").subjects()


def test_a_store_without_write_permission_is_read_but_not_rewritten(tmp_path: Path) -> None:
    """Fuzz round 23: a store protected with chmod a-w was still rewritten by `cache` and `aggregate`
    (a new version replaces the file, its folder being writable), and kept its mode 444."""
    import os

    from slice2vol.cache import StoreError

    path = tmp_path / "ro.h5"
    write_store(path, ids=[0, 1])
    before = path.read_bytes()
    os.chmod(path, 0o444)
    try:
        assert FeatureStore(path).subjects() == ["s0", "s1"]  # reading is fine
        with pytest.raises(StoreError, match=rf"^{path}: the store is read-only \(mode 444\): make it writable "
                                             r"\(chmod u\+w\) to add to it, or give another store$"):
            FeatureStore(path, mode="a")
        assert path.read_bytes() == before
        os.chmod(path, 0o644)
        FeatureStore(path, mode="a")  # writable again
    finally:
        os.chmod(path, 0o644)


def test_volume_embeddings(tmp_path: Path) -> None:
    store = write_store(tmp_path / "v.h5", ids=range(3))
    writer = FeatureStore(tmp_path / "v.h5", mode="a")
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.write_volume_embeddings("mean", ["s0", "s1", "s2"], X, {"method": "mean", "planes": ["axial"]})
    writer.write_volume_embeddings("ssl/simclr3d", ["s2", "s0"], X[:2] * 2, {"model": "simclr3d"})
    writer.write_volume_embeddings("mean", ["s0", "s1", "s2"], X + 1, {"method": "mean", "planes": ["coronal"]})
    store.refresh()
    assert store.volume_embedding_names() == ["mean", "ssl/simclr3d"]
    ids, got, prov = store.volume_embeddings("mean")
    assert ids == ["s0", "s1", "s2"] and np.array_equal(got, X + 1)  # newest set of a name wins
    assert prov["planes"] == ["coronal"] and prov["slice_feature_set"] == store.feature_set and prov["created"]
    with writer.writer_lock():
        writer.compact()
    ids, got, prov = FeatureStore(tmp_path / "v.h5").volume_embeddings("ssl/simclr3d")
    assert ids == ["s2", "s0"] and np.array_equal(got, X[:2] * 2) and prov["model"] == "simclr3d"
    for k in range(10):  # many small writes fold into one part; the main file is not rewritten
        writer.write_volume_embeddings(f"set{k}", ["s0"], np.full((1, 2), k))
    assert len(writer.segment_paths()) <= 1 + 8
    assert [FeatureStore(tmp_path / "v.h5").volume_embeddings(f"set{k}")[1][0, 0] for k in range(10)] == list(range(10))
    with pytest.raises(ValueError, match=r"expected \(2, D\)"):
        writer.write_volume_embeddings("bad", ["a", "b"], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        writer.write_volume_embeddings("bad", ["a"], np.full((1, 2), np.nan))
    with pytest.raises(KeyError, match="no volume embeddings 'nope'"):
        store.volume_embeddings("nope")


def test_volume_only_store(tmp_path: Path) -> None:
    """A 3D encoder writes embeddings and labels to a store that has no slice features."""
    store = FeatureStore(tmp_path / "3d.h5", mode="a")
    store.write_labels({"a": {"age": 40.0}, "b": {"age": 50.0}}, {"age": "continuous"})
    store.write_volume_embeddings("ssl/mae3d", ["a", "b"], np.eye(2))
    reader = FeatureStore(tmp_path / "3d.h5")
    assert reader.feature_set == "" and reader.planes == [] and reader.subjects() == []
    assert reader.labels()["age"].tolist() == [40.0, 50.0]
    assert reader.volume_embeddings("ssl/mae3d")[0] == ["a", "b"]


def test_check_identity_names_the_difference(tmp_path: Path) -> None:
    store = write_store(tmp_path / "i.h5", ids=[0])
    other = {**PROV, "slice_config": {"size": 64, "stride": 1}, "host": "elsewhere"}
    with pytest.raises(StoreMismatch, match=r"slice_config.size: 32 -> 64"):
        FeatureStore(tmp_path / "i.h5", mode="a").check_identity(other)
    # volatile keys (host, date, versions) do not make another feature set
    FeatureStore(tmp_path / "i.h5", mode="a").check_identity({**PROV, "host": "elsewhere", "created": "x"})
    assert store.feature_set == config_hash_of({**PROV, "host": "elsewhere"})


@pytest.mark.parametrize("a, b, expected", [
    ({"x": 1}, {"x": 1}, []),
    ({"x": 1, "y": {"z": [1, 2]}}, {"x": 1, "y": {"z": [1, 3]}}, ["y.z: [1, 2] -> [1, 3]"]),
    ({"x": 1}, {}, ["x: 1 -> (absent)"]),
    ({"t": (1, 2)}, {"t": [1, 2]}, []),  # tuples and lists are the same in JSON
])
def test_diff_dicts(a, b, expected) -> None:
    assert diff_dicts(a, b) == expected


def test_merge_checks_provenance_and_labels(tmp_path: Path) -> None:
    write_store(tmp_path / "a.h5", ids=[0, 1])
    write_store(tmp_path / "b.h5", ids=[2, 3], compact=False)  # a shard killed before compaction
    counts = merge_stores(tmp_path / "ab.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    assert counts["subjects"] == {"axial": 4, "coronal": 4}
    merged = FeatureStore(tmp_path / "ab.h5")
    np.testing.assert_array_equal(merged.slice_features("s3", "axial"), FeatureStore(tmp_path / "b.h5").slice_features("s3", "axial"))
    assert merged.labels().index.tolist() == ["s0", "s1", "s2", "s3"]

    odd = FeatureStore(tmp_path / "c.h5", mode="a")
    with odd.writer_lock():
        odd.commit_subjects([fake_subject(4)], {**PROV, "weights_sha256": "f" * 64}, label_types=TYPES)
    with pytest.raises(StoreMismatch, match=r"weights_sha256: '' -> 'ffff"):
        merge_stores(tmp_path / "ac.h5", [tmp_path / "a.h5", tmp_path / "c.h5"])
    newer = FeatureStore(tmp_path / "d.h5", mode="a")
    with newer.writer_lock():
        versions = {**PROV["versions"], "torch": "9.9.9"}
        newer.commit_subjects([fake_subject(5)], {**PROV, "versions": versions}, label_types=TYPES)
    with pytest.raises(StoreMismatch, match=r"versions.torch: .* -> '9.9.9'"):
        merge_stores(tmp_path / "ad.h5", [tmp_path / "a.h5", tmp_path / "d.h5"])
    merge_stores(tmp_path / "ad.h5", [tmp_path / "a.h5", tmp_path / "d.h5"], allow_version_mismatch=True)
    assert len(FeatureStore(tmp_path / "ad.h5")) == 3
    with pytest.raises(ValueError, match="also an input"):
        merge_stores(tmp_path / "a.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])


def test_zero_slice_subject_merges_with_token_parts(tmp_path: Path) -> None:
    empty = SubjectFeatures("empty", {"axial": PlaneFeatures(np.zeros((0, 8)), np.zeros(0), np.zeros((0, 3)))})
    store = FeatureStore(tmp_path / "z.h5", mode="a")
    with store.writer_lock():
        store.commit_subjects([empty], PROV)  # a part with no tokens dataset at all
        store.commit_subjects([fake_subject(1, planes=("axial",))], PROV)
        store.compact()
    reader = FeatureStore(tmp_path / "z.h5")
    assert reader.slice_features("empty", "axial").shape == (0, 8)
    assert reader.slice_tokens("empty", "axial")[0].shape == (0, 4, 2)
    assert (reader.slice_tokens("s1", "axial")[0] == 1).all()


# -- integrity: checksums, layout validation, verify (issue 14 point 4) -------------------------------
def flip_bit(path: Path, dataset: str, byte: int, bit: int = 0) -> None:
    """Flips one bit of a contiguous dataset's bytes in the file, as a bad disk or transfer would."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset() + byte
    with open(path, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value ^ (1 << bit)]))


def test_flipped_bit_is_caught_on_read_and_by_verify(tmp_path: Path) -> None:
    from slice2vol.cache import StoreCorrupt

    path = tmp_path / "bit.h5"
    write_store(path, ids=range(4))
    clean = FeatureStore(path)
    before = {s: clean.slice_features(s, "axial") for s in clean.subjects()}
    assert clean.verify().ok and clean.verify().checked == 8
    clean.close()
    # one mantissa bit of one value of s2 (rows 7:12 of axial, 8 float16 values per row)
    flip_bit(path, "planes/axial/features", byte=(8 * 9 + 5) * 2, bit=1)
    store = FeatureStore(path)
    with pytest.raises(StoreCorrupt, match=r"bit\.h5: subject 's2' axial features fail their checksum"):
        store.slice_features("s2", "axial")
    with pytest.raises(StoreCorrupt, match="'s2'"):
        store.load_packed(store.subjects(), "axial")
    for sid in ("s0", "s1", "s3"):  # the others still read, unchanged
        np.testing.assert_array_equal(store.slice_features(sid, "axial"), before[sid])
    report = store.verify()
    assert not report.ok and report.damaged_subjects == ["s2"] and report.checked == 7
    assert report.damaged[0][:2] == ("s2", "axial") and "features fail their checksum" in report.damaged[0][2]


def test_shifted_offset_is_caught(tmp_path: Path) -> None:
    from slice2vol.cache import StoreCorrupt

    path = tmp_path / "off.h5"
    write_store(path, ids=range(4))
    with h5py.File(path, "r+") as f:  # s1 gets one row of s2: counts 4, 5 become 5, 4 (issue: 13 and 15 rows)
        offsets = f["planes/axial/offsets"][()]
        offsets[2] += 1
        f["planes/axial/offsets"][...] = offsets
    with FeatureStore(path) as store:
        with pytest.raises(StoreCorrupt, match="'s1' axial features fail their checksum"):
            store.slice_features("s1", "axial")
        assert store.verify().damaged_subjects == ["s1", "s2"]
    with h5py.File(path, "r+") as f:  # offsets that do not end at the row count: the layout is refused
        offsets[-1] += 3
        f["planes/axial/offsets"][...] = offsets
    with pytest.raises(StoreCorrupt, match=r"off\.h5: /planes/axial: offsets end at row 21 but features has 18 rows"):
        FeatureStore(path).subjects()


def test_corrupted_ids_name_the_file(tmp_path: Path) -> None:
    from slice2vol.cache import StoreCorrupt

    path = tmp_path / "ids.h5"
    write_store(path, ids=range(3))
    with h5py.File(path, "r") as f:  # overwrite the references to the id strings
        ds = f["planes/coronal/ids"]
        offset, size = ds.id.get_offset(), ds.id.get_storage_size()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x13" * size)  # addresses past the end of the file (0xff.. makes HDF5 retry for seconds)
    with pytest.raises(StoreCorrupt, match=r"ids\.h5: /planes/coronal/ids cannot be read") as info:
        FeatureStore(path).subjects()
    assert "\n" not in str(info.value) and "cache verify" in str(info.value)
    report = FeatureStore(path).verify()
    assert not report.ok and "/planes/coronal/ids cannot be read" in report.broken[0]
    assert report.checked == 3  # the axial plane is fine


def test_newest_copy_of_a_subject_wins(tmp_path: Path) -> None:
    path = tmp_path / "new.h5"
    write_store(path, ids=range(3))
    store = FeatureStore(path, mode="a")
    redo = fake_subject(1)
    redo.planes["axial"].features = redo.planes["axial"].features + 100
    with store.writer_lock():
        store.commit_subjects([redo], PROV, label_types=TYPES)
    reader = FeatureStore(path)
    assert reader.subjects() == ["s0", "s1", "s2"]  # order of first appearance kept
    assert reader.slice_features("s1", "axial")[0, 0] == 101
    with store.writer_lock():
        store.compact()
    with h5py.File(path, "r") as f:
        assert f["planes/axial/features"][3, 0] == 101 and len(f["planes/axial/ids"]) == 3


# -- stores readable with plain h5py (issue 15 point 7) ------------------------------------------------
def test_store_reads_with_plain_h5py(tmp_path: Path) -> None:
    import hashlib
    import json

    path = tmp_path / "plain.h5"
    write_store(path, ids=range(3))
    writer = FeatureStore(path, mode="a")
    writer.write_volume_embeddings("ssl/mean", ["s0", "s1", "s2"], np.arange(6.0).reshape(3, 2), {"method": "mean"})
    writer.write_labels({"s9": {"age": 99.0}}, {"age": "continuous"})
    assert not writer.parts_dir.exists() and [p.name for p in writer.segment_paths()] == ["plain.h5"]
    # the recipe of docs/cache.md, with nothing but h5py, numpy, json and hashlib
    with h5py.File(path, "r") as f:
        group = f["planes/axial"]
        ids = [s.decode() for s in group["ids"][()]]
        offsets = group["offsets"][()]
        i = ids.index("s2")
        rows = group["features"][offsets[i]:offsets[i + 1]]
        assert hashlib.sha256(rows.tobytes()).hexdigest() == group["checksums"][i].decode()
        meta = group["indices"][offsets[i]:offsets[i + 1]].tobytes() + group["positions"][offsets[i]:offsets[i + 1]].tobytes()
        assert hashlib.sha256(meta).hexdigest() == group["meta_checksums"][i].decode()
        np.testing.assert_array_equal(rows.astype(np.float32), FeatureStore(path).slice_features("s2", "axial"))
        vol = f["volumes/ssl%2Fmean"]
        assert vol.attrs["name"] == "ssl/mean" and vol["X"][()].tolist() == [[0, 1], [2, 3], [4, 5]]
        assert json.loads(vol.attrs["provenance"])["method"] == "mean"
        labels = json.loads(f["labels"][()])
        assert labels["s9"] == {"age": 99.0} and labels["s1"]["sex"] == "F"
    # a store of volume embeddings only (3D encoders) is one .h5 file too
    only = FeatureStore(tmp_path / "3d.h5", mode="a")
    only.write_volume_embeddings("3d/x", ["a"], np.ones((1, 4)))
    with h5py.File(tmp_path / "3d.h5", "r") as f:
        assert f["volumes/3d%2Fx/X"].shape == (1, 4)


def test_volume_embeddings_checksum(tmp_path: Path) -> None:
    from slice2vol.cache import StoreCorrupt

    path = tmp_path / "vc.h5"
    write_store(path, ids=range(2))
    FeatureStore(path, mode="a").write_volume_embeddings("mean", ["s0", "s1"], np.ones((2, 4)))
    flip_bit(path, "volumes/mean/X", byte=9)
    with pytest.raises(StoreCorrupt, match=r"vc\.h5: volume embeddings 'mean' fail their checksum"):
        FeatureStore(path).volume_embeddings("mean")
    report = FeatureStore(path).verify()
    assert "volume embeddings 'mean'" in report.broken[0]
    # the remedy for derived data is to write it again, not to rerun the caching job (which keeps it)
    assert report.summary().splitlines()[-1] == ("  write damaged volume embeddings again: slice2vol aggregate (or "
                                                 "embed) with the same name")
    assert "rerun the caching job" not in report.summary()


def test_lock_conflict_names_store_and_holder(tmp_path: Path) -> None:
    from slice2vol.cache import StoreLocked

    store = write_store(tmp_path / "lk.h5", ids=[0])
    writer = FeatureStore(tmp_path / "lk.h5", mode="a")
    with writer.writer_lock():
        assert "pid" in (store.locked_by() or "")
        with pytest.raises(StoreLocked, match=r"lk\.h5: another process is writing this store \(pid \d+ on ") as info:
            FeatureStore(tmp_path / "lk.h5", mode="a").write_volume_embeddings("m", ["s0"], np.ones((1, 2)))
        assert "\n" not in str(info.value) and isinstance(info.value, RuntimeError)
    assert store.locked_by() is None


def test_merge_refuses_missing_and_unfinished_shards(tmp_path: Path) -> None:
    from slice2vol.cache import ShardsIncomplete, find_shards, shard_problems

    def shard(i: int, n: int, finished: bool = True) -> Path:
        path = tmp_path / f"f.shard-{i}-of-{n}.h5"
        store = FeatureStore(path, mode="a")
        with store.writer_lock():
            store.commit_subjects([fake_subject(i)], PROV, label_types=TYPES)
            if finished:
                store.compact(history=[{"event": "cache", "shard": [i, n]}], provenance=PROV)
        return path

    paths = [shard(0, 3), shard(2, 3)]
    assert find_shards(tmp_path / "f.h5") == paths
    with pytest.raises(ShardsIncomplete, match=r"missing shard\(s\) \[1\] of 3 \(f\.shard-1-of-3\.h5"):
        merge_stores(tmp_path / "f.h5", paths)
    paths.insert(1, shard(1, 3, finished=False))  # killed: committed parts, no finished job
    problems = shard_problems(paths)
    assert len(problems) == 1 and "shard 1/3 did not finish" in problems[0]
    with pytest.raises(ShardsIncomplete, match="did not finish"):
        merge_stores(tmp_path / "f.h5", paths)
    assert not (tmp_path / "f.h5").exists()
    counts = merge_stores(tmp_path / "f.h5", paths, require_complete=False)
    assert counts["subjects"]["axial"] == 3
    # two different files both named shard 0 of 3 (two runs copied from two places; fuzz round 16)
    (tmp_path / "copy").mkdir()
    twin = tmp_path / "copy" / "f.shard-0-of-3.h5"
    twin.write_bytes(paths[0].read_bytes())
    complete = [paths[0], shard(1, 3), paths[2]]
    assert shard_problems(complete) == [] and shard_problems(complete + [paths[0]]) == []  # one file twice
    assert shard_problems(complete + [twin]) == [f"shard 0/3 given as 2 different files ({paths[0]}, {twin}); "
                                                 "give one per shard"]


def test_merge_joins_the_volume_embeddings_of_shards_made_the_same_way(tmp_path: Path, caplog) -> None:
    """Shards aggregated one by one: the merged store used to keep one shard's set only (6 of 12
    subjects in ``mean``), without a word."""
    rng = np.random.default_rng(0)
    a, b = write_store(tmp_path / "a.h5", ids=[0, 1]), write_store(tmp_path / "b.h5", ids=[2, 3])
    rows = {f"s{i}": rng.normal(size=3).astype(np.float32) for i in range(4)}
    for store, ids in ((a, ["s0", "s1"]), (b, ["s2", "s3"])):
        store = FeatureStore(store.path, mode="a")
        store.write_volume_embeddings("mean", ids, np.stack([rows[s] for s in ids]), {"aggregator": "mean"})
        # a trainable aggregator fitted on each shard's own subjects: two different models
        store.write_volume_embeddings("mil", ids, np.stack([rows[s] for s in ids]), {"aggregator": "mil",
                                                                                    "train_ids": ids})
    FeatureStore(a.path, mode="a").write_volume_embeddings("only_a", ["s0"], rows["s0"][None], {"aggregator": "x"})
    counts = merge_stores(tmp_path / "ab.h5", [a.path, b.path])
    assert counts["volume_sets"] == ["mean"] and set(counts["volume_sets_dropped"]) == {"mil", "only_a"}
    assert "made it differently (train_ids" in counts["volume_sets_dropped"]["mil"]
    assert "1 input(s) do not hold it" in counts["volume_sets_dropped"]["only_a"]
    merged = FeatureStore(tmp_path / "ab.h5")
    ids, X, prov = merged.volume_embeddings("mean")
    assert ids == ["s0", "s1", "s2", "s3"] and prov["aggregator"] == "mean"
    np.testing.assert_array_equal(X, np.stack([rows[s] for s in ids]))
    assert merged.volume_embedding_names() == ["mean"]
    assert any("volume embeddings 'mil' not merged" in r.message for r in caplog.records)
    # a damaged set in one shard is left out, with its checksum error; the slice features still merge
    flip_bit(b.path, "volumes/mean/X", byte=5)
    counts = merge_stores(tmp_path / "ab2.h5", [a.path, b.path])
    assert "mean" not in counts["volume_sets"] and "fail their checksum" in counts["volume_sets_dropped"]["mean"]
    assert counts["subjects"] == {"axial": 4, "coronal": 4}


def test_merge_does_not_replace_a_store_it_would_lose_data_of(tmp_path: Path) -> None:
    """merge writes a new file: an existing store at --store of another feature set, with subjects no
    input holds, or with volume embeddings used to be replaced without a word."""
    write_store(tmp_path / "a.h5", ids=[0, 1])
    write_store(tmp_path / "b.h5", ids=[2, 3])
    other = FeatureStore(tmp_path / "other.h5", mode="a")
    with other.writer_lock():
        other.commit_subjects([fake_subject(0)], {**PROV, "encoder": "tv/other"}, label_types=TYPES)
    with pytest.raises(StoreMismatch, match=r"other.h5: already a store of feature set \w+ \(tv/other\), the inputs "
                                            r"are \w+ \(.*\); merge into another --store"):
        merge_stores(tmp_path / "other.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    assert FeatureStore(tmp_path / "other.h5").provenance["encoder"] == "tv/other"  # untouched
    write_store(tmp_path / "c.h5", ids=[4])
    with pytest.raises(StoreError, match=r"c.h5: already a store holding 1 subject\(s\) no input has \(e.g. \['s4'\]\)"):
        merge_stores(tmp_path / "c.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    # rerunning the same merge is fine; once the result holds volume embeddings it is not replaced
    merge_stores(tmp_path / "ab.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    merge_stores(tmp_path / "ab.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    FeatureStore(tmp_path / "ab.h5", mode="a").write_volume_embeddings(
        "mean", ["s0", "s1", "s2", "s3"], np.zeros((4, 3), np.float32), {"kind": "x"})
    with pytest.raises(StoreError, match=r"ab.h5: already a store with volume embeddings \['mean'\]"):
        merge_stores(tmp_path / "ab.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])


def test_cli_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """``slice2vol cache info ... | head -1`` used to end in 'error: [Errno 32] Broken pipe'."""
    import subprocess
    import sys

    write_store(tmp_path / "a.h5", ids=[0, 1])
    proc = subprocess.Popen([sys.executable, "-m", "slice2vol.cli", "cache", "info", "--store", str(tmp_path / "a.h5")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # the reader goes away before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Broken pipe" not in err and "Traceback" not in err


def test_hand_edited_json_of_the_wrong_type_or_content_is_caught(tmp_path: Path) -> None:
    """Provenance or labels JSON of another type gave AttributeError/TypeError tracebacks; an edited
    provenance (another encoder name) was shown and used under the old feature-set hash unnoticed."""
    import json

    from slice2vol.cache import StoreCorrupt

    write_store(tmp_path / "s.h5", ids=[0, 1]).close()
    assert FeatureStore(tmp_path / "s.h5").verify().ok
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = json.dumps({**prov, "encoder": "tv/other"})
    report = FeatureStore(tmp_path / "s.h5").verify()
    assert not report.ok and any("the provenance does not hash to the stored feature set" in b for b in report.broken)
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        f.attrs["provenance"] = json.dumps([1, 2])
        labels = f["labels"][()]
        del f["labels"]
        f["labels"] = json.dumps(["s0", "s1"])
    with pytest.raises(StoreCorrupt, match=r"attribute 'provenance' holds a JSON list, not the dict a store writes"):
        FeatureStore(tmp_path / "s.h5").provenance
    with pytest.raises(StoreCorrupt, match=r"/labels is not a mapping subject -> \{label: value\}"):
        FeatureStore(tmp_path / "s.h5").labels()
    assert labels  # the original was readable


def test_merge_with_a_missing_manifest_stops_before_writing(tmp_path: Path, capsys) -> None:
    from slice2vol.cli import main

    write_store(tmp_path / "a.h5", ids=[0, 1])
    write_store(tmp_path / "b.h5", ids=[2, 3])
    assert main(["cache", "merge", "--store", str(tmp_path / "ab.h5"), str(tmp_path / "a.h5"), str(tmp_path / "b.h5"),
                 "--manifest", str(tmp_path / "none.csv")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.csv: manifest not found")
    assert not (tmp_path / "ab.h5").exists()  # it used to write the merged store, then fail


def test_an_aggregated_set_goes_stale_when_its_subjects_are_recomputed(tmp_path: Path, capsys) -> None:
    """A volume set aggregated from the slice rows of s0..s3 is refused once s1's rows are replaced
    (a recompute after its input changed): the stored mean would be the old scan's. Adding a subject
    leaves it valid (its rows are all still there); aggregating again makes it fresh."""
    from slice2vol.aggregate import aggregate_store
    from slice2vol.cache import StaleEmbeddings
    from slice2vol.cli import main

    path = tmp_path / "s.h5"
    write_store(path)
    aggregate_store(path, "mean", plot=False)
    assert FeatureStore(path).volume_embeddings("mean")[0] == ["s0", "s1", "s2", "s3"]

    store = FeatureStore(path, mode="a")
    with store.writer_lock():
        store.commit_subjects([fake_subject(9)], PROV, label_types=TYPES)  # a new subject
    assert FeatureStore(path).volume_embeddings("mean")[0] == ["s0", "s1", "s2", "s3"]

    changed = fake_subject(1)
    changed.planes["axial"].features[:, 5] += 1.0  # s1 cached again from another scan
    with store.writer_lock():
        store.commit_subjects([changed], PROV, label_types=TYPES)
    with pytest.raises(StaleEmbeddings, match=r"s.h5: volume embeddings 'mean' were aggregated from slice features "
                                              r"that changed since .*: run slice2vol aggregate again"):
        FeatureStore(path).volume_embeddings("mean")
    report = FeatureStore(path).verify()
    assert not report.ok and any("'mean' were aggregated from slice features that changed" in b for b in report.broken)
    assert main(["export", "--store", str(path), "--embeddings", "mean", "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run slice2vol aggregate again" in err

    aggregate_store(path, "mean", plot=False)  # made again: fresh
    ids, X, _ = FeatureStore(path).volume_embeddings("mean")
    s1 = FeatureStore(path)
    expected = np.concatenate([s1.slice_features("s1", p) for p in s1.planes]).mean(0)
    np.testing.assert_allclose(X[ids.index("s1")], expected, rtol=1e-5)


@pytest.mark.parametrize("offset", [2048, 4096])
def test_damaged_hdf5_structure_is_one_line_naming_the_store(offset, tmp_path: Path, capsys) -> None:
    """h5py's own words ("Can't synchronously read data", "incorrect metadata checksum") name no file:
    the command's store is named, with what to do."""
    from slice2vol.cli import main

    path = tmp_path / "s.h5"
    write_store(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 512)
    assert main(["cache", "info", "--store", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"slice2vol cache: error: {path}: ") and "damaged" in err and "cache verify" in err


def test_a_write_refused_in_a_writable_folder_blames_the_file(tmp_path: Path) -> None:
    """EPERM while the folder is writable (chattr +i on the store) was reported as the folder's fault."""
    import errno

    from slice2vol.cache import _write_failure

    err = PermissionError(errno.EPERM, "Operation not permitted")
    message = str(_write_failure(tmp_path / "s.h5", err))
    assert message.startswith(f"{tmp_path / 's.h5'}: could not be written: the file cannot be replaced although its "
                              "folder is writable (marked immutable? lsattr shows it; chattr -i clears it)")
    assert "no permission to write in its folder" in str(_write_failure(tmp_path / "nowhere" / "s.h5", err))


def test_a_set_written_as_a_part_is_not_said_lost_when_compaction_fails(tmp_path: Path, monkeypatch) -> None:
    """With parts pending, a new volume set is committed as a part first; when the compaction then
    fails (an immutable main file), the message said "the store is as it was" although the set is
    there: it now says where it is kept."""
    import errno

    from slice2vol.cache import StoreWriteFailed, _write_failure

    path = tmp_path / "s.h5"
    write_store(path, compact=False)

    def refuse(self, *args, **kwargs):
        raise _write_failure(self.path, PermissionError(errno.EPERM, "Operation not permitted"))

    monkeypatch.setattr(FeatureStore, "_compact_all", refuse)
    with pytest.raises(StoreWriteFailed) as caught:
        FeatureStore(path, mode="a").write_volume_embeddings("mean", ["s0", "s1"], np.ones((2, 3)), {})
    message = str(caught.value)
    assert "the store is as it was" not in message
    assert message.endswith(f"what was written is kept in {FeatureStore(path).parts_dir} (the store reads it from "
                            "there) and joins the main file at the next compaction")
    assert FeatureStore(path).volume_embeddings("mean")[0] == ["s0", "s1"]


def test_a_rewritten_store_keeps_its_permissions(tmp_path: Path) -> None:
    """The main file is rewritten (temporary file, then rename): a group-shared 0664 store became 0644."""
    import stat as stat_

    path = tmp_path / "s.h5"
    write_store(path)
    path.chmod(0o664)
    FeatureStore(path, mode="a").write_volume_embeddings("mean", ["s0", "s1"], np.ones((2, 3)), {})
    assert stat_.S_IMODE(path.stat().st_mode) == 0o664
    assert FeatureStore(path).volume_embeddings("mean")[0] == ["s0", "s1"]


_FULL_DISK_SCRIPT = r"""
import errno, sys
import h5py, numpy as np
from slice2vol import cache

class Full:
    '''A file on a device with ``cap`` bytes left: a write past it fails with ENOSPC.'''
    def __init__(self, fh, cap):
        self.fh, self.cap = fh, cap
    def write(self, data):
        if self.fh.tell() + memoryview(data).nbytes > self.cap:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(data)
    def __getattr__(self, name):
        return getattr(self.fh, name)

cap = int(sys.argv[2])
guard = cache._GuardedFile(sys.argv[1])
guard.fh = Full(guard.fh, cap)
f = h5py.File(guard, "w", libver="latest")
for i in range(40):  # strings and arrays after the failure: HDF5 reads back what it wrote meanwhile
    g = f.create_group(f"planes/p{i}")
    cache._strings(g, "ids", [f"subject-{i}-{j}" * 3 for j in range(50)])
    g.create_dataset("features", data=np.full((64, 32), i, np.float32))
f.close()
print("error" if guard.error else "no error", guard.overlay_bytes > 0)
"""


@pytest.mark.parametrize("cap", [3_000, 40_000, 200_000])
def test_hdf5_survives_a_full_disk_mid_file(tmp_path, cap):
    """Fuzz round 7: a compaction on a nearly full disk crashed the interpreter (SIGSEGV in h5py's
    create_dataset): writes after ENOSPC were dropped, and HDF5 read its own metadata back as zeros.
    They are now kept in memory and read back, so HDF5 finishes and the job reports the disk."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path / "f.tmp"), str(cap)],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["error", "True"]


def test_guarded_file_reads_back_writes_made_after_the_failure(tmp_path):
    from slice2vol.cache import _GuardedFile

    guard = _GuardedFile(tmp_path / "g.tmp")
    guard.write(b"a" * 10)
    guard.fh = _NoSpace(guard.fh)  # the device is full from here on
    guard.seek(5)
    assert guard.write(b"XYZ") == 3 and guard.error is not None and guard.tell() == 8
    guard.seek(20)
    guard.write(b"QQ")  # past the file's end
    guard.seek(0)
    buf = bytearray(24)
    assert guard.readinto(buf) == 22
    assert bytes(buf[:22]) == b"aaaaaXYZaa" + bytes(10) + b"QQ"
    guard.seek(6)
    buf = bytearray(3)
    assert guard.readinto(buf) == 3 and bytes(buf) == b"YZa"
    guard.close()


class _NoSpace:
    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)


# -- stores without feature rows, dtype promotion in merge, set names (fuzz round 8) ------------------
FALLBACK = {**PROV, "dtype": "float32",
            "dtype_fallback": {"requested": "float16", "stored": "float32", "reason": "features underflow float16"}}


def _shard(path: Path, ids: list[int], prov: dict, dtype: str, shard: tuple[int, int]) -> Path:
    """A finished shard store of ``ids`` (none: a shard that cached nothing) stored as ``dtype``."""
    store = FeatureStore(path, mode="a")
    with store.writer_lock():
        store.compact(history=[{"event": "cache", "shard": list(shard)}], provenance=prov,
                      subjects=[fake_subject(i) for i in ids], dtype=dtype, label_types=TYPES)
    return path


def test_a_store_without_feature_rows_does_not_pin_the_dtype(tmp_path: Path) -> None:
    """H1: a job that cached nothing leaves a float16 feature set and its history; the next job may
    store float32 (the fallback, or --dtype float32), but not other settings."""
    path = tmp_path / "p.h5"
    _shard(path, [], PROV, "float16", (0, 1))
    store = FeatureStore(path, mode="a")
    assert store.feature_set == config_hash_of(PROV) and not store.holds_features
    store.check_identity(FALLBACK)
    with pytest.raises(StoreMismatch, match=r"slice_config.size: 32 -> 64"):
        store.check_identity({**FALLBACK, "slice_config": {"size": 64, "stride": 1}})
    with store.writer_lock():  # float32 rows in a part beside the float16 record: one store of FALLBACK
        store.commit_subjects([fake_subject(0)], FALLBACK, dtype="float32", label_types=TYPES)
    store.refresh()
    assert store.holds_features and store.feature_set == config_hash_of(FALLBACK)
    with store.writer_lock():
        store.compact()
    merged = FeatureStore(path)
    assert merged.provenance["dtype"] == "float32" and merged.verify().ok and merged.subjects() == ["s0"]
    assert merged.history == [{"event": "cache", "shard": [0, 1]}]  # the record of the empty job is kept
    # now its rows are float32: float16 features of the same settings are refused again
    with pytest.raises(StoreMismatch, match="dtype: 'float32' -> 'float16'"):
        merged.check_identity(PROV)


def test_a_changed_setting_on_a_fallback_store_names_only_that_setting(tmp_path: Path) -> None:
    """H10: the store's float32 came from the fallback of the same --dtype float16: not a difference."""
    _shard(tmp_path / "f.h5", [0], FALLBACK, "float32", (0, 1))
    with pytest.raises(StoreMismatch) as caught:
        FeatureStore(tmp_path / "f.h5").check_identity({**PROV, "slice_config": {"size": 64, "stride": 1}})
    assert "slice_config.size: 32 -> 64" in str(caught.value) and "dtype" not in str(caught.value)


def test_merge_leaves_empty_shards_out_and_promotes_float16_shards_to_a_fallback_float32(tmp_path: Path) -> None:
    """H2: shard 0 took the float32 fallback, shard 1 stayed float16, shard 2 cached nothing."""
    paths = [_shard(tmp_path / "f.shard-0-of-3.h5", [0, 1], FALLBACK, "float32", (0, 3)),
             _shard(tmp_path / "f.shard-1-of-3.h5", [2, 3], PROV, "float16", (1, 3)),
             _shard(tmp_path / "f.shard-2-of-3.h5", [], PROV, "float16", (2, 3))]
    half = FeatureStore(paths[1])
    stored16 = {(s, p): (half.slice_features(s, p), half.slice_tokens(s, p)[0]) for s in ("s2", "s3")
                for p in ("axial", "coronal")}
    counts = merge_stores(tmp_path / "f.h5", paths)
    assert counts["promoted"] == [str(paths[1])]
    merged = FeatureStore(tmp_path / "f.h5")
    assert merged.feature_set == config_hash_of(FALLBACK) and merged.provenance["dtype"] == "float32"
    assert merged.verify().ok and sorted(merged.subjects()) == ["s0", "s1", "s2", "s3"]
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["planes/axial/features"].dtype == np.float32 and f["planes/axial/tokens"].dtype == np.float32
    for (sid, plane), (feats, tokens) in stored16.items():  # exact: float16 values are float32 values
        np.testing.assert_array_equal(merged.slice_features(sid, plane), feats)
        np.testing.assert_array_equal(merged.slice_tokens(sid, plane)[0], tokens)
    assert [e.get("shard") for e in merged.history[:3]] == [[0, 3], [1, 3], [2, 3]]
    assert merged.history[-1]["dtype_promoted"] == {"from": "float16", "to": "float32", "inputs": [str(paths[1])]}


def test_merge_refuses_damaged_float16_rows_and_a_float32_that_was_asked_for(tmp_path: Path) -> None:
    from slice2vol.cache import StoreCorrupt

    wide = _shard(tmp_path / "w.h5", [0], FALLBACK, "float32", (0, 2))
    narrow = _shard(tmp_path / "n.h5", [1], PROV, "float16", (1, 2))
    flip_bit(narrow, "planes/axial/features", byte=6, bit=1)
    with pytest.raises(StoreCorrupt, match=r"n\.h5: subject 's1' axial features fail their checksum"):
        merge_stores(tmp_path / "m.h5", [wide, narrow])  # never laundered into a valid float32 checksum
    assert not (tmp_path / "m.h5").exists()
    chosen = _shard(tmp_path / "c.h5", [0], {**PROV, "dtype": "float32"}, "float32", (0, 2))
    good = _shard(tmp_path / "g.h5", [1], PROV, "float16", (1, 2))
    with pytest.raises(StoreMismatch, match=r"g\.h5 holds float16 .*rerun its shard with --dtype float32$"):
        merge_stores(tmp_path / "m.h5", [chosen, good])


@pytest.mark.parametrize("name, rule", [
    ("", "non-empty"),
    (".", "HDF5's names for a group itself"),
    ("..", "HDF5's names for a group itself"),
    ("a\nb", "control characters"),
    ("tab\there", "control characters"),
])
def test_set_names_hdf5_or_a_listing_cannot_hold_are_refused_in_one_line(tmp_path: Path, name: str,
                                                                        rule: str) -> None:
    """H6: '.' used to fail in HDF5 ("name already exists"), reported as a damaged store."""
    write_store(tmp_path / "n.h5", ids=[0])
    writer = FeatureStore(tmp_path / "n.h5", mode="a")
    with pytest.raises(StoreError, match=rule) as caught:
        writer.write_volume_embeddings(name, ["s0"], np.ones((1, 2)))
    message = str(caught.value)
    assert "\n" not in message and repr(name) in message and message.startswith(str(tmp_path / "n.h5"))
    assert writer.volume_embedding_names() == [] and writer.verify().ok
    with pytest.raises(KeyError, match="no volume embeddings"):
        writer.volume_embeddings(name)
    writer.write_volume_embeddings(".hidden", ["s0"], np.ones((1, 2)))  # a dot is fine elsewhere
    assert FeatureStore(tmp_path / "n.h5").volume_embedding_names() == [".hidden"]


@pytest.mark.parametrize("dataset, row, value", [
    ("indices", 3, -1),           # s1's first slice index 0 -> -1: still increasing, only the checksum sees it
    ("positions", 8, [2, 0, 9]),  # one slice centre of s2 moved
])
def test_damaged_slice_indices_or_positions_fail_the_bulk_read(tmp_path: Path, dataset, row, value) -> None:
    from slice2vol.cache import StoreCorrupt

    path = tmp_path / "meta.h5"
    write_store(path, ids=range(4))  # axial rows: s0 0:3, s1 3:7, s2 7:12, s3 12:18
    with h5py.File(path, "r+") as f:
        f[f"planes/axial/{dataset}"][row] = value
    victim = "s1" if row < 7 else "s2"
    with FeatureStore(path) as store:
        features, _ = store.load_packed(store.subjects(), "axial")  # the features are intact
        assert features.shape == (18, 8)
        with pytest.raises(StoreCorrupt, match=rf"meta\.h5: subject '{victim}' axial slice indices/positions fail "
                                               "their checksum"):
            store.load_packed(store.subjects(), "axial", meta=True)
        with pytest.raises(StoreCorrupt, match=f"'{victim}'"):
            store.slice_meta(victim, "axial")
        assert store.verify().damaged_subjects == [victim]


def test_verify_catches_slice_indices_out_of_order_even_with_a_matching_checksum(tmp_path: Path) -> None:
    """Two slices of s2 swapped and its checksum rewritten to match (a shifted offset in a store
    without checksums looks the same): the indices no longer increase, and verify names the subject."""
    from slice2vol.cache import block_sha256

    path = tmp_path / "order.h5"
    write_store(path, ids=range(4))
    with h5py.File(path, "r+") as f:
        group = f["planes/axial"]
        ids = [s.decode() if isinstance(s, bytes) else s for s in group["ids"][()]]
        i = ids.index("s2")
        a, b = group["offsets"][i], group["offsets"][i + 1]
        indices = group["indices"][a:b]
        assert indices.tolist() == [0, 2, 4, 6, 8]
        indices[[1, 2]] = indices[[2, 1]]
        group["indices"][a:b] = indices
        group["meta_checksums"][i] = block_sha256(indices, group["positions"][a:b])
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.slice_meta("s2", "axial")["indices"], [0, 4, 2, 6, 8])  # checksum ok
        report = store.verify()
    assert report.damaged_subjects == ["s2"]
    assert report.damaged[0][:2] == ("s2", "axial") and "slice indices do not increase" in report.damaged[0][2]


# -- a store given through a symbolic link -----------------------------------------------------------
def test_a_store_given_through_a_symbolic_link_is_its_target(tmp_path: Path) -> None:
    """Writes through a link replace the target (the link stays a link); the lock, parts folder and
    temporary files are the target's, so a writer on the link sees a lock held on the target."""
    from slice2vol.cache import StoreLocked

    target = tmp_path / "big" / "x.h5"
    write_store(target, ids=[0, 1])
    link = tmp_path / "link.h5"
    link.symlink_to(Path("big") / "x.h5")  # relative, as ln -s writes it

    store = FeatureStore(link, mode="a")
    assert store.path == target and store.lock_path == target.with_name("x.h5.lock")
    assert store.parts_dir == target.with_name("x.h5.parts")
    with store.writer_lock():
        store.commit_subjects([fake_subject(2)], PROV, label_types=TYPES)
        assert list(target.parent.glob("x.h5.parts/part-*.h5"))
        store.compact()
    assert link.is_symlink() and os.readlink(link) == os.path.join("big", "x.h5")
    assert sorted(FeatureStore(target).subjects()) == ["s0", "s1", "s2"]
    write_store(tmp_path / "more" / "m.h5", ids=[0, 1, 2, 3])
    merge_stores(link, [tmp_path / "more" / "m.h5"], require_complete=False)
    store.refresh()
    store.write_volume_embeddings("mean", ["s0", "s1", "s2", "s3"], np.ones((4, 2)))
    assert link.is_symlink() and os.readlink(link) == os.path.join("big", "x.h5")
    assert sorted(FeatureStore(target).subjects()) == ["s0", "s1", "s2", "s3"]
    assert FeatureStore(target).volume_embedding_names() == ["mean"]
    # no lock, part, log or temporary file of its own beside the link
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "link.h5", "more"]

    with FeatureStore(target, mode="a").writer_lock():
        with pytest.raises(StoreLocked) as info:
            with FeatureStore(link, mode="a").writer_lock():
                pass
    message = str(info.value)
    assert message.startswith(f"{link} (a link to {target}): another process is writing this store (pid ")
    assert f"lock {target}.lock" in message and "\n" not in message


def test_a_symbolic_link_that_loops_is_refused_in_one_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop.name)
    with pytest.raises(StoreError, match=r"loop\.h5: a symbolic link that loops back on itself") as info:
        FeatureStore(loop, mode="a")
    assert "\n" not in str(info.value)


def test_checksums_are_the_documented_hashes_whatever_the_byte_order():
    """``block_sha256`` is sha256 of the little-endian bytes (a big-endian copy hashes the same);
    ``volume_sha256`` is sha256 of the ids joined by newlines, then the float32 rows."""
    import hashlib

    from slice2vol.cache import block_sha256, volume_sha256

    a = np.arange(12, dtype="<f4").reshape(3, 4) / 7
    b = np.arange(3, dtype="<i8")
    assert block_sha256(a, b) == hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()
    assert block_sha256(a.astype(">f4"), b.astype(">i8")) == block_sha256(a, b)
    x = np.ones((2, 3), "<f4")
    assert volume_sha256(["ab", "c"], x) == hashlib.sha256(b"ab\nc" + x.tobytes()).hexdigest()
    assert volume_sha256(["ab", "c"], x) != volume_sha256(["a", "bc"], x)


def test_row_runs_join_only_when_consecutive_in_source_and_destination():
    """(start, stop, at): rows start..stop of a segment go to rows at.. of the packed array; one HDF5
    read may serve two ranges only if both sides continue each other (a subject asked for out of
    store order breaks the destination side)."""
    from slice2vol.cache import _runs

    assert _runs([(0, 5, 0), (5, 8, 5), (8, 9, 8)]) == [(0, 9, 0)]
    assert _runs([(0, 5, 3), (5, 8, 0)]) == [(0, 5, 3), (5, 8, 0)]  # consecutive in the source only
    assert _runs([(0, 5, 0), (6, 8, 5)]) == [(0, 5, 0), (6, 8, 5)]  # consecutive in the destination only
    assert _runs([]) == []
