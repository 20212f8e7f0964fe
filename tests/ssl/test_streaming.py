"""Streaming SSL data: prepared HDF5 volumes read the same voxels as the in-memory bank, keyed sampling
is reproducible and split exactly over ranks, and a streaming run trains exactly like an in-memory one."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from slice2vol.data.manifest import load_manifest
from slice2vol.ssl.data import CropDataset, SliceDataset, VolumeBank
from slice2vol.ssl.streaming import (PreparedVolumes, SeededSamples, StepBatches, collect_failures, make_loader,
                                     prepare_cohort)
from slice2vol.ssl.trainer import load_checkpoint, pretrain
from tests.ssl.conftest import tiny_config


@pytest.fixture
def prepared(blob_manifest, tmp_path):
    cohort = load_manifest(blob_manifest)
    cfg = tiny_config("simclr", 3)
    cfg.data.volume_size = (20, 24, 16)  # not cubic: axes must not be mixed up
    report = prepare_cohort(cohort, cfg.data, tmp_path / "cache", progress=False)
    source = PreparedVolumes(report.directory, cohort.ids)
    bank = VolumeBank.from_cohort(cohort, cfg.data.volume, cfg.data.volume_size, progress=False)
    return cohort, cfg, report, source, bank


def test_prepared_volumes_read_what_the_bank_holds(prepared):
    _, _, report, source, bank = prepared
    assert sorted(report.prepared) == ["s0", "s1", "s2"] and not report.failures
    assert source.in_channels == bank.in_channels == 1
    box = (slice(3, 15), slice(0, 24), slice(5, 9))
    for i in range(len(bank)):
        assert source.shape(i) == bank.shape(i) == (20, 24, 16)
        assert torch.equal(source.read_image(i, box), bank.read_image(i, box))
        assert torch.equal(source.read_mask(i, box), bank.read_mask(i, box))
        for plane, index in (("axial", 7), ("coronal", 11), ("sagittal", 3)):
            assert torch.equal(source.read_slice(i, plane, index), bank.read_slice(i, plane, index))
            torch.testing.assert_close(source.slice_foreground(i, plane), bank.slice_foreground(i, plane))


@pytest.mark.parametrize("kind", ["crop", "slice"])
def test_same_generator_same_sample_from_disk_or_memory(prepared, kind):
    _, cfg, _, source, bank = prepared
    make = (lambda b: CropDataset(b, (24, 16, 8), 0.2)) if kind == "crop" else \
        (lambda b: SliceDataset(b, (32, 32), ["axial", "coronal", "sagittal"], 0.2))
    disk, memory = make(source), make(bank)
    for seed in range(6):
        a = disk.draw(seed % 3, torch.Generator().manual_seed(seed))
        b = memory.draw(seed % 3, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
    # crops larger than the volume along an axis (24 > 20) are zero-padded around the centred volume
    crop = CropDataset(bank, (24, 24, 24), 0.0).draw(0, torch.Generator().manual_seed(0))
    assert crop.shape == (1, 24, 24, 24) and float(crop[:, :2].abs().max()) == 0.0


def test_preparation_resumes_and_redoes_changed_files(blob_manifest, tmp_path):
    cohort = load_manifest(blob_manifest)
    data = tiny_config("simclr", 3).data
    first = prepare_cohort(cohort, data, tmp_path, progress=False)
    again = prepare_cohort(cohort, data, tmp_path, progress=False)
    assert again.prepared == [] and sorted(again.reused) == ["s0", "s1", "s2"]
    source = cohort.subjects[1].images["t1"]
    later = time.time() + 5
    os.utime(source, (later, later))
    third = prepare_cohort(cohort, data, tmp_path, progress=False)
    assert third.prepared == ["s1"]
    # a half-written file from a killed job is never mistaken for a prepared subject
    path = PreparedVolumes(first.directory, ["s2"]).paths[0]
    path.write_bytes(path.read_bytes()[:200])
    assert prepare_cohort(cohort, data, tmp_path, progress=False).prepared == ["s2"]
    # other ranks' shares are left alone; failures are recorded per rank and collected
    cohort.subjects[0].images["t1"] = tmp_path / "missing.nii.gz"
    shard = prepare_cohort(cohort, data, tmp_path / "other", rank=0, world_size=2, progress=False)
    assert [f.subject_id for f in shard.failures] == ["s0"] and shard.prepared == ["s2"]
    assert [f.subject_id for f in collect_failures(shard.directory, 2)] == ["s0"]
    assert "missing.nii.gz" in collect_failures(shard.directory, 2)[0].path


def test_keyed_samples_cover_each_subject_once_per_epoch_and_repeat():
    bank = VolumeBank.synthetic(5, (16, 16, 16))
    samples = SeededSamples(CropDataset(bank, (8, 8, 8), 0.0), seed=3)
    orders = [tuple(samples.subject_of(g) for g in range(5 * epoch, 5 * epoch + 5)) for epoch in range(4)]
    assert all(sorted(order) == list(range(5)) for order in orders)
    assert len(set(orders)) > 1  # a new permutation each epoch
    assert torch.equal(samples[17], SeededSamples(CropDataset(bank, (8, 8, 8), 0.0), seed=3)[17])
    assert not torch.equal(samples[17], SeededSamples(CropDataset(bank, (8, 8, 8), 0.0), seed=4)[17])


def test_step_batches_split_the_same_global_batch_over_ranks():
    single = list(StepBatches(2, 5, batch_size=8))
    for world, acc in ((2, 1), (4, 2), (8, 1)):
        per_rank = [list(StepBatches(2, 5, 8 // (world * acc), acc, rank, world)) for rank in range(world)]
        for step in range(3):
            got = sorted(g for rank in per_rank for mb in rank[step * acc:(step + 1) * acc] for g in mb)
            assert got == single[step]


def test_dataloader_workers_give_the_same_batches(prepared):
    _, _, _, source, _ = prepared
    sampler = CropDataset(source, (16, 16, 16), 0.2)
    main = list(make_loader(sampler, 0, 0, 3, 2, num_workers=0))
    workers = list(make_loader(sampler, 0, 0, 3, 2, num_workers=2))
    assert len(main) == len(workers) == 3
    for a, b in zip(main, workers):
        assert torch.equal(a, b)


def test_streaming_run_equals_in_memory_run(blob_manifest, tmp_path):
    cohort = load_manifest(blob_manifest)
    cfg = tiny_config("rotation", 3, steps=3, batch_size=2)
    runs = {}
    for streaming in (True, False):
        cfg.data.streaming = streaming
        runs[streaming] = pretrain(cfg, tmp_path / str(streaming), cohort=cohort, progress=False, plot=False)
    assert [r["loss"] for r in runs[True].history] == [r["loss"] for r in runs[False].history]
    a, _, meta = load_checkpoint(tmp_path / "True")
    b, _, _ = load_checkpoint(tmp_path / "False")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert meta["streaming"] is True and meta["subject_ids"] == ["s0", "s1", "s2"]
    assert (tmp_path / "True" / "volumes").is_dir() and not (tmp_path / "False" / "volumes").exists()


def test_subject_ids_restrict_the_run_and_a_resume_refuses_another_set(blob_manifest, tmp_path):
    cohort = load_manifest(blob_manifest)
    cfg = tiny_config("rotation", 3, steps=3, batch_size=2, checkpoint_every=1)
    pretrain(cfg, tmp_path / "run", cohort=cohort, progress=False, plot=False, subject_ids=["s2", "s0"],
             stop_after=2)
    meta = json.loads((tmp_path / "run" / "last" / "meta.json").read_text())
    assert meta["n_subjects"] == 2 and meta["subject_ids"] == ["s0", "s2"]  # manifest order
    with pytest.raises(ValueError, match=r"another subject set \(2 subjects; now missing: s2; now added: s1\)"):
        pretrain(cfg, tmp_path / "run", cohort=cohort, progress=False, plot=False, subject_ids=["s0", "s1"])
    with pytest.raises(ValueError, match="not in the cohort"):
        pretrain(cfg, tmp_path / "other", cohort=cohort, progress=False, subject_ids=["s0", "nobody"])
    from slice2vol.ssl.train import pretrain as pretrain_manifest  # the runner's entry point (a manifest path)

    done = pretrain_manifest(cfg, blob_manifest, tmp_path / "run", progress=False, subject_ids=["s0", "s2"])
    assert done.step == 3
