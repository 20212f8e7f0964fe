"""Per 3D family: random weights saved in the authors' published checkpoint layout (written here from the
published code's key names) load strictly through the registry and give identical outputs; a file with a
missing tensor is refused naming the file and the tensor; ``hub`` offline fails fast naming the file."""

from __future__ import annotations

import re
import time

import pytest
import torch
from safetensors.torch import save_file

from slice2vol.encoders.base import WeightsUnavailable
from slice2vol.encoders3d import build_encoder3d


def _medicalnet(net):  # Tencent/MedicalNet: DataParallel state_dict under 'state_dict'
    return {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}


def _swin(net):  # model_swinvit.pt: encoder under 'module.' with fc1/fc2 MLP names, plus pretraining heads
    enc = {f"module.{k.replace('.mlp.linear1.', '.mlp.fc1.').replace('.mlp.linear2.', '.mlp.fc2.')}": v
           for k, v in net.swin_vit.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    heads = {"module.norm.weight": torch.randn(768, generator=g), "module.norm.bias": torch.randn(768, generator=g),
             "module.rotation_head.weight": torch.randn(4, 768, generator=g), "module.rotation_head.bias": torch.zeros(4),
             "module.contrastive_head.weight": torch.randn(512, 768, generator=g),
             "module.contrastive_head.bias": torch.zeros(512),
             # the published convTrans3d has a 32^3 kernel (25 M values); a 2^3 one keeps the test small
             "module.convTrans3d.weight": torch.randn(768, 1, 2, 2, 2, generator=g), "module.convTrans3d.bias": torch.zeros(1)}
    return {"epoch": 100, "state_dict": {**enc, **heads}}


def _genesis(net):  # ModelsGenesis: checkpoint['state_dict'] with 'module.' keys
    return {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}


def _brainiac(net):  # Lightning checkpoint: backbone + SimCLR projection head
    state = {k: v for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    state.update({"projection_head.layer1.weight": torch.randn(512, 2048, generator=g),
                  "projection_head.layer2.weight": torch.randn(128, 512, generator=g)})
    return {"epoch": 50, "global_step": 1000, "state_dict": state}


def _neuro_simclr(net):  # torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict'}) from DDP
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    opt.zero_grad()
    sum(p.sum() for p in net.projector.parameters()).backward()
    opt.step()  # a real Adam state: tensors and numbers only
    return {"epoch": 999, "model_state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
            "optimizer_state_dict": opt.state_dict()}


def _fomo25(net):  # Lightning checkpoint of the team's SelfSupervisedModel (network under 'model.')
    return {"epoch": 99, "hyper_parameters": {"model_name": "unet_b_lw_dec", "patch_size": [96, 96, 96]},
            "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}


CASES = [  # key, build kwargs, published layout, (published key names that must be in the file)
    ("3d/medicalnet_resnet10", {"input_size": (32, 32, 32)}, _medicalnet,
     ("module.conv1.weight", "module.layer2.0.downsample.0.weight", "module.layer4.0.bn2.running_var")),
    ("3d/medicalnet_resnet18", {"input_size": (32, 32, 32)}, _medicalnet,
     ("module.conv1.weight", "module.layer4.1.conv2.weight")),
    ("3d/swin_unetr_ssl", {"spacing": 2.0}, _swin,
     ("module.patch_embed.proj.weight", "module.layers1.0.blocks.0.mlp.fc1.weight",
      "module.layers1.0.blocks.0.attn.relative_position_index", "module.layers4.0.downsample.reduction.weight")),
    ("3d/models_genesis", {}, _genesis,
     ("module.down_tr64.ops.0.conv1.weight", "module.down_tr64.ops.0.bn1.running_mean",
      "module.up_tr64.up_conv.weight", "module.out_tr.final_conv.weight")),
    ("3d/brainiac", {"input_size": (32, 32, 32)}, _brainiac,
     ("backbone.conv1.weight", "backbone.layer1.0.downsample.0.bias", "backbone.layer4.2.bn3.weight")),
    ("3d/neuro_simclr", {"spacing": 4.0, "input_size": (32, 32, 32)}, _neuro_simclr,
     ("module.encoder.conv1.weight", "module.encoder.layer1.0.conv1.weight", "module.projector.2.weight")),
    ("3d/fomo25_unet", {"spacing": 2.0, "width": 8}, _fomo25,
     ("model.encoder.in_conv.conv1.conv.weight", "model.encoder.encoder_conv4.conv2.norm.weight",
      "model.conv_mu_shared.weight", "model.decoder.out_conv.weight")),
]


@pytest.mark.parametrize("key, kwargs, layout, expected", CASES, ids=[c[0] for c in CASES])
def test_published_layout_loads_strictly_with_identical_outputs(key, kwargs, layout, expected, tmp_path, head_volume):
    source = build_encoder3d(key, "random", seed=7, **kwargs)
    checkpoint = layout(source.network)
    state = checkpoint.get("state_dict") or checkpoint.get("model_state_dict")
    assert set(expected) <= set(state), sorted(set(expected) - set(state))
    path = tmp_path / "published.pt"
    torch.save(checkpoint, path)

    loaded = build_encoder3d(key, path, **kwargs)
    assert loaded.info.weights == str(path) and len(loaded.info.weights_sha256) == 64
    own, theirs = source.network.state_dict(), loaded.network.state_dict()
    assert set(own) <= set(theirs) and all(torch.equal(own[k], theirs[k]) for k in own)
    extra = set(theirs) - set(own)  # only pretraining heads shipped with the file (Swin UNETR)
    assert all(k.startswith("heads.") for k in extra), sorted(extra)[:4]
    x = source.preprocess(head_volume)
    assert torch.equal(x, loaded.preprocess(head_volume))
    with torch.no_grad():
        for a, b in zip(source.feature_maps(x), loaded.feature_maps(x)):
            assert torch.equal(a, b)
    assert torch.equal(source.embed_volume(head_volume), loaded.embed_volume(head_volume))

    if sum(v.numel() for v in state.values()) < 20_000_000:  # skip the big ResNet-50s: CI time
        # the flat state dict as safetensors (a converted release) loads the same way
        flat = tmp_path / "published.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(flat))
        again = build_encoder3d(key, flat, **kwargs)
        assert torch.equal(again.embed_volume(head_volume), loaded.embed_volume(head_volume))

    # one tensor of the encoder missing: refused, naming the file and the tensor
    victim = expected[0]
    broken = dict(checkpoint)
    broken["state_dict" if "state_dict" in checkpoint else "model_state_dict"] = {
        k: v for k, v in state.items() if k != victim}
    torch.save(broken, tmp_path / "broken.pt")
    model_name = victim.removeprefix("module.").removeprefix("model.")
    with pytest.raises(ValueError, match=r"broken.pt: not the .* layout: 1 missing tensors \['" + re.escape(model_name)):
        build_encoder3d(key, tmp_path / "broken.pt", **kwargs)


@pytest.mark.parametrize("key, filename", [
    ("3d/medicalnet_resnet10", "resnet_10_23dataset.pth"), ("3d/swin_unetr_ssl", "model_swinvit.pt"),
    ("3d/models_genesis", "Genesis_Chest_CT.pt"), ("3d/brainiac", "BrainIAC.ckpt"),
    ("3d/neuro_simclr", "released SimCLR checkpoint"), ("3d/fomo25_unet", "pretraining checkpoint")])
def test_hub_offline_fails_fast_naming_the_file(key, filename, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match=filename):
        build_encoder3d(key, "hub")
    assert time.monotonic() - start < 10


def test_swin_pretraining_heads_are_loaded_not_dropped(tmp_path):
    source = build_encoder3d("3d/swin_unetr_ssl", "random", seed=3)
    checkpoint = _swin(source.network)
    torch.save(checkpoint, tmp_path / "model_swinvit.pt")
    loaded = build_encoder3d("3d/swin_unetr_ssl", tmp_path / "model_swinvit.pt")
    state = loaded.network.state_dict()
    for name in ("norm.weight", "rotation_head.weight", "contrastive_head.weight", "convTrans3d.weight"):
        assert torch.equal(state[f"heads.{name}"], checkpoint["state_dict"][f"module.{name}"])
    assert loaded.info.extra["heads"] == ["contrastive_head", "convTrans3d", "norm", "rotation_head"]
    # a head of the current SSLHead ('conv' = its reconstruction decoder, nested) is kept too
    sslhead = {f"swin_vit.{k}": v for k, v in source.network.swin_vit.state_dict().items()}
    sslhead.update({"conv.0.weight": torch.ones(384, 768, 3, 3, 3), "conv.0.bias": torch.zeros(384)})
    torch.save({"state_dict": sslhead}, tmp_path / "sslhead.pt")
    nested = build_encoder3d("3d/swin_unetr_ssl", tmp_path / "sslhead.pt")
    assert torch.equal(nested.network.state_dict()["heads.conv.0.weight"], torch.ones(384, 768, 3, 3, 3))
