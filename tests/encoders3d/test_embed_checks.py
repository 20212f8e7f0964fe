"""``slice2vol embed`` and ``embed_cohort3d``: options and inputs that are refused once and up front,
with one clear line, instead of failing every subject (or losing the work) after embedding has started."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import slice2vol.encoders3d.embed as embed
from slice2vol.cache import FeatureStore
from slice2vol.cli import main
from slice2vol.data.manifest import load_manifest
from slice2vol.encoders3d import build_encoder3d, embed_cohort3d
from slice2vol.encoders3d.embed import partial_path
from tests.conftest import fail_subject, write_nifti
from tests.encoders3d.conftest import SPACING_2MM, head

KW = {"input_size": (32, 32, 32), "levels": [-1]}
RESNET10 = ["--encoder", "3d/monai_resnet10", "--no-progress", "--device", "cpu", "kwargs.levels=[-1]",
            "kwargs.input_size=[32,32,32]"]
DEEPBET_TINY = {"small_shape": (64, 32, 32), "shape": (64, 32, 32)}  # the smallest grids deepbet's networks take


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- a store in a folder that does not exist yet --------------------------------------------------
def test_a_killed_run_into_a_new_folder_keeps_its_rows_and_the_rerun_writes_the_store(head_manifest, tmp_path,
                                                                                     monkeypatch):
    """The partial file was written before the store's folder existed: the rows were lost at every commit
    (after 8 subjects the job died with 'no such file or folder'; with fewer, a warning every run)."""
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    store = tmp_path / "new" / "x" / "s.h5"
    real = type(enc).embed_volume
    calls = []

    def dying(self, volume, sliding_window=None):
        calls.append(volume.subject_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while embedding the third subject
        return real(self, volume, sliding_window)

    monkeypatch.setattr(type(enc), "embed_volume", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert partial_path(store, "set").is_file() and not FeatureStore(store).exists()
    monkeypatch.setattr(type(enc), "embed_volume", real)
    report = embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert report.resumed == 2 and report.done == ["s0", "s1", "s2", "s3"]
    ids, X, _ = FeatureStore(store).volume_embeddings("set")
    assert list(ids) == report.done and X.shape == (4, 512) and not partial_path(store, "set").exists()


def test_a_killed_run_through_a_symbolic_link_keeps_its_rows_beside_the_target(head_manifest, tmp_path, monkeypatch):
    """The partial file went beside the link: a rerun given the target itself started again."""
    cohort = load_manifest(head_manifest)
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    (tmp_path / "links").mkdir()
    store, link = tmp_path / "s.h5", tmp_path / "links" / "alias.h5"
    link.symlink_to(store)
    real = type(enc).embed_volume
    calls = []

    def dying(self, volume, sliding_window=None):
        calls.append(volume.subject_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, volume, sliding_window)

    monkeypatch.setattr(type(enc), "embed_volume", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_cohort3d(enc, cohort, link, "set", progress=False, commit_every=1)
    assert partial_path(store, "set").is_file() and not partial_path(link, "set").exists()
    monkeypatch.setattr(type(enc), "embed_volume", real)
    report = embed_cohort3d(enc, cohort, store, "set", progress=False, commit_every=1)
    assert report.resumed == 2 and link.is_symlink()


def test_embed_into_a_new_folder_writes_the_store_without_a_warning(head_manifest, tmp_path, capsys, caplog):
    store = tmp_path / "new" / "x" / "s.h5"
    assert main(["embed", "--manifest", str(head_manifest), "--store", str(store), *RESNET10]) == 0
    assert list(FeatureStore(store).volume_embeddings("3d/monai_resnet10")[0]) == ["s0", "s1", "s2", "s3"]
    assert "could not keep the rows" not in caplog.text and not partial_path(store, "3d/monai_resnet10").exists()


# -- a manifest whose every row is left out -------------------------------------------------------
def _duplicated(head_manifest) -> str:
    """Every row twice (IDs -d0, -d1): each image is shared by two subjects, so all are left out."""
    table = pd.read_csv(head_manifest)
    twice = pd.concat([table.assign(subject_id=table.subject_id + f"-d{k}") for k in (0, 1)])
    path = head_manifest.with_name("m8.csv")
    twice.to_csv(path, index=False)
    return str(path)


def test_a_manifest_with_every_subject_left_out_names_the_first_problem(head_manifest, tmp_path, capsys, monkeypatch):
    """It said 'no subject could be embedded with 3d/monai_resnet10 (0 failures; first: -)'."""
    manifest = _duplicated(head_manifest)
    built = []
    monkeypatch.setattr(embed.Encoder3DConfig, "build", lambda self: built.append(self.key))
    assert main(["embed", "--manifest", manifest, "--store", str(tmp_path / "f.h5"), *RESNET10]) == 2
    err = _one_line_error(capsys)
    assert f"{manifest}: no subject left to embed: 8 left out by the manifest checks (first: s0-d0: " in err
    assert "the same image file as subject(s) 's0-d1'" in err and built == []  # before the weights are loaded
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    with pytest.raises(ValueError, match="no subject left to embed: 8 left out by the manifest checks"):
        embed_cohort3d(enc, load_manifest(manifest), tmp_path / "f.h5", "x", progress=False)
    assert not FeatureStore(tmp_path / "f.h5").exists()


def test_no_subject_embedded_counts_the_rows_the_manifest_left_out(head_manifest, tmp_path, monkeypatch):
    table = pd.read_csv(head_manifest)
    table.loc[1, "t1"] = table.loc[0, "t1"]  # s0 and s1 share a file: both left out by the manifest checks
    table.to_csv(head_manifest, index=False)
    for sid in ("s2", "s3"):  # and the other two fail while embedding
        fail_subject(monkeypatch, embed, sid, OSError("disk gone"))
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    with pytest.raises(ValueError, match=r"no subject could be embedded with 3d/monai_resnet10 \(4 failures; first: "
                                         r"s0: .*same image file"):
        embed_cohort3d(enc, load_manifest(head_manifest), tmp_path / "f.h5", "x", progress=False)


# -- --checkpoint options -------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--mode", "sliding", "--overlap", "-0.5"], "--overlap must be a fraction in [0, 1), got -0.5"),
    (["--overlap", "1.0"], "--overlap must be a fraction in [0, 1), got 1.0"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
    (["--input-size", "0", "5", "5"], "--input-size must be 3 sizes >= 1 voxel (X, Y, Z), got (0, 5, 5)"),
])
def test_bad_checkpoint_options_are_one_line_exit_2_before_anything_is_read(args, expected, head_manifest, tmp_path,
                                                                           capsys):
    """They were taken, then failed every subject ('range() arg 3 must not be zero', a raw conv error),
    left voxels uncovered (overlap < 0) or tiled hundreds of thousands of windows (overlap 1)."""
    assert main(["embed", "--checkpoint", str(tmp_path / "no-run"), "--manifest", str(head_manifest), "--store",
                 str(tmp_path / "f.h5"), "--no-progress", *args]) == 2
    assert _one_line_error(capsys) == f"slice2vol embed: error: {expected}"  # the checkpoint is not even opened


def test_sliding_window_options_of_checkpoints_are_refused_for_a_registered_encoder(head_manifest, tmp_path, capsys):
    """--overlap and --batch-size were ignored without a word for registered encoders."""
    assert main(["embed", "--manifest", str(head_manifest), "--store", str(tmp_path / "f.h5"), *RESNET10,
                 "--overlap", "0.25", "--batch-size", "2"]) == 2
    assert "--overlap, --batch-size apply to --checkpoint runs only" in _one_line_error(capsys)


class _TinyNet(torch.nn.Module):
    embed_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4]


@pytest.mark.parametrize("options, expected", [
    ({"input_size": (0, 5, 5)}, "input_size must be 3 sizes >= 1 voxel (X, Y, Z), got (0, 5, 5)"),
    ({"overlap": 1.0}, "overlap must be a fraction in [0, 1), got 1.0"),
    ({"overlap": -0.5, "mode": "sliding"}, "overlap must be a fraction in [0, 1), got -0.5"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
])
def test_checkpoint_encoder_options_are_checked_when_built(options, expected):
    from slice2vol.ssl.export import CheckpointEncoder3D

    options = {"input_size": (8, 8, 8), **options}
    with pytest.raises(ValueError) as err:
        CheckpointEncoder3D(_TinyNet(), options.pop("input_size"), **options)
    assert str(err.value) == expected


def test_windows_refuse_an_overlap_outside_0_1():
    from slice2vol.ssl.export import windows

    assert len(windows((16, 8, 8), (8, 8, 8), 0.5)) == 3
    for overlap in (-0.5, 1.0):
        with pytest.raises(ValueError, match=r"overlap must be a fraction in \[0, 1\)"):
            windows((16, 8, 8), (8, 8, 8), overlap)


# -- 3d/deepbet -----------------------------------------------------------------------------------
@pytest.mark.parametrize("options, expected", [
    ({"bbox_margin": -0.6}, "bbox_margin must be a fraction >= 0 of the box per side, got -0.6"),
    ({"bbox_margin": float("nan")}, "bbox_margin must be a fraction >= 0 of the box per side, got nan"),
    ({"threshold": 1.5}, "threshold must be a brain probability in [0, 1), got 1.5"),
    ({"pooling": "mean"}, "pooling must be avg, max or gem, got 'mean'"),
    ({"channel": -1}, "channel must be the T1's channel index (>= 0) or null, got -1"),
])
def test_deepbet_options_are_checked_when_built(options, expected):
    """bbox_margin=-0.6 was taken, then failed every subject with 'Input and output sizes should be greater than 0'."""
    with pytest.raises(ValueError) as err:
        build_encoder3d("3d/deepbet", "random", networks=["bbox"], **DEEPBET_TINY, **options)
    assert str(err.value) == f"3d/deepbet: {expected}"


def test_deepbet_with_sliding_windows_is_refused_once_before_embedding(head_manifest, tmp_path, capsys, monkeypatch):
    """It failed once per subject (deepbet finds the brain box on the whole volume) and then the whole run."""
    from slice2vol.encoders3d.deepbet import DeepBetEncoder

    seen = []
    monkeypatch.setattr(DeepBetEncoder, "preprocess", lambda self, volume: seen.append(volume.subject_id))
    assert main(["embed", "--encoder", "3d/deepbet", "--manifest", str(head_manifest), "--store",
                 str(tmp_path / "f.h5"), "--sliding-window", "--no-progress", "kwargs.networks=[bbox]",
                 "kwargs.small_shape=[64,32,32]", "kwargs.shape=[64,32,32]"]) == 2
    assert _one_line_error(capsys).endswith("3d/deepbet: sliding windows are not supported (its preprocessing needs "
                                            "the whole volume); embed whole volumes (no --sliding-window / "
                                            "sliding_window: null)")
    assert seen == [] and not FeatureStore(tmp_path / "f.h5").exists()


@pytest.fixture(scope="module")
def deepbet_bbox():
    return build_encoder3d("3d/deepbet", "random", networks=["bbox"], **DEEPBET_TINY)


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_deepbet_on_a_constant_volume_is_a_clear_error_not_nan(value, head_volume, deepbet_bbox):
    """Its intensity rescale (x - low) / (high - low) was 0 / 0: NaN embeddings."""
    volume = dataclasses.replace(head_volume, data=np.full_like(head_volume.data, value))
    expected = rf"^3d/deepbet: constant volume \(all voxels = {value:g}\): nothing to embed$"
    with pytest.raises(ValueError, match=expected):
        deepbet_bbox.encode(deepbet_bbox.preprocess(volume))
    almost = np.zeros_like(head_volume.data)
    almost[0, 3, 3, 3] = 5.0  # one bright voxel: the 0.5% and 99.5% quantiles are still equal
    with pytest.raises(ValueError, match=r"0.5% and 99.5% intensity quantiles are equal \(0; intensities 0 to 5\)"):
        deepbet_bbox.embed_volume(dataclasses.replace(head_volume, data=almost))
    assert np.isfinite(deepbet_bbox.embed_volume(head_volume).numpy()).all()


def test_a_constant_file_fails_its_subject_with_the_loaders_message(head_manifest, tmp_path, capsys):
    write_nifti(head_manifest.parent / "nii" / "s1.nii.gz", np.full((28, 30, 26), 7.0, np.float32), SPACING_2MM)
    assert main(["embed", "--encoder", "3d/deepbet", "--manifest", str(head_manifest), "--store",
                 str(tmp_path / "f.h5"), "--no-progress", "kwargs.networks=[bbox]", "kwargs.small_shape=[64,32,32]",
                 "kwargs.shape=[64,32,32]"]) == 1
    err = capsys.readouterr().err
    assert "failed: s1: " in err and "s1.nii.gz: constant volume (all voxels = 7)" in err
    assert list(FeatureStore(tmp_path / "f.h5").volume_embeddings("3d/deepbet")[0]) == ["s0", "s2", "s3"]


def test_a_non_finite_embedding_of_a_constant_volume_says_so(head_manifest, tmp_path, monkeypatch):
    """The non-finite message said 'rescale the image' for a volume of one value, which no rescale helps."""
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    real_load = embed.load_subject

    def constant(subject, *args, **kwargs):
        volume = real_load(subject, *args, **kwargs)
        if subject.subject_id == "s1":
            volume = dataclasses.replace(volume, data=np.full_like(volume.data, 3.0))
        return volume

    monkeypatch.setattr(embed, "load_subject", constant)
    real = enc.embed_volume
    monkeypatch.setattr(enc, "embed_volume",
                        lambda v, w=None: real(v, w) * (float("nan") if v.subject_id == "s1" else 1.0))
    report = embed_cohort3d(enc, load_manifest(head_manifest), tmp_path / "f.h5", "x", progress=False)
    assert [f.subject_id for f in report.failures] == ["s1"]
    assert report.failures[0].message.endswith("the embedding is not finite (NaN/Inf); constant volume (all voxels = "
                                               "3): nothing to embed")


# -- failures in the set's provenance ---------------------------------------------------------------
def test_the_provenance_of_an_embedded_set_lists_the_subjects_that_failed(head_manifest, tmp_path, monkeypatch):
    """They went only to stderr: the manifest's left-out rows and the subjects that failed to embed."""
    table = pd.read_csv(head_manifest)
    table.loc[len(table)] = {"subject_id": "gone", "age": 50.0, "sex": "F", "t1": "nii/gone.nii.gz"}
    table.to_csv(head_manifest, index=False)
    fail_subject(monkeypatch, embed, "s2", OSError("disk gone"))
    enc = build_encoder3d("3d/monai_resnet10", **KW)
    report = embed_cohort3d(enc, load_manifest(head_manifest), tmp_path / "f.h5", "x", progress=False)
    assert report.done == ["s0", "s1", "s3"]
    ids, _, prov = FeatureStore(tmp_path / "f.h5").volume_embeddings("x")
    assert list(ids) == ["s0", "s1", "s3"] and prov["n_failures"] == 2
    assert [f.split(":")[0] for f in prov["failures"]] == ["gone", "s2"]
    assert "gone.nii.gz" in prov["failures"][0] and "disk gone" in prov["failures"][1]
