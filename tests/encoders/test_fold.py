"""BatchNorm folding (``Encoder.optimize(fold_bn=True)``): same outputs as the unfolded network, only
where every forward path allows it, provenance unchanged, training refused afterwards."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from slice2vol.encoders import build_encoder
from slice2vol.encoders.base import Encoder, EncoderInfo
from slice2vol.encoders.fold import fold_batchnorm
from slice2vol.extract import state_sha256


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


def _randomise_statistics(module: nn.Module, seed: int = 0, sample: torch.Tensor | None = None) -> None:
    """Random-init BatchNorm is the identity (mean 0, var 1, weight 1, bias 0): give it real statistics.

    With ``sample`` the running statistics are those of the activations ``module.encode(sample)`` produces
    (so a deep network neither explodes nor saturates), otherwise random; weight and bias are random.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        if sample is not None:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
            module.train()
            module.encode(sample)
            module.eval()


def _built(key: str, **kwargs) -> Encoder:
    torch.manual_seed(0)
    encoder = build_encoder(key, **kwargs).eval()
    size = encoder.info.input_size
    _randomise_statistics(encoder, sample=torch.rand(8, 1, *size, generator=torch.Generator().manual_seed(2)))
    return encoder


@pytest.mark.parametrize("key, kwargs, foldable", [
    ("timm/resnet18", {"img_size": 64}, 20),               # conv1/bn1 attributes, residual adds
    ("tv/mobilenet_v2", {"img_size": 64}, 52),             # Conv2dNormActivation (Sequential)
    ("timm/efficientnet_lite0", {"img_size": 64}, 49),     # timm BatchNormAct2d: BN + activation in one module
    ("tv/resnet50", {"img_size": 64}, 53),                 # torchvision bottlenecks, downsample Sequential
    ("timm/regnety_002", {"img_size": 64}, 44),            # an open timm key: ConvNormAct + squeeze-excite
    ("timm/densenet121", {"img_size": 64}, 59),            # the other 62 BatchNorms follow a concatenation
])
def test_folded_encoder_matches_the_unfolded_one(key: str, kwargs: dict, foldable: int) -> None:
    reference = _built(key, **kwargs)
    folded = copy.deepcopy(reference)  # the same network: building and calibrating it again costs seconds
    n_bn = _batchnorms(folded)
    folded.optimize(fold_bn=True, channels_last=True)
    assert folded.fold_batchnorm() == foldable and _batchnorms(folded) == n_bn - foldable
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = reference.encode(x), folded.encode(x)
        want_tokens, got_tokens = reference.tokens(x)[0], folded.tokens(x)[0]
        want_logits, got_logits = reference.classify(x), folded.classify(x)
    assert (want[0] - want[1]).abs().max() > 1e-2 * want.abs().max()  # the features depend on the input
    for a, b in ((want, got), (want_tokens, got_tokens), (want_logits, got_logits)):
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * scale
    # the statistics matter, so the comparison above could fail: dropping one BatchNorm changes the output
    broken = copy.deepcopy(reference)
    conv_bn = next(m for m in broken.modules() if isinstance(m, _BatchNorm))
    conv_bn.running_mean.add_(1.0)
    with torch.inference_mode():
        assert (broken.encode(x) - want).abs().max().item() > 1e-3 * want.abs().max().item()


def test_provenance_hash_and_training_after_folding() -> None:
    encoder = _built("timm/resnet18", img_size=64)
    before = state_sha256(encoder)
    encoder.optimize(fold_bn=True)
    assert state_sha256(encoder) == before  # the weights it was built from, not their folded form
    assert encoder.source_state_sha256 == before
    with pytest.raises(RuntimeError, match="folded into convolutions for inference"):
        encoder.train()
    encoder.eval()  # eval stays allowed
    trainable = _built("timm/resnet18", img_size=64).train()
    with pytest.raises(RuntimeError, match="needs eval mode"):
        trainable.fold_batchnorm()


class _Toy(Encoder):
    """Conv/BN layouts that must (not) fold; ``variant`` picks the layout."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.info = EncoderInfo(key=f"test/toy_{variant}", embed_dim=4, input_size=(16, 16), source="test")
        self.variant = variant
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 4)
        self.bn1d = nn.BatchNorm1d(4)
        _randomise_statistics(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.variant == "shared":  # the same BatchNorm after two convolutions
            y = self.bn(self.conv2(y))
        elif self.variant == "branch":  # conv2's output is also used without its BatchNorm
            z = self.conv2(y)
            y = self.bn2(z) + z
        elif self.variant == "dynamic":  # Python control flow on a tensor value: fx cannot trace it
            if y.sum() > 0:
                y = -y
        else:
            y = self.bn2(self.conv2(y))
        return self.bn1d(self.linear(y.mean((-2, -1))))  # a Linear -> BatchNorm1d pair is not a conv pair

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.variant == "tokens_before_bn":  # the dense path reads the convolution before its BatchNorm
            fmap = self.conv2(self.bn(self.conv(x)))
        elif self.variant == "shared":
            fmap = self.bn(self.conv2(self.bn(self.conv(x))))
        else:
            fmap = self.bn2(self.conv2(self.bn(self.conv(x))))
        return fmap.flatten(2).transpose(1, 2), (fmap.shape[-2], fmap.shape[-1])


@pytest.mark.parametrize("variant, folded", [
    ("plain", {"bn", "bn2"}),
    ("shared", set()),               # bn runs twice (after conv and conv2): neither fold is right for both
    ("branch", {"bn"}),              # conv2's output feeds bn2 and the add
    ("tokens_before_bn", {"bn"}),    # forward_tokens takes conv2 without bn2
    ("dynamic", set()),              # untraceable: left alone
])
def test_only_pairs_that_every_path_allows_are_folded(variant: str, folded: set, caplog) -> None:
    toy = _Toy(variant).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, want_tokens = toy.forward_features(x), toy.forward_tokens(x)[0]
    with caplog.at_level(logging.INFO, logger="slice2vol.encoders.fold"):
        count = toy.fold_batchnorm()
    left = {name for name, m in toy.named_modules() if isinstance(m, _BatchNorm)}
    assert count == len(folded) and left == {"bn", "bn2", "bn1d"} - folded
    if variant == "dynamic":
        assert "fx cannot trace" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(toy.forward_features(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(toy.forward_tokens(x)[0], want_tokens, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_on_a_plain_module_uses_its_forward() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    _randomise_statistics(net)
    net.eval()
    x = torch.rand(2, 1, 9, 9)
    want = net(x)
    assert fold_batchnorm(net) == 2 and _batchnorms(net) == 0
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


def test_caching_job_folds_without_changing_the_feature_set(tmp_path: Path) -> None:
    """cache_cohort folds an encoder it builds; --no-fold-bn gives the same feature set and features."""
    from slice2vol.cache import FeatureStore
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.extract import cache_cohort
    from tests._tiny_encoder import make_tiny_cohort

    cohort = load_manifest(make_tiny_cohort(tmp_path, n=2))
    slices = SliceConfig(size=32, stride=4)
    stores = {}
    for fold in (True, False):
        path = tmp_path / f"fold{fold}.h5"
        report = cache_cohort(cohort, "tv/mobilenet_v2", path, encoder_kwargs={"img_size": 32}, slice_cfg=slices,
                              batch_size=8, progress=False, dtype="float32", fold_bn=fold)
        assert report.ok
        stores[fold] = FeatureStore(path)
    folded, plain = stores[True], stores[False]
    assert folded.feature_set == plain.feature_set
    assert folded.provenance["inference"]["batchnorm_folded"] == 52
    assert plain.provenance["inference"]["batchnorm_folded"] == 0
    assert folded.provenance["state_sha256"] == plain.provenance["state_sha256"]
    for subject in cohort.ids:
        for plane in ("axial", "coronal", "sagittal"):
            a, b = folded.slice_features(subject, plane), plain.slice_features(subject, plane)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
