"""I3D inflation: the inflated CNN reproduces the 2D CNN on volumes made of one repeated slice."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slice2vol.adapt import build_adapted, inflate_conv, inflate_encoder, inflate_network
from tests.adapt.helpers import assert_input_dependent, assert_reproduces, cnn_encoder, normalise, randomise_norms

CNNS = ["timm/resnet18", "tv/mobilenet_v2", "timm/efficientnet_lite0"]


@pytest.mark.parametrize("mode", ["average", "center"])
@pytest.mark.parametrize("key", CNNS)
def test_i3d_property_repeated_slice_reproduces_2d(key, mode):
    encoder = cnn_encoder(key)
    model = inflate_encoder(encoder, mode=mode)
    torch.manual_seed(1)
    slices = torch.rand(2, 1, 32, 32)
    volume = slices.unsqueeze(-1).expand(-1, -1, -1, -1, 8)  # (B, 1, X, Y, Z), Z repeats the slice

    with torch.no_grad():
        expected = encoder.forward_features(normalise(encoder, slices))
        got = model(volume)
        # Every depth position of the feature map equals the 2D map, not only their mean.
        fmap_2d = encoder.feature_map(normalise(encoder, slices)) if hasattr(encoder, "feature_map") \
            else encoder.model.forward_features(normalise(encoder, slices))
        fmap_3d = model.trunk(model.preprocess(volume))
    assert got.shape == expected.shape == (2, encoder.info.embed_dim)
    assert model.embed_dim == encoder.info.embed_dim
    assert_reproduces(got, expected)
    assert_input_dependent(model, volume, expected)  # else any volume (all zeros too) would pass
    assert fmap_3d.shape[:4] == fmap_2d.shape
    assert_reproduces(fmap_3d, fmap_2d.unsqueeze(-1).expand_as(fmap_3d))


def test_zero_depth_padding_breaks_the_property_so_the_test_is_sensitive():
    encoder = cnn_encoder("timm/resnet18")
    slices = torch.rand(1, 1, 32, 32)
    volume = slices.unsqueeze(-1).expand(-1, -1, -1, -1, 8)
    with torch.no_grad():
        expected = encoder.forward_features(normalise(encoder, slices))
        zeros = inflate_encoder(encoder, mode="average", depth_padding="zeros")(volume)
        center = inflate_encoder(encoder, mode="center", depth_padding="zeros")(volume)
    assert (zeros - expected).abs().max() > 1e-3
    torch.testing.assert_close(center, expected, atol=1e-4, rtol=1e-4)  # centre taps never see the padding


@pytest.mark.parametrize("depth_axis", [0, 1])
def test_depth_axis_selects_the_repeated_axis(depth_axis):
    encoder = cnn_encoder("tv/mobilenet_v2")
    model = inflate_encoder(encoder, depth_axis=depth_axis)
    slices = torch.rand(1, 1, 32, 32)
    volume = slices.unsqueeze(2 + depth_axis).expand(*[8 if i == 2 + depth_axis else -1 for i in range(5)])
    with torch.no_grad():
        expected = encoder.forward_features(normalise(encoder, slices))
        assert_reproduces(model(volume), expected)
    assert_input_dependent(model, volume, expected)
    assert model.info.depth_axis == depth_axis


def test_inflated_kernel_values_by_hand():
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    avg, ctr = inflate_conv(conv, "average"), inflate_conv(conv, "center")
    assert avg.weight.shape == (4, 2, 3, 3, 3) and avg.stride == (2, 2, 2) and avg.padding == (1, 1, 1)
    torch.testing.assert_close(avg.weight.sum(-1), conv.weight)
    torch.testing.assert_close(avg.weight[..., 0], conv.weight / 3)
    torch.testing.assert_close(ctr.weight[..., 1], conv.weight)
    assert ctr.weight[..., 0].abs().sum() == 0 and ctr.weight[..., 2].abs().sum() == 0
    torch.testing.assert_close(avg.bias, conv.bias)
    pointwise = inflate_conv(nn.Conv2d(2, 4, 1, stride=2), "average")
    assert pointwise.kernel_size == (1, 1, 1) and pointwise.stride == (2, 2, 2)


class _SEBlocks(nn.Module):
    """Squeeze-excitation variants of torchvision and timm, which pool inside their forward."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models._efficientnet_blocks import SqueezeExcite
        from torchvision.ops import SqueezeExcitation

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se_tv = SqueezeExcitation(8, 4)
        self.se_timm = SqueezeExcite(8, rd_ratio=0.5)

    def forward(self, x):
        return self.se_timm(self.se_tv(self.bn(self.conv(x))))


def test_squeeze_excitation_pools_over_the_whole_volume():
    torch.manual_seed(0)
    net = randomise_norms(_SEBlocks()).eval()
    slices = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(slices)
        net3d = inflate_network(net)
        got = net3d(slices.unsqueeze(-1).expand(-1, -1, -1, -1, 4))
    torch.testing.assert_close(got, expected.unsqueeze(-1).expand_as(got), atol=1e-5, rtol=1e-5)
    # A per-depth gate would differ on a volume whose slices are not all equal: check it pools over depth.
    vol = torch.randn(1, 3, 8, 8, 4)
    with torch.no_grad():
        s = net3d.bn(net3d.conv(vol))
        gate = net3d.se_tv.se.scale_activation(
            net3d.se_tv.se.fc2(net3d.se_tv.se.activation(net3d.se_tv.se.fc1(s.mean((2, 3, 4), keepdim=True)))))
        torch.testing.assert_close(net3d.se_tv(s), s * gate)


def test_unsupported_2d_layer_is_refused():
    from timm.layers import LayerNorm2d

    net = nn.Sequential(nn.Conv2d(3, 4, 3), LayerNorm2d(4))
    with pytest.raises(NotImplementedError, match="LayerNorm2d"):
        inflate_network(net)


def test_build_adapted_keys_input_size_and_provenance():
    model = build_adapted("inflate/tv/mobilenet_v2", input_size=(32, 32, 16))
    out = model(torch.rand(2, 1, 40, 36, 20))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    assert model.info.key == "inflate/tv/mobilenet_v2"
    assert model.info.base["key"] == "tv/mobilenet_v2" and model.info.options["mode"] == "average"
    with pytest.raises(KeyError, match="unknown 2d->3d adaptation 'nope'"):
        build_adapted("nope/tv/mobilenet_v2")
    with pytest.raises(KeyError, match="<method>/<2d key>"):
        build_adapted("inflate")
    with pytest.raises(ValueError, match="expected volumes"):
        model(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax", "catavgmax"])
def test_timm_global_pool_is_replaced_by_a_3d_global_pool(pool_type):
    from timm.layers import SelectAdaptivePool2d

    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
    x = torch.randn(2, 4, 5, 5)
    expected = pool(x)
    pool3d = inflate_network(nn.Sequential(pool))  # converts in place
    torch.testing.assert_close(pool3d(x.unsqueeze(-1).expand(-1, -1, -1, -1, 3)), expected)


@pytest.mark.parametrize("key", ["tv/mobilenet_v2", "timm/efficientnet_lite0"])
def test_i3d_property_with_packaged_imagenet_weights(key):
    """Real ImageNet weights (installed weight packages; skipped, naming the extra, where absent) on a
    synthetic head slice: no data needed."""
    from tests.conftest import blob_volume
    from tests.encoders import pretrained_or_skip

    encoder = pretrained_or_skip(key)
    blob = torch.from_numpy(blob_volume((40, 36, 12), seed=2))
    axial = (blob[:, :, 6] / blob.max())[None, None]  # (1, 1, X, Y) in [0, 1]
    volume = axial.unsqueeze(-1).expand(-1, -1, -1, -1, 8)
    model = inflate_encoder(encoder)
    with torch.no_grad():
        expected = encoder.forward_features(normalise(encoder, axial))
        got = model(volume)
    assert expected.abs().max() > 1  # real activations, not a vanishing network
    assert_reproduces(got, expected)
    assert_input_dependent(model, volume, expected)


@pytest.mark.ixi
@pytest.mark.parametrize("key", ["tv/mobilenet_v2", "timm/efficientnet_lite0"])
def test_i3d_property_with_imagenet_weights_on_an_ixi_slice(ixi_manifest, key):
    from slice2vol.data import VolumeConfig, load_manifest, load_subject
    from tests.encoders import pretrained_or_skip

    encoder = pretrained_or_skip(key)
    volume = load_subject(load_manifest(ixi_manifest).subjects[0], VolumeConfig(), with_seg=False)
    axial = torch.from_numpy(volume.data[0, :, :, volume.data.shape[3] // 2].copy())[None, None]  # (1, 1, X, Y)
    stacked = axial.unsqueeze(-1).expand(-1, -1, -1, -1, 8)
    model = inflate_encoder(encoder)
    with torch.no_grad():
        expected = encoder.forward_features(normalise(encoder, axial))
        got = model(stacked)
    assert expected.abs().max() > 1  # real activations, not a vanishing random network
    assert_reproduces(got, expected)
    assert_input_dependent(model, stacked, expected)
