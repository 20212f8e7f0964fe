import pytest
import torch

from slice2vol.ssl.backbones import ConvDecoder, build_backbone, probe_grid

CASES = [
    ("cnn", 3, (32, 32, 32), {"width": 4, "num_stages": 3}, 16, (4, 4, 4)),
    ("cnn", 2, (32, 32), {"width": 4, "num_stages": 3}, 16, (4, 4)),
    ("resnet", 3, (32, 32, 32), {"depth": 10, "block_inplanes": [8, 16, 32, 64]}, 64, (1, 1, 1)),
    ("resnet", 2, (32, 32), {"depth": 10, "block_inplanes": [8, 16, 32, 64]}, 64, (1, 1)),
    ("vit", 3, (32, 32, 32), {"patch_size": 16, "hidden_size": 48, "mlp_dim": 96, "num_layers": 1,
                              "num_heads": 4}, 48, (2, 2, 2)),
    ("vit", 2, (32, 32), {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 1, "num_heads": 4},
     48, (4, 4)),
    ("swin", 3, (32, 32, 32), {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3],
                               "window_size": 4}, 192, (1, 1, 1)),
    pytest.param("timm", 2, (32, 32), {"model": "resnet10t"}, 512, (1, 1), marks=pytest.mark.slow),  # timm import 8 s
]


@pytest.mark.parametrize("name,dims,size,params,dim,grid", CASES)
def test_backbone_shapes(name, dims, size, params, dim, grid):
    torch.manual_seed(0)
    net = build_backbone(name, dims, 1, size, **params).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        emb, fm = net(x), net.feature_map(x)
    assert net.embed_dim == dim and emb.shape == (2, dim)
    assert fm.shape == (2, net.feature_dim, *grid)
    assert probe_grid(net, 1, size) == (grid, net.feature_dim)
    assert torch.isfinite(emb).all()


def test_decoder_restores_the_input_size():
    dec = ConvDecoder(3, 16, 1, grid=(3, 3, 3), out_size=(24, 24, 20))
    assert dec(torch.rand(2, 16, 3, 3, 3)).shape == (2, 1, 24, 24, 20)


def test_unknown_backbone_and_bad_params():
    with pytest.raises(KeyError, match="unknown ssl backbone"):
        build_backbone("unet", 3, 1, (32, 32, 32))
    with pytest.raises(ValueError, match="bad parameters"):
        build_backbone("cnn", 3, 1, (32, 32, 32), widht=8)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_backbone("swin", 3, 1, (40, 40, 40))
    with pytest.raises(ValueError, match="2D"):
        build_backbone("timm", 3, 1, (32, 32, 32))


def test_stage_readout_concatenates_the_global_average_of_every_stage():
    torch.manual_seed(0)
    net = build_backbone("cnn", 3, 1, (16, 16, 16), width=4, num_stages=3, readout="stages")
    assert net.embed_dim == 4 + 8 + 16 and net.feature_dim == 16
    x = torch.rand(2, 1, 16, 16, 16)
    by_hand, h = [], x
    for stage in range(3):
        h = net.net[6 * stage:6 * stage + 6](h)
        by_hand.append(h.mean((2, 3, 4)))
    torch.testing.assert_close(net(x), torch.cat(by_hand, 1))
    torch.testing.assert_close(net(x)[:, -16:], net.feature_map(x).mean((2, 3, 4)))
    with pytest.raises(ValueError, match="readout"):
        build_backbone("cnn", 3, 1, (16, 16, 16), readout="max")


@pytest.mark.parametrize("name, params, message", [
    ("cnn", {"width": -8}, "backbone.params.width must be a whole number >= 1, got -8"),
    ("cnn", {"num_stages": 0}, "backbone.params.num_stages must be a whole number >= 1, got 0"),
    # torch's own refusal deep inside a MONAI builder comes back as one line naming the backbone
    ("vit", {"hidden_size": -48, "num_heads": 1}, "backbone 'vit': "),
])
def test_a_backbone_size_no_network_can_have_is_one_line(name, params, message):
    with pytest.raises(ValueError) as info:
        build_backbone(name, 3, 1, (16, 16, 16), **params)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
