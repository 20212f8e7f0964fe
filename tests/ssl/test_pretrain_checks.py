"""``slice2vol pretrain`` refuses what no run can use, in one line naming the key, before any volume is
read; a resume with another config is refused (naming the keys that differ), one to more steps works."""

from __future__ import annotations

import json

import pytest
import yaml

from slice2vol.cli import main

TINY = {
    "method": "autoencoder", "backbone": {"name": "cnn", "params": {"width": 8, "num_stages": 3}},
    "method_params": {"decoder_min_width": 8},
    "data": {"volume_size": [24, 24, 24], "crop_size": [16, 16, 16], "num_workers": 0},
    "train": {"steps": 2, "batch_size": 2, "lr": 0.002, "warmup_steps": 1, "log_every": 1, "device": "cpu",
              "count_flops": False},
}


@pytest.fixture
def pretrain_args(blob_manifest, tmp_path):
    """``pretrain`` arguments of a tiny CPU run (3 blob heads, 16^3 crops); append ``--out``."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return ["pretrain", "--config", str(config), "--manifest", str(blob_manifest), "--no-progress"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["train.accumulate=0"], "train.accumulate must be a whole number >= 1, got 0"),  # hung for ever
    (["train.checkpoint_every=0"], "train.checkpoint_every must be a whole number >= 1, got 0"),
    (["train.log_every=0"], "train.log_every must be a whole number >= 1, got 0"),
    (["train.batch_size=0"], "train.batch_size must be a whole number >= 1, got 0"),
    (["train.keep_every=-1"], "train.keep_every must be a whole number >= 0, got -1"),
    (["--steps", "-3"], "train.steps must be a whole number >= 0, got -3"),  # was rc 0, "checkpoint: None"
    (["train.lr=0"], "train.lr must be a finite number > 0, got 0.0"),
    (["train.lr=.nan"], "train.lr must be a finite number > 0, got nan"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio must be a finite number in [0, 1], got 2.0"),
    (["train.budget_flops=1e12", "train.budget_device_hours=1"], "not both"),
    (["--dims", "2", "data.planes=[]"], "data.planes must be a non-empty list"),
    (["--dims", "2", "data.planes=[axial,top]"], "data.planes: unknown plane(s) ['top']"),
    (["data.crop_size=[0,16,16]"], "data.crop_size must be 3 whole numbers in [1, 2048], got [0, 16, 16]"),
    (["data.crop_size=[16,16]"], "data.crop_size must be 3 whole numbers in [1, 2048], got [16, 16]"),
    (["data.volume_size=[1000000,64,64]"], "data.volume_size must be 3 whole numbers in [1, 2048]"),
    (["data.volume_size=[24,-1,24]"], "data.volume_size must be 3 whole numbers in [1, 2048]"),
    (["data.slice_size=[32,0]"], "data.slice_size must be 2 whole numbers in [1, 2048], got [32, 0]"),
    (["data.max_subjects=-2"], "data.max_subjects must be a whole number >= 0, got -2"),  # dropped 2
    (["data.min_foreground=1.5"], "data.min_foreground must be a finite number in [0, 1], got 1.5"),
    (["data.crops_per_subject=0"], "data.crops_per_subject must be a whole number >= 1, got 0"),
    (["data.crops_per_subject=3"], "train.batch_size=2 is not a whole number of groups"),
    (["spatial_dims=4"], "spatial_dims must be 2 or 3, got 4"),
    (["in_channels=0"], "in_channels must be a whole number >= 1, got 0"),
    (["--method", "byol"], "unknown ssl method 'byol'"),
    (["train.seed=4294967296"], "train.seed must be at most 4294967295, got 4294967296"),  # was taken mod 2^32
    (["--steps", "10000000000"], "train.steps must be at most 2147483647"),
    # method parameters: used to be checked (or not at all) only once the volumes were prepared
    (["method_params.noise_std=-1"], "autoencoder: method_params.noise_std must be a finite number in [0, 1000]"),
    (["method_params.loss=huber"], "autoencoder: method_params.loss must be one of ['mse', 'l1'], got 'huber'"),
    (["method_params.dropout=0.1"], "unexpected keyword argument 'dropout'"),
])
def test_bad_config_is_a_one_line_error_before_any_volume_is_read(pretrain_args, tmp_path, capsys, args,
                                                                  message):
    out = tmp_path / "run"
    assert main(pretrain_args + ["--out", str(out)] + args) == 2
    error = _error(capsys)
    assert error.startswith("slice2vol pretrain: error: ") and message in error
    assert not (out / "volumes").exists() and not (out / "last").exists()


def test_step_batches_refuse_zero_accumulation():
    from slice2vol.ssl.streaming import StepBatches

    with pytest.raises(ValueError, match="accumulate must be >= 1, got 0"):
        StepBatches(0, 1 << 40, 2, accumulate=0)  # iterating it yielded nothing, for ever


def test_train_checks_a_config_changed_after_construction(bank, tmp_path):
    from tests.ssl.conftest import tiny_config

    from slice2vol.ssl.trainer import pretrain

    cfg = tiny_config("rotation", 3, steps=2)
    cfg.train.accumulate = 0
    with pytest.raises(ValueError, match="train.accumulate must be a whole number >= 1, got 0"):
        pretrain(cfg, tmp_path / "run", bank=bank, progress=False, plot=False)


def test_resume_with_another_config_is_refused_and_more_steps_resume(pretrain_args, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="slice2vol.ssl.trainer")
    out = tmp_path / "run"
    run = pretrain_args + ["--out", str(out)]
    assert main(run) == 0
    last = out / "last"
    before = (last / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert main(run + ["--method", "genesis", "--steps", "4"]) == 2
    assert _error(capsys) == (f"slice2vol pretrain: error: {last}: saved by a run with another config "
                              "(method autoencoder -> genesis); use another --out or --no-resume")
    assert main(run + ["train.lr=0.5", "data.crop_size=[16,16,8]"]) == 2
    error = _error(capsys)
    assert "(data.crop_size [16, 16, 16] -> [16, 16, 8], train.lr 0.002 -> 0.5)" in error
    assert main(run + ["method_params.decoder_min_width=4"]) == 2
    assert "method_params.decoder_min_width 8 -> 4" in _error(capsys)
    assert (last / "model.safetensors").read_bytes() == before  # nothing was trained over it
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.002

    # a checkpoint without a config hash (older meta.json) resumes: the stored config is compared
    meta = json.loads((last / "meta.json").read_text())
    del meta["config_hash"]
    (last / "meta.json").write_text(json.dumps(meta))
    # more steps, another device spelling, other logging and checkpoint intervals: a resume
    assert main(run + ["--steps", "3", "--device", "cpu", "train.log_every=2", "train.checkpoint_every=7",
                       "train.keep_every=3"]) == 0
    assert "resuming" in caplog.text
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 3 and meta["method"] == "autoencoder" and (out / "step_0000003").is_dir()

    # no config in meta.json at all: resumes, with a warning
    meta.pop("config")
    (last / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    assert main(run + ["--steps", "4"]) == 0
    assert "stores no config" in caplog.text
    assert json.loads((last / "meta.json").read_text())["step"] == 4

    # fewer steps than the checkpoint has: said, and the checkpoint stays the 4-step one
    caplog.clear()
    assert main(run + ["--steps", "2"]) == 0
    assert "the checkpoint has trained 4 steps, more than train.steps=2" in caplog.text
    assert json.loads((last / "meta.json").read_text())["step"] == 4

    # --no-resume starts again with the new config
    assert main(run + ["--method", "genesis", "--no-resume"]) == 0
    meta = json.loads((last / "meta.json").read_text())
    assert meta["method"] == "genesis" and meta["step"] == 2


def test_no_checkpoint_written_is_an_error(pretrain_args, tmp_path, capsys, monkeypatch):
    from slice2vol.ssl import trainer

    def pretrain(cfg, out_dir, **kwargs):
        return trainer.TrainResult(out_dir=tmp_path / "run", step=0, final_loss=float("nan"), checkpoint=None)

    monkeypatch.setattr(trainer, "pretrain", pretrain)
    assert main(pretrain_args + ["--out", str(tmp_path / "run")]) == 2
    assert "no checkpoint was written (train.steps=2, 0 step(s) done)" in _error(capsys)


@pytest.mark.parametrize("flag, expected", [([], "cpu"), (["--device", "auto"], "auto")])
def test_the_config_files_device_stands_unless_device_is_given(pretrain_args, tmp_path, monkeypatch, flag,
                                                                expected):
    """``--device`` used to default to ``auto`` and always override the YAML's ``train.device``."""
    from slice2vol.ssl import trainer

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY.get("train", {}), "device": "cpu"}}))
    seen = []

    def pretrain(cfg, out_dir, **kwargs):
        seen.append(cfg.train.device)
        return trainer.TrainResult(out_dir=tmp_path / "run", step=0, final_loss=float("nan"), checkpoint=None)

    monkeypatch.setattr(trainer, "pretrain", pretrain)
    main(pretrain_args + ["--out", str(tmp_path / "run"), *flag])
    assert seen == [expected]


@pytest.mark.parametrize("method, dims, params, message", [
    ("simclr", 3, {"temperature": -0.1}, "simclr: method_params.temperature must be a finite number in (0, 100], got -0.1"),
    ("simclr", 3, {"temperature": 0}, "simclr: method_params.temperature must be a finite number in (0, 100]"),
    ("simclr", 3, {"proj_dim": 0}, "simclr: method_params.proj_dim must be a whole number >= 1, got 0"),
    ("mae", 3, {"mask_ratio": 1.0}, "mae: method_params.mask_ratio must be a finite number in (0, 1), got 1.0"),
    ("mae", 3, {"decoder_num_heads": 0}, "mae: method_params.decoder_num_heads must be a whole number >= 1, got 0"),
    ("genesis", 3, {"paint_prob": 1.5}, "genesis: method_params.paint_prob must be a finite number in [0, 1], got 1.5"),
    ("genesis", 3, {"loss": "ssim"}, "genesis: method_params.loss must be one of ['mse', 'l1'], got 'ssim'"),
    ("jigsaw", 3, {"jitter": 1.0}, "jigsaw: method_params.jitter must be a finite number in [0, 1), got 1.0"),
    ("jigsaw", 2, {"grid": 1}, "jigsaw: method_params.grid must be a whole number >= 2, got 1"),
    ("jigsaw", 3, {"num_permutations": 1}, "jigsaw: method_params.num_permutations must be a whole number >= 2"),
    ("rotation", 3, {"hidden": 0}, "rotation: method_params.hidden must be a whole number >= 1, got 0"),
])
def test_method_params_out_of_range_are_refused_when_the_method_is_built(method, dims, params, message):
    from tests.ssl.conftest import tiny_config

    from slice2vol.ssl import build_method

    cfg = tiny_config(method, dims)
    cfg.method_params = {**cfg.method_params, **params}
    with pytest.raises(ValueError) as err:
        build_method(cfg)
    assert message in str(err.value)


def test_a_bad_method_parameter_stops_pretrain_before_any_volume_is_prepared(pretrain_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(pretrain_args + ["--out", str(out), "--method", "simclr", "method_params={temperature: -1}"]) == 2
    assert "simclr: method_params.temperature must be a finite number in (0, 100], got -1" in _error(capsys)
    assert not (out / "volumes").exists()
