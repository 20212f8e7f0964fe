"""``3d/monai_*``: MONAI networks at seeded random init; their own state-dict layout loads strictly."""

from __future__ import annotations

import pytest
import torch

from slice2vol.encoders3d import build_encoder3d


@pytest.mark.parametrize("key, dim", [("3d/monai_resnet10", 1024), ("3d/monai_densenet121", 1984)])
def test_builds_and_embeds_with_all_stages(key, dim, head_volume):
    enc = build_encoder3d(key, input_size=(32, 32, 32))
    assert enc.info.embed_dim == dim and len(enc.feature_info()) == 5
    x = enc.preprocess(head_volume)
    assert x.shape == (1, 1, 32, 32, 32) and type(x) is torch.Tensor
    with torch.no_grad():
        maps = enc.feature_maps(x)
    assert [m.shape[1] for m in maps] == [lvl.channels for lvl in enc.feature_info()]
    assert [32 // m.shape[2] for m in maps] == [lvl.stride for lvl in enc.feature_info()]
    emb = enc.embed_volume(head_volume)
    assert emb.shape == (dim,) and type(emb) is torch.Tensor and torch.isfinite(emb).all()
    # the embedding is the concatenated global average of the stage maps
    assert torch.allclose(emb, torch.cat([m.mean((2, 3, 4))[0] for m in maps]), atol=1e-5)


def test_random_init_is_seeded(head_volume):
    a = build_encoder3d("3d/monai_resnet10", input_size=(32, 32, 32), levels=[-1])
    b = build_encoder3d("3d/monai_resnet10", input_size=(32, 32, 32), levels=[-1])
    c = build_encoder3d("3d/monai_resnet10", input_size=(32, 32, 32), levels=[-1], seed=3)
    ea, eb, ec = (e.embed_volume(head_volume) for e in (a, b, c))
    assert ea.shape == (512,) and torch.equal(ea, eb) and not torch.allclose(ea, ec)
    assert a.info.weights == "random:seed=0" and c.info.weights == "random:seed=3"


def test_state_dict_file_loads_strictly(tmp_path, head_volume):
    source = build_encoder3d("3d/monai_resnet10", seed=5, input_size=(32, 32, 32))
    path = tmp_path / "resnet10.pt"
    torch.save(source.network.state_dict(), path)
    loaded = build_encoder3d("3d/monai_resnet10", path, input_size=(32, 32, 32))
    assert torch.equal(loaded.embed_volume(head_volume), source.embed_volume(head_volume))
    assert loaded.info.weights == str(path) and len(loaded.info.weights_sha256) == 64
    state = source.network.state_dict()
    state.pop("layer4.0.bn2.running_mean")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken.pt: not the 3d/monai_resnet10 checkpoint layout: 1 missing "
                                         r"tensors \['layer4.0.bn2.running_mean'\]"):
        build_encoder3d("3d/monai_resnet10", tmp_path / "broken.pt")


def test_no_published_weights_and_unknown_options():
    with pytest.raises(ValueError, match="without published weights.*3d/medicalnet_resnet18"):
        build_encoder3d("3d/monai_resnet18", "hub")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depth'\]"):
        build_encoder3d("3d/monai_resnet18", depth=3)
