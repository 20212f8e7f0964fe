"""ACS convolutions: channel split, orientation, equivalence to a dense 3D kernel, 2D weight loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.adapt import ACSConv3d, acs_encoder, acs_network, acs_split
from slice2vol.adapt.base import cnn_trunk
from tests.adapt.helpers import cnn_encoder


@pytest.mark.parametrize("channels, split", [(64, (22, 21, 21)), (3, (1, 1, 1)), (4, (2, 1, 1)),
                                             (5, (2, 2, 1)), (1, (1, 0, 0)), (96, (32, 32, 32))])
def test_split_follows_official_acsconv(channels, split):
    assert acs_split(channels) == split and sum(split) == channels


def test_orientation_of_the_three_groups_by_hand():
    # An all-ones 3x3 kernel per group, on an impulse at the centre of a 7^3 volume (depth last = Z).
    conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    acs = ACSConv3d(conv)
    x = torch.zeros(1, 1, 7, 7, 7)
    x[..., 3, 3, 3] = 1
    out = acs(x)[0]
    for group, flat_axis in [(0, 2), (1, 1), (2, 0)]:  # axial flat along Z, coronal along Y, sagittal along X
        support = out[group].nonzero()
        assert len(support) == 9
        assert (support[:, flat_axis] == 3).all()
        assert set(support[:, [a for a in range(3) if a != flat_axis]].flatten().tolist()) == {2, 3, 4}


CASES = [  # (kernel, stride, padding, dilation, groups)
    (3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (1, 2, 0, 1, 1), (7, 2, 3, 1, 1), (3, 1, 0, 1, 1),
    (3, 1, 2, 2, 1), (5, 2, 1, 1, 1), (2, 2, 0, 1, 1), (3, 2, 1, 1, 6), (3, 1, 1, 1, 2),
    # even kernels whose padding equals the centre tap's offset (k // 2): the collapsed axis still
    # grows by one, as Conv3d's does (a shortcut for p == centre skipped it)
    (2, 1, 1, 1, 1), (4, 2, 2, 1, 1),
]


@pytest.mark.parametrize("k, s, p, d, g", CASES)
def test_matches_dense_kernel_reference(k, s, p, d, g):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6 if g == 6 else 8, k, stride=s, padding=p, dilation=d, groups=g)
    acs = ACSConv3d(conv)
    x = torch.randn(2, 6, 11, 12, 13)
    dense = F.conv3d(x, acs.dense_kernel(), acs.bias, s, p, d, g)
    out = acs(x)
    assert out.shape == dense.shape
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    assert sum(t.numel() for t in acs.parameters()) == sum(t.numel() for t in conv.parameters())


@pytest.mark.parametrize("key", ["timm/resnet18", "tv/mobilenet_v2"])
def test_conversion_keeps_parameters_and_loads_2d_weights(key):
    enc_a, enc_b = cnn_encoder(key, seed=0), cnn_encoder(key, seed=1)
    trunk_2d, _ = cnn_trunk(enc_b.model)
    model = acs_encoder(enc_a)
    state_2d = trunk_2d.state_dict()
    state_3d = model.trunk.state_dict()
    assert list(state_3d) == list(state_2d)
    assert {k: tuple(v.shape) for k, v in state_3d.items()} == {k: tuple(v.shape) for k, v in state_2d.items()}
    assert sum(p.numel() for p in model.trunk.parameters()) == sum(p.numel() for p in trunk_2d.parameters())

    model.trunk.load_state_dict(state_2d)  # a 2D checkpoint loads as is
    reference = acs_encoder(enc_b)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        assert not torch.allclose(acs_encoder(enc_a)(x), reference(x))


def test_acs_encoder_forward_and_axis_sensitivity():
    model = acs_encoder(cnn_encoder("timm/resnet18"))
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(x)
        turned = model(x.transpose(2, 4))
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    assert model.info.key == "acs/timm/resnet18"
    # Axial, coronal and sagittal groups differ, so rotating the volume changes the embedding.
    assert (out - turned).abs().max() > 1e-4


def test_shared_weights_move_with_the_2d_parameters():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    acs = acs_network(nn.Sequential(conv, nn.BatchNorm2d(6), nn.MaxPool2d(2)))
    assert acs[0].weight is conv.weight
    assert isinstance(acs[1], nn.BatchNorm3d) and isinstance(acs[2], nn.MaxPool3d)
    assert acs(torch.randn(1, 3, 8, 8, 8)).shape == (1, 6, 4, 4, 4)
