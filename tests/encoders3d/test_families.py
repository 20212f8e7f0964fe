"""Family-specific behaviour: each reproduces a detail of its authors' code (geometry, normalisation,
preprocessing), checked against values computed here independently."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from slice2vol.encoders3d import build_encoder3d


def test_medicalnet_geometry_is_dilated_like_the_authors():
    enc = build_encoder3d("3d/medicalnet_resnet18", input_size=(32, 32, 32))
    with torch.no_grad():
        maps = enc.feature_maps(torch.randn(1, 1, 32, 32, 32))
    assert [m.shape[2] for m in maps] == [16, 8, 4, 4, 4]  # layer3/4 keep stride 8 (MedicalNet), not 16/32
    layer4_convs = [m for m in enc.network.layer4.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert all(c.dilation == (4, 4, 4) and c.padding == (4, 4, 4) and c.stride == (1, 1, 1) for c in layer4_convs)
    assert enc.network.layer2[0].conv1.stride == (2, 2, 2)


def test_medicalnet_preprocessing_matches_the_authors_recipe(head_volume):
    from scipy import ndimage

    enc = build_encoder3d("3d/medicalnet_resnet10", input_size=(16, 24, 20), noise_seed=5)
    x = enc.preprocess(head_volume)[0, 0].numpy()
    # authors: (D, H, W) array, zoom(order=0) to the input size, z-score of voxels > 0, zeros -> N(0, 1) noise
    data = np.transpose(head_volume.data[0], (2, 1, 0))
    data = ndimage.zoom(data, [16 / data.shape[0], 24 / data.shape[1], 20 / data.shape[2]], order=0)
    pixels = data[data > 0]
    expected = (data - pixels.mean()) / pixels.std()
    expected[data == 0] = np.random.default_rng(5).normal(0, 1, data.shape)[data == 0]
    assert x.shape == (16, 24, 20) and np.allclose(x, expected, atol=1e-5)
    assert enc.info.axes == "SAR"


def test_models_genesis_normalises_with_batch_statistics(tmp_path, head_volume):
    """ContBatchNorm3d ignores the running statistics, so two files differing only there embed the same."""
    source = build_encoder3d("3d/models_genesis", seed=1)
    state = source.network.state_dict()
    shifted = {k: (v + 5.0 if k.endswith(("running_mean", "running_var")) else v) for k, v in state.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in shifted.items()}}, tmp_path / "b.pt")
    a = build_encoder3d("3d/models_genesis", tmp_path / "a.pt").embed_volume(head_volume)
    b = build_encoder3d("3d/models_genesis", tmp_path / "b.pt").embed_volume(head_volume)
    assert torch.equal(a, b)
    # and the first normalisation equals batch normalisation computed by hand
    x = torch.randn(2, 1, 16, 16, 16)
    conv = source.network.down_tr64.ops[0].conv1
    y = conv(x)
    manual = (y - y.mean((0, 2, 3, 4), keepdim=True)) / (y.var((0, 2, 3, 4), unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(source.network.down_tr64.ops[0].bn1(y), manual, atol=1e-4)
    # Models Genesis' MRI intensity window: raw 0-4000 -> [0, 1]
    raw = head_volume.data[0]
    x = source.preprocess(head_volume)
    assert abs(float(x.max()) - min(float(raw.max()), 4000.0) / 4000.0) < 1e-6


def test_brainiac_drops_only_the_simclr_head_and_records_it(tmp_path, head_volume):
    source = build_encoder3d("3d/brainiac", input_size=(32, 32, 32), seed=2)
    state = dict(source.network.state_dict())
    state["projection_head.0.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, tmp_path / "BrainIAC.ckpt")
    enc = build_encoder3d("3d/brainiac", tmp_path / "BrainIAC.ckpt", input_size=(32, 32, 32))
    assert enc.info.extra["unused_keys"] == ["projection_head.0.weight"]
    x = enc.preprocess(head_volume)
    assert x.shape == (1, 1, 32, 32, 32) and float(x.min()) == 0.0 and float(x.max()) == 1.0  # ScaleIntensity


def test_neuro_simclr_grid_and_masked_standardisation(head_volume):
    enc = build_encoder3d("3d/neuro_simclr", spacing=None, input_size=(40, 36, 32))
    x = enc.preprocess(head_volume)[0, 0]
    assert x.shape == (32, 36, 40)  # (Z, Y, X) as the authors' transpose
    inside = x != 0
    assert abs(float(x[inside].mean())) < 1e-4 and abs(float(x[inside].std(unbiased=False)) - 1) < 1e-3
    assert enc.info.embed_dim == 512 and enc.info.extra["projection_dim"] == 64


def test_fomo25_width_comes_from_the_file_and_latent_is_the_default(tmp_path, head_volume):
    source = build_encoder3d("3d/fomo25_unet", width=8, seed=4, spacing=2.0)
    torch.save({"state_dict": {f"model._orig_mod.{k}": v for k, v in source.network.state_dict().items()}},
               tmp_path / "last.ckpt")  # a torch.compile'd run
    enc = build_encoder3d("3d/fomo25_unet", tmp_path / "last.ckpt", spacing=2.0)  # default width 32 overridden
    assert enc.info.extra["width"] == 8 and enc.info.embed_dim == 8 * 16 and enc.info.levels == (5,)
    x = enc.preprocess(head_volume)
    with torch.no_grad():
        skips = enc.network.encoder(x)
        pooled = torch.cat([torch.nn.functional.adaptive_avg_pool3d(f, skips[-1].shape[2:]) for f in skips], 1)
        latent = torch.cat([enc.network.conv_mu_shared(pooled), enc.network.conv_mu_modality(pooled)], 1)
    assert torch.allclose(enc.embed_volume(head_volume), latent.mean((2, 3, 4))[0], atol=1e-6)
