"""LoRA layers: zero-initialised update, merging, injection by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slice2vol.finetune import LoRALinear, inject_lora, lora_parameters, merge_lora


def test_starts_as_the_base_layer_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at init
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = base(x) + 2.0 * (x @ lora.lora_A.t() @ lora.lora_B.t())  # alpha / rank = 2
    torch.testing.assert_close(lora(x), expected)
    merged = lora.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), lora(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.weight, base.weight + 2.0 * lora.lora_B @ lora.lora_A)
    assert not base.weight.requires_grad and lora.lora_A.requires_grad


def test_inject_and_merge_in_a_vit_keep_names_and_outputs():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=32, depth=2).eval()
    keys = list(vit.state_dict())
    names = inject_lora(vit, rank=2)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert len(lora_parameters(vit)) == 8
    with torch.no_grad():
        for p in lora_parameters(vit):
            p.normal_(std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = vit(x)
        assert merge_lora(vit) == names
        torch.testing.assert_close(vit(x), adapted, atol=1e-4, rtol=1e-4)
    assert list(vit.state_dict()) == keys  # the merged model is the original architecture


def test_no_matching_layer_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear layer matches"):
        inject_lora(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), targets=[r"attn\.qkv$"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(3, 3), rank=0)
