"""``3d/deepbet``: the re-expressed networks, deepbet's own pipeline, and the published layouts.

The reference features are computed here by calling the installed package directly: its TorchScript
networks (``BrainExtraction().bbox_model`` / ``.model``, stage by stage through their own submodules),
its ``normalize`` and its ``run_model`` (which sets the brain box). They are skipped without deepbet
(an optional extra); the layout tests need only torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slice2vol.encoders3d import build_encoder3d
from slice2vol.encoders3d.deepbet import DeepBetNet, deepbet_available

needs_deepbet = pytest.mark.skipif(not deepbet_available(),
                                   reason="deepbet not installed (optional extra: pip install deepbet)")
SMALL = dict(small_shape=(64, 64, 64), shape=(64, 64, 64))  # deepbet's run_model settings, test-sized
TINY = dict(small_shape=(64, 32, 32), shape=(64, 32, 32))  # smallest grids the networks take


def _package_stages(net, x: torch.Tensor) -> list[torch.Tensor]:
    """Encoder stages of a deepbet TorchScript network, called through its own submodules."""
    relu = getattr(net.conv, "2")  # the traced network hands this ReLU to every block
    out = [net.init(relu, x)]
    for down in (net.down0, net.down1, net.down2, net.down3):
        out.append(down(relu, out[-1]))
    return out


@needs_deepbet
def test_native_networks_equal_the_package_torchscript():
    from deepbet import BrainExtraction

    bet = BrainExtraction(no_gpu=True)
    x = torch.randn(1, 1, 64, 32, 64, generator=torch.Generator().manual_seed(0))
    enc = build_encoder3d("3d/deepbet", "package", **TINY)
    with torch.no_grad():
        for name, scripted in (("bbox", bet.bbox_model), ("brain", bet.model)):
            ours = enc.nets[name]
            assert torch.equal(ours(x), scripted(x))
            for a, b in zip(ours.stages(x), _package_stages(scripted, x)):
                assert torch.equal(a, b)


@needs_deepbet
def test_features_equal_the_package_networks_called_directly(head_volume):
    from deepbet import BrainExtraction
    from deepbet.utils import normalize

    enc = build_encoder3d("3d/deepbet", "package", **SMALL)
    ours = enc.embed_volume(head_volume)
    assert ours.shape == (512,) and enc.info.embed_dim == 512

    bet = BrainExtraction(no_gpu=True)
    raw = head_volume.data[0].copy()
    x = torch.from_numpy(raw)
    small = F.interpolate(x[None, None], SMALL["small_shape"], mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)
    with torch.no_grad():
        bbox_maps = _package_stages(bet.bbox_model, normalize(small, low, high)[None, None])
        bet.run_model(raw.copy(), small_shape=SMALL["small_shape"], shape=SMALL["shape"])  # sets bet.bbox
        crop = F.interpolate(x[bet.bbox][None, None], SMALL["shape"], mode="nearest-exact")[0, 0]
        brain_maps = _package_stages(bet.model, normalize(crop, low, high)[None, None])
    reference = torch.cat([m.mean((2, 3, 4))[0] for m in bbox_maps + brain_maps])
    assert enc.last_box == bet.bbox
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)

    only_bbox = build_encoder3d("3d/deepbet", "package", networks=["bbox"], levels=[-1], **SMALL)
    assert torch.allclose(only_bbox.embed_volume(head_volume), bbox_maps[-1].mean((2, 3, 4))[0], atol=1e-6)
    assert only_bbox.info.embed_dim == 128


@needs_deepbet
def test_package_weights_provenance():
    from pathlib import Path

    from deepbet.utils import DATA_PATH

    from slice2vol.encoders.base import sha256_file

    enc = build_encoder3d("3d/deepbet", "package", **TINY)
    assert enc.info.weights.startswith("package:deepbet==")
    assert enc.info.weights_sha256 == sha256_file(Path(DATA_PATH) / "models")
    assert len(enc.info.weights_sha256) == 64


def _random_pair(seed: int) -> dict[str, DeepBetNet]:
    torch.manual_seed(seed)
    return {"bbox_model": DeepBetNet().eval(), "model": DeepBetNet().eval()}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_published_layouts_load_strictly_and_give_identical_outputs(tmp_path, head_volume):
    """Random weights saved as the package ships them (two TorchScript files) and as one state dict
    with ``bbox_model.`` / ``model.`` prefixes load strictly and reproduce the networks' outputs."""
    nets = _random_pair(7)
    folder = tmp_path / "models"
    folder.mkdir()
    example = torch.randn(1, 1, 64, 32, 32)
    for stem, net in nets.items():  # traced, as the package's files are
        torch.jit.trace(net, example, check_trace=False).save(str(folder / f"{stem}.pt"))
    flat = {f"{stem}.{k}": v for stem, net in nets.items() for k, v in net.state_dict().items()}
    from safetensors.torch import save_file

    save_file(flat, str(tmp_path / "deepbet.safetensors"))
    torch.save({"state_dict": flat}, tmp_path / "deepbet.pt")

    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        expected = {stem: net(x) for stem, net in nets.items()}
    features = []
    for source in (folder, tmp_path / "deepbet.safetensors", tmp_path / "deepbet.pt"):
        enc = build_encoder3d("3d/deepbet", source, **TINY)
        with torch.no_grad():
            assert torch.equal(enc.nets["bbox"](x), expected["bbox_model"])
            assert torch.equal(enc.nets["brain"](x), expected["model"])
        assert enc.info.weights == str(source) and len(enc.info.weights_sha256) == 64
        features.append(enc.embed_volume(head_volume))
    assert torch.equal(features[0], features[1]) and torch.equal(features[1], features[2])


def test_layout_errors_name_the_file_and_the_keys(tmp_path):
    nets = _random_pair(0)
    flat = {f"{stem}.{k}": v for stem, net in nets.items() for k, v in net.state_dict().items()}
    torch.save({k: v for k, v in flat.items() if k != "model.down3.block2.double_conv.3.weight"}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"a.pt: not the 3d/deepbet model checkpoint layout: 1 missing tensors "
                                         r"\['down3.block2.double_conv.3.weight'\]"):
        build_encoder3d("3d/deepbet", tmp_path / "a.pt")
    torch.save({**flat, "head.weight": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"b.pt: not the 3d/deepbet layout: keys \['head.weight'\]"):
        build_encoder3d("3d/deepbet", tmp_path / "b.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="bbox_model.pt: deepbet network file not found"):
        build_encoder3d("3d/deepbet", tmp_path / "empty")


def test_random_init_is_seeded_and_options_are_checked(head_volume):
    a = build_encoder3d("3d/deepbet", "random", networks=["bbox"], **TINY)
    b = build_encoder3d("3d/deepbet", "random", networks=["bbox"], **TINY)
    c = build_encoder3d("3d/deepbet", "random", networks=["bbox"], seed=1, **TINY)
    assert torch.equal(a.nets["bbox"].init[0].weight, b.nets["bbox"].init[0].weight)
    assert not torch.equal(a.nets["bbox"].init[0].weight, c.nets["bbox"].init[0].weight)
    assert a.info.weights == "random" and a.info.weights_sha256 == ""
    with pytest.raises(ValueError, match="networks must be"):
        build_encoder3d("3d/deepbet", networks=["head"])
    with pytest.raises(ValueError, match="small_shape .* multiples of 32"):
        build_encoder3d("3d/deepbet", small_shape=(48, 64, 64))
    with pytest.raises(ValueError, match="shape .* one at least 64"):
        build_encoder3d("3d/deepbet", shape=(32, 32, 32))
    from slice2vol.encoders.base import WeightsUnavailable

    with pytest.raises(WeightsUnavailable, match="weights=package"):
        build_encoder3d("3d/deepbet", "hub")
    with pytest.raises(ValueError, match="sliding windows are not supported"):
        a.embed_volume(head_volume, {"roi_size": [64, 64, 64]})


def test_no_brain_found_falls_back_to_the_whole_volume(caplog):
    from slice2vol.data.io import Volume

    enc = build_encoder3d("3d/deepbet", "random", **TINY)
    # a random network thresholded at 2.0 never finds a brain
    enc.threshold = 2.0
    data = np.random.default_rng(0).random((1, 20, 24, 18)).astype(np.float32)
    out = enc.embed_volume(Volume("v", data, np.eye(4), np.ones((20, 24, 18), bool)))
    assert torch.isfinite(out).all() and enc.last_box == (slice(0, 20, 1), slice(0, 24, 1), slice(0, 18, 1))
    assert "found no brain" in caplog.text
