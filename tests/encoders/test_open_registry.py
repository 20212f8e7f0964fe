"""Open registry: any timm/<name>, openclip/<arch>:<tag> and hf/<repo_id> of a supported type builds from the
library's own config and preprocessing, and computes exactly what the library's own model computes."""

from __future__ import annotations

import json

import pytest
import torch

from slice2vol.encoders import ENCODERS, build_encoder


def test_timm_convnext_atto_is_timms_model_with_timms_preprocessing():
    import timm
    from timm.data import resolve_data_config

    assert "timm/convnext_atto" not in ENCODERS  # not a preset
    torch.manual_seed(0)
    encoder = build_encoder("timm/convnext_atto")
    reference = timm.create_model("convnext_atto").eval()
    reference.load_state_dict(encoder.model.state_dict(), strict=True)  # same architecture, every tensor
    data = resolve_data_config({}, model=reference)
    info = encoder.info
    assert (3, *info.input_size) == tuple(data["input_size"]) and info.interpolation == data["interpolation"]
    assert info.mean == tuple(data["mean"]) and info.std == tuple(data["std"])
    assert info.crop_pct == pytest.approx(data["crop_pct"], abs=0.01) and info.pooling == "head"
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(encoder.model(x), reference(x))  # the library's own logits
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.equal(encoder.forward_features(x), expected)  # its own pooled feature (norm after pool)
        assert encoder.encode(torch.rand(2, 1, 80, 80)).shape == (2, 320) == (2, info.embed_dim)
    levels = encoder.feature_info()
    assert [(f.name, f.stride) for f in levels] == [("stages.0", 4), ("stages.1", 8), ("stages.2", 16),
                                                   ("stages.3", 32)]
    provenance = info.to_dict()
    assert json.loads(json.dumps(provenance)) == provenance and provenance["key"] == "timm/convnext_atto"


def test_unknown_timm_name_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown encoder 'timm/no_such_net'"):
        build_encoder("timm/no_such_net")


def _openclip_reference(arch: str, vision: dict, embed_dim: int, quick_gelu: bool):
    import open_clip

    cfg = open_clip.get_model_config(arch)
    text = dict(cfg["text_cfg"], width=32, heads=2, layers=1)
    return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu,
                                  vision_cfg=dict(cfg["vision_cfg"], **vision), text_cfg=text,
                                  embed_dim=embed_dim).eval()


def test_openclip_architecture_outside_the_presets_matches_encode_image():
    """ViT-B-32 with LAION weights' tag (plain GELU, not a preset): our tower = open_clip's own model."""
    import open_clip

    key = "openclip/ViT-B-32:laion2b_s34b_b79k"
    assert key not in ENCODERS
    vision = dict(layers=2, width=64, head_width=32)
    torch.manual_seed(0)
    encoder = build_encoder(key, vision_cfg=vision, embed_dim=32)
    assert not encoder.info.extra["quick_gelu"]  # the tag's own activation
    reference = _openclip_reference("ViT-B-32", vision, 32, quick_gelu=False)
    reference.visual.load_state_dict(encoder.visual.state_dict(), strict=True)
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    assert encoder.info.mean == tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    x = torch.rand(2, 1, 100, 120)
    with torch.inference_mode():
        pre = encoder.preprocess(x)
        assert torch.equal(encoder.encode(x), reference.encode_image(pre))
        maps = encoder.forward_intermediates(pre, [-1], norm=True)[0]
        tokens, grid = encoder.forward_tokens(pre)
    assert grid == (7, 7) and maps.shape == (2, 64, 7, 7)
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-6)


def test_openclip_lists_decide_what_builds():
    with pytest.raises(KeyError, match="open_clip has no tag 'nope' for ViT-B-32; known: .*laion2b_s34b_b79k"):
        build_encoder("openclip/ViT-B-32:nope")
    with pytest.raises(ValueError, match="only ViT image towers"):
        build_encoder("openclip/RN50:openai")
    with pytest.raises(KeyError, match="unknown encoder"):
        build_encoder("openclip/No-Such-Arch:openai")


def _save_tiny_hf_repo(folder, model_type: str):
    """A save_pretrained directory of a 2-layer model of ``model_type`` with its image processor."""
    import transformers

    torch.manual_seed(0)
    if model_type == "dinov2_with_registers":
        config = transformers.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=128, patch_size=14, image_size=56,
                                                        num_register_tokens=4)
        model = transformers.Dinov2WithRegistersModel(config)
        processor = transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                                   do_center_crop=True, resample=3,
                                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    else:  # vit
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, patch_size=16, image_size=64)
        model = transformers.ViTModel(config)
        processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64}, resample=2,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", ["dinov2_with_registers", "vit"])
def test_hf_repo_outside_the_presets_builds_from_its_own_config(tmp_path, model_type):
    folder = tmp_path / "org--model"
    reference = _save_tiny_hf_repo(folder, model_type)
    encoder = build_encoder("hf/org/model", weights=folder)
    assert encoder.info.extra["model_class"] == type(reference).__name__
    assert encoder.info.weights == str(folder) and len(encoder.info.weights_sha256) == 64
    size = 56 if model_type != "vit" else 64
    assert encoder.info.input_size == (size, size)
    x = torch.randn(2, 3, size, size)
    prefix = 1 + (4 if model_type == "dinov2_with_registers" else 0)
    with torch.inference_mode():
        hidden = reference(pixel_values=x).last_hidden_state
        assert torch.equal(encoder.forward_features(x), hidden[:, 0])  # CLS after the final norm
        tokens, grid = encoder.forward_tokens(x)
        assert torch.equal(tokens, hidden[:, prefix:]) and grid == (4, 4)  # registers dropped
        maps = encoder.forward_intermediates(x, [-1], norm=True)[0]
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-6)


def test_hf_repo_without_a_local_config_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from slice2vol.encoders import WeightsUnavailable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailable, match=r"hf/org/unseen: not one of the presets .*weights='/path/to/unseen'"):
        build_encoder("hf/org/unseen")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model type 'bert' is not supported"):
        build_encoder("hf/org/bert", weights=folder)
