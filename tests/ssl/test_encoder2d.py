import pytest
import torch

from slice2vol.data.io import VolumeConfig
from slice2vol.data.manifest import load_manifest, load_subject
from slice2vol.data.slicing import SliceConfig, slice_volume
from slice2vol.encoders.base import ENCODERS, Encoder, build_encoder
from slice2vol.ssl import build_method
from slice2vol.ssl.trainer import save_checkpoint, seed_everything
from tests.ssl.conftest import tiny_config


def test_every_method_registers_a_2d_encoder():
    assert ENCODERS.names("ssl2d/*") == [f"ssl2d/{m}" for m in
                                         ("autoencoder", "genesis", "jigsaw", "mae", "rotation", "simclr")]


def test_trained_2d_checkpoint_is_a_slice_encoder(blob_manifest, tmp_path):
    seed_everything(0)
    cfg = tiny_config("simclr", 2)
    model = build_method(cfg)
    save_checkpoint(tmp_path / "last", model, cfg, step=0)
    enc = build_encoder("ssl2d/simclr", weights=str(tmp_path / "last"))
    assert isinstance(enc, Encoder)
    assert enc.info.embed_dim == 32 and enc.info.input_size == (32, 32) and len(enc.info.weights_sha256) == 64
    vol = load_subject(load_manifest(blob_manifest).subjects[0], VolumeConfig())
    slices = slice_volume(vol, SliceConfig(planes=("axial",), context=3, size=48))["axial"].images
    feats = enc.encode(slices)
    assert feats.shape == (len(slices), 32)
    x = enc.preprocess(slices)
    assert x.shape == (len(slices), 1, 32, 32)  # the middle slice of each 2.5D stack, at the training size
    with torch.no_grad():
        torch.testing.assert_close(feats, model.eval().encoder(x), rtol=1e-5, atol=1e-6)
    raw = torch.rand(2, 1, 32, 32)  # training-size one-channel slices in [0, 1] pass through unchanged
    assert torch.equal(enc.preprocess(raw), raw)
    tokens, grid = enc.tokens(slices[:2])
    assert tokens.shape == (2, grid[0] * grid[1], 32) and grid == (4, 4)


def test_2d_encoder_refuses_other_checkpoints(tmp_path):
    cfg = tiny_config("rotation", 3)
    save_checkpoint(tmp_path / "last", build_method(cfg), cfg, step=0)
    with pytest.raises(ValueError, match="not a 2D simclr encoder"):
        build_encoder("ssl2d/simclr", weights=str(tmp_path / "last"))
    with pytest.raises(ValueError, match="no hub weights"):
        build_encoder("ssl2d/simclr", weights="hub")
    assert build_encoder("ssl2d/rotation").info.weights == "random"


def test_caching_job_accepts_a_2d_ssl_checkpoint(blob_manifest, tmp_path):
    from slice2vol.cache import FeatureStore
    from slice2vol.extract import cache_cohort

    seed_everything(0)
    cfg = tiny_config("rotation", 2)
    save_checkpoint(tmp_path / "last", build_method(cfg), cfg, step=0)
    cohort = load_manifest(blob_manifest)
    cache_cohort(cohort, "ssl2d/rotation", tmp_path / "slices.h5", weights=str(tmp_path / "last"),
                 slice_cfg=SliceConfig(planes=("axial",), size=32), progress=False)
    store = FeatureStore(tmp_path / "slices.h5")
    assert store.subjects() == ["s0", "s1", "s2"]
    assert store.slice_features("s0", "axial").shape[1] == 32
    assert store.provenance["encoder"] == "ssl2d/rotation"
