"""``slice2vol embed`` with registered 3D encoders, in-process (exit codes, store contents, messages)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from slice2vol.cache import FeatureStore
from slice2vol.cli import main
from tests.conftest import fail_subject


def test_embed_a_cohort_with_overrides(head_manifest, tmp_path, capsys):
    store = tmp_path / "feats.h5"
    argv = ["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", str(store),
            "--device", "cpu", "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]
    assert main(argv) == 0
    ids, X, prov = FeatureStore(store).volume_embeddings("3d/monai_resnet10")
    assert list(ids) == ["s0", "s1", "s2", "s3"] and X.shape == (4, 512)
    assert prov["command"] == "slice2vol embed" and prov["encoder_info"]["levels"] == [4]
    out = capsys.readouterr().out
    assert "wrote '3d/monai_resnet10', 4 subjects x 512" in out and "weights random:seed=0" in out


def test_embed_from_a_config_file_with_a_name_and_sliding_windows(head_manifest, tmp_path):
    config = tmp_path / "enc.yaml"
    config.write_text(yaml.safe_dump({"key": "3d/monai_resnet10", "kwargs": {"levels": [-1], "input_size": [32, 32, 64]}}))
    store = tmp_path / "feats.h5"
    assert main(["embed", "--config", str(config), "--manifest", str(head_manifest), "--store", str(store),
                 "--name", "r10-sw", "--sliding-window", "--no-progress", "sliding_window.roi_size=[32,32,32]",
                 "sliding_window.overlap=0"]) == 0
    _, X, prov = FeatureStore(store).volume_embeddings("r10-sw")
    assert X.shape == (4, 512) and np.isfinite(X).all() and prov["mode"] == "sliding"


def test_usage_errors_exit_2_with_one_line(head_manifest, tmp_path, capsys):
    store = str(tmp_path / "f.h5")
    assert main(["embed", "--encoder", "3d/nope", "--manifest", str(head_manifest), "--store", store]) == 2
    assert "unknown 3D encoder '3d/nope'" in capsys.readouterr().err
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--weights", str(tmp_path / "missing.pt"),
                 "--manifest", str(head_manifest), "--store", store]) == 2
    assert "missing.pt: weights file not found" in capsys.readouterr().err
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest)]) == 2
    assert "needs --store" in capsys.readouterr().err
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", store,
                 "kwargs.levels"]) == 2
    assert "overrides are KEY=VALUE" in capsys.readouterr().err


def test_a_failed_subject_exits_1_and_keeps_the_others(head_manifest, tmp_path, capsys, caplog):
    (head_manifest.parent / "nii" / "s2.nii.gz").write_bytes(b"broken")
    store = tmp_path / "f.h5"
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", str(store),
                 "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]) == 1
    err = capsys.readouterr().err
    # one line per failed subject, as slice2vol cache prints it: no log line ("skipping ...") before it
    said = [line for line in [*err.splitlines(), *caplog.messages] if "s2.nii.gz" in line]
    assert len(said) == 1 and said[0].startswith("  failed: s2: ")
    assert list(FeatureStore(store).volume_embeddings("3d/monai_resnet10")[0]) == ["s0", "s1", "s3"]


def test_list(capsys):
    assert main(["embed", "--list"]) == 0
    out = capsys.readouterr().out
    assert "3d/deepbet" in out and "package|random|file" in out and "3d/monai_resnet18" in out


def test_an_unexpected_error_fails_that_subject_only(head_manifest, tmp_path, capsys, monkeypatch):
    import slice2vol.encoders3d.embed as embed

    fail_subject(monkeypatch, embed, "s1", TypeError("cannot promote void to float32"))
    store = tmp_path / "f.h5"
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", str(store),
                 "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]) == 1
    err = capsys.readouterr().err
    assert "failed: s1:" in err and "TypeError: cannot promote void to float32" in err
    assert list(FeatureStore(store).volume_embeddings("3d/monai_resnet10")[0]) == ["s0", "s2", "s3"]


def test_a_sliding_window_out_of_range_is_one_line_exit_2(head_manifest, tmp_path, capsys):
    """roi_size 0 was accepted and failed inside MONAI on the first subject."""
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store",
                 str(tmp_path / "f.h5"), "--sliding-window", "--no-progress", "sliding_window.roi_size=[0,0,0]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sliding_window.roi_size must be 3 window sizes >= 1 voxel" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "f.h5").exists()


RESNET10 = ["--encoder", "3d/monai_resnet10", "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]


def test_a_rerun_keeps_and_reports_the_rows_of_a_subject_that_now_fails(head_manifest, tmp_path, capsys):
    """A rerun with a moved file used to write the set again without that subject's row."""
    store = tmp_path / "f.h5"
    argv = ["embed", "--manifest", str(head_manifest), "--store", str(store), *RESNET10]
    assert main(argv) == 0
    _, before, _ = FeatureStore(store).volume_embeddings("3d/monai_resnet10")
    (head_manifest.parent / "nii" / "s2.nii.gz").rename(tmp_path / "moved.nii.gz")
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "kept from before (failed in this run): s2" in captured.out and "3 unchanged, 1 kept" in captured.out
    assert "failed: s2:" in captured.err and "  failed:" not in captured.out
    ids, X, _ = FeatureStore(store).volume_embeddings("3d/monai_resnet10")
    assert list(ids) == ["s0", "s1", "s3", "s2"] and np.array_equal(X[[0, 1, 3, 2]], before)


def test_other_settings_under_the_same_name_need_replace(head_manifest, tmp_path, capsys):
    store = tmp_path / "f.h5"
    base = ["embed", "--manifest", str(head_manifest), "--store", str(store), "--encoder", "3d/monai_resnet10",
            "--no-progress", "kwargs.input_size=[32,32,32]"]
    assert main([*base, "kwargs.levels=[-1]"]) == 0
    capsys.readouterr()
    assert main([*base, "kwargs.levels=[-2]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "f.h5: set '3d/monai_resnet10' holds 4 embeddings made with other " \
                                          "settings" in err and "--replace" in err
    assert FeatureStore(store).volume_embeddings("3d/monai_resnet10")[1].shape == (4, 512)
    assert main([*base, "kwargs.levels=[-2]", "--replace"]) == 0
    assert "the set's 4 earlier rows were dropped (--replace)" in capsys.readouterr().out
    assert FeatureStore(store).volume_embeddings("3d/monai_resnet10")[1].shape == (4, 256)


def test_a_locked_store_is_one_line_exit_2_before_the_encoder_is_built(head_manifest, tmp_path, capsys, monkeypatch):
    import fcntl

    import slice2vol.encoders3d.embed as embed

    built = []
    monkeypatch.setattr(embed.Encoder3DConfig, "build", lambda self: built.append(self.key))
    store = tmp_path / "f.h5"
    with open(FeatureStore(store).lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["embed", "--manifest", str(head_manifest), "--store", str(store), *RESNET10]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "f.h5: another process is writing this store" in err and built == []


def _families() -> list[str]:
    from slice2vol.encoders3d import ENCODERS3D

    return ENCODERS3D.names()


@pytest.mark.parametrize("key", _families())
def test_an_unknown_option_is_one_line_exit_2_for_every_family(key, head_manifest, tmp_path, capsys):
    """MedicalNet and Models Genesis raised Python's TypeError (a traceback), MONAI its own TypeError."""
    assert main(["embed", "--encoder", key, "--manifest", str(head_manifest), "--store", str(tmp_path / "f.h5"),
                 "--no-progress", "kwargs.foo=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{key}: unknown option(s) ['foo'] (known: " in err and "levels" in err and "seed" in err


@pytest.mark.parametrize("key", ["3d/medicalnet_resnet10", "3d/models_genesis", "3d/monai_resnet10"])
@pytest.mark.parametrize("levels", ["foo", "1.5", "true", "[0,x]", "[]"])
def test_a_bad_levels_option_is_one_clear_line(key, levels, head_manifest, tmp_path, capsys):
    """``kwargs.levels=foo`` said ``invalid literal for int() with base 10: 'f'``."""
    assert main(["embed", "--encoder", key, "--manifest", str(head_manifest), "--store", str(tmp_path / "f.h5"),
                 "--no-progress", f"kwargs.levels={levels}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}: levels must be 'all', a stage index or a list" in err


@pytest.mark.parametrize("meta, expected", [
    ("[1, 2]", "meta.json: a JSON list, expected an object with method, spatial_dims, config"),
    ("{}", "meta.json: missing key(s) ['method', 'spatial_dims', 'config']"),
    ('{"method": "simclr", "spatial_dims": 3, "config": []}', "meta.json: config is [], expected a JSON object"),
    ('{"method": ', "meta.json: damaged"),
    # fuzz round 12: an edited config's own error named no file
    ('{"method": "bogus", "spatial_dims": 3, "config": {"method": "bogus"}}',
     "meta.json: its config cannot be rebuilt (unknown ssl method 'bogus'. Known: autoencoder, "),
    ('{"method": "simclr", "spatial_dims": 3, "config": {"method": "simclr", "data": {"volume_size": [-4, 8, 8]}}}',
     "meta.json: its config cannot be rebuilt (data.volume_size must be 3 whole numbers in [1, 2048], got [-4, 8, 8])"),
    (None, "run: no such checkpoint folder"),
])
def test_a_bad_checkpoint_is_one_line_naming_the_file(meta, expected, head_manifest, tmp_path, capsys):
    run = tmp_path / "run"
    if meta is not None:
        run.mkdir()
        (run / "meta.json").write_text(meta)
    assert main(["embed", "--checkpoint", str(run), "--manifest", str(head_manifest), "--store",
                 str(tmp_path / "f.h5"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and expected in err


def test_checkpoint_only_flags_are_refused_for_a_registered_encoder(tmp_path, capsys):
    from slice2vol.cli import main

    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", "m.csv", "--store", str(tmp_path / "s.h5"),
                 "--input-size", "0", "0", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--input-size apply to --checkpoint runs only; a registered encoder takes kwargs.input_size=[X,Y,Z] and "
        "--sliding-window")
