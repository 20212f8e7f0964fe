"""Preprocessing equivalence at the level of the tensor fed to the network, for every family, against the
library's official transform, on images generated here (no data needed, nothing skipped on a fresh clone).

``Encoder.preprocess`` (the method the pipeline runs, not a re-implementation) gets 8-bit-valued float
slices; the official pipelines get the same values as 8-bit PIL images (grey replicated to RGB, as a
user would pass a slice). Differences are measured in grey levels of the [0, 1] image
(``|ours - official| * std * 255``): the official pipelines round their resized image to 8 bits (PIL
twice, once per pass), ours stays in float, so they may differ by about one grey level, never more
than :data:`MAX_GREY`. The mutation tests then perturb interpolation, the crop offset and the
normalisation and check that the same comparison fails: the bound is tight enough to catch each.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slice2vol.encoders import base as encoder_base
from slice2vol.encoders import build_encoder

FIXTURES = Path(__file__).parent / "fixtures"
MAX_GREY = 1.6  # max |difference| in grey levels (of 255) of the network input, any pixel, any channel
MEAN_GREY = 0.5  # mean |difference| in grey levels
# non-square both ways (shorter-side resize and crop both act), a downscale and an upscale
SIZES = ((90, 120), (120, 90), (256, 256), (64, 80))


def phantom(h: int, w: int, seed: int) -> np.ndarray:
    """An 8-bit 'head' (h, w): ellipse, textured interior, a bright block, noise. Sharp edges and texture make
    interpolation, crop and normalisation errors visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(float)
    cy, cx = h / 2, w / 2
    r = np.sqrt(((y - cy) / (0.45 * h)) ** 2 + ((x - cx) / (0.4 * w)) ** 2)
    img = np.where(r < 1, 0.35, 0.0)
    img += np.where(r < 0.7, 0.25 * (0.5 + 0.5 * np.sin(x / 2.3) * np.cos(y / 3.1)), 0)
    img += np.where((np.abs(y - cy) < 0.08 * h) & (np.abs(x - cx) < 0.15 * w), 0.3, 0)
    img += rng.normal(0, 0.04, (h, w)) * (r < 1)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def as_pil(u8: np.ndarray) -> Image.Image:
    return Image.fromarray(u8, mode="L").convert("RGB")


def as_tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float()[None, None] / 255


def grey_levels(encoder, official) -> tuple[float, float]:
    """(max, mean) |Encoder.preprocess - official| in grey levels over :data:`SIZES`."""
    worst, means = 0.0, []
    std = torch.tensor(encoder.info.std).view(1, -1, 1, 1)
    for i, (h, w) in enumerate(SIZES):
        u8 = phantom(h, w, i)
        with torch.no_grad():
            ours = encoder.preprocess(as_tensor(u8))
        reference = official(u8)
        assert ours.shape == reference.shape, (ours.shape, reference.shape)
        diff = (ours - reference).abs() * std * 255
        worst, means = max(worst, diff.max().item()), means + [diff.mean().item()]
    return worst, max(means)


# -- the families and their official pipelines ------------------------------------------------------------
def _timm(key: str, **kwargs):
    def make():
        from timm.data import create_transform, resolve_data_config

        encoder = build_encoder(key, **kwargs)
        transform = create_transform(**resolve_data_config({"input_size": (3, *encoder.info.input_size)},
                                                           model=encoder.model))
        return encoder, lambda u8: transform(as_pil(u8))[None]
    return make


def _torchvision(arch: str, preset: str):
    def make():
        from torchvision.models import get_model_weights

        encoder = build_encoder(f"tv/{arch}", preprocess_tag=preset, img_size=224)
        transform = get_model_weights(arch)[preset].transforms()
        return encoder, lambda u8: transform(as_pil(u8))[None]
    return make


def _openclip_preset(key: str, arch: str, tag: str):
    def make():
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

        encoder = build_encoder(key, vision_cfg=dict(layers=1, width=64, head_width=32), embed_dim=32)
        size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
        cfg = merge_preprocess_dict(PreprocessCfg(size=size), open_clip.get_pretrained_cfg(arch, tag))
        transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        return encoder, lambda u8: transform(as_pil(u8))[None]
    return make


def _biomedclip():
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from slice2vol.encoders.openclip import BIOMEDCLIP_REPO

    published = json.loads((FIXTURES / "biomedclip_open_clip_config.json").read_text())
    encoder = build_encoder(f"openclip/hf-hub:{BIOMEDCLIP_REPO}")
    cfg = merge_preprocess_dict(PreprocessCfg(size=published["model_cfg"]["vision_cfg"]["image_size"]),
                                published["preprocess_cfg"])
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    return encoder, lambda u8: transform(as_pil(u8))[None]


@lru_cache(maxsize=None)
def hf_published(repo: str) -> dict:
    return json.loads((FIXTURES / "hf_preprocessor_configs.json").read_text())[repo]


def _hf(repo: str, backend: str = "pil"):
    def make(tmp=None):
        import tempfile

        from transformers import AutoImageProcessor

        folder = Path(tempfile.mkdtemp(prefix="s2v-hf-"))
        (folder / "preprocessor_config.json").write_text(json.dumps(hf_published(repo)["config"]))
        processor = AutoImageProcessor.from_pretrained(str(folder), backend=backend)
        encoder = build_encoder(f"hf/{repo}", config_overrides=dict(num_hidden_layers=1))

        def official(u8):
            return processor(images=[as_pil(u8)], return_tensors="pt")["pixel_values"]
        return encoder, official
    return make


def _sam():
    from segment_anything import SamPredictor

    from tests.encoders.test_sam import official_sam

    encoder = build_encoder("sam/vit_b", img_size=256, embed_dim=64, depth=1, num_heads=2, global_attn_indexes=(0,),
                            window_size=4)
    predictor = SamPredictor(official_sam(encoder.image_encoder))

    def official(u8):
        """SamPredictor.set_image's steps: its ResizeLongestSide.apply_image on the uint8 RGB array, then
        Sam.preprocess (pixel mean/std, zero padding bottom/right)."""
        rgb = np.repeat(u8[:, :, None], 3, axis=-1)
        x = torch.as_tensor(predictor.transform.apply_image(rgb)).permute(2, 0, 1)[None].float()
        return predictor.model.preprocess(x)
    return encoder, official


def _medsam():
    from skimage import transform as sk

    encoder = build_encoder("medsam/vit_b", img_size=256, embed_dim=64, depth=1, num_heads=2,
                            global_attn_indexes=(0,), window_size=4)

    def official(u8):
        """MedSAM_Inference.py: grey -> 3 channels, skimage cubic resize (anti-aliased) to the square input,
        min-max. The script's astype(np.uint8) after the resize floors to whole grey levels; kept here, so
        the two differ by up to one grey level."""
        img = np.repeat(u8[:, :, None], 3, axis=-1)
        img = sk.resize(img, (256, 256), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
        img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
        return torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return encoder, official


FAMILIES = {
    "timm/resnet18": _timm("timm/resnet18"),
    "timm/efficientnet_lite0": _timm("timm/efficientnet_lite0"),
    "timm/vit_small_patch16_224": _timm("timm/vit_small_patch16_224", model_kwargs=dict(depth=1)),
    "timm/swin_tiny_patch4_window7_224": _timm("timm/swin_tiny_patch4_window7_224",
                                               model_kwargs=dict(depths=(1, 1, 1, 1))),
    "timm/vit_small_patch14_dinov2": _timm("timm/vit_small_patch14_dinov2", model_kwargs=dict(depth=1)),
    "timm/vit_base_patch16_224.mae": _timm("timm/vit_base_patch16_224.mae", model_kwargs=dict(depth=1)),
    "timm/convnext_atto (open registry)": _timm("timm/convnext_atto"),
    "tv/mobilenet_v2 V1": _torchvision("mobilenet_v2", "IMAGENET1K_V1"),
    "tv/mobilenet_v2 V2": _torchvision("mobilenet_v2", "IMAGENET1K_V2"),
    "tv/resnet18 V1": _torchvision("resnet18", "IMAGENET1K_V1"),
    "tv/resnet50 V2": _torchvision("resnet50", "IMAGENET1K_V2"),
    "openclip/ViT-B-16:openai": _openclip_preset("openclip/ViT-B-16:openai", "ViT-B-16", "openai"),
    "openclip/ViT-B-32:laion2b_s34b_b79k (open registry)": _openclip_preset(
        "openclip/ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k"),
    "openclip/BiomedCLIP": _biomedclip,
    "hf/facebook/dinov2-small": _hf("facebook/dinov2-small"),
    "hf/facebook/dinov2-base": _hf("facebook/dinov2-base"),
    "hf/openai/clip-vit-base-patch16": _hf("openai/clip-vit-base-patch16"),
    "hf/facebook/vit-mae-base": _hf("facebook/vit-mae-base"),
    "hf/facebook/dinov2-small (torchvision backend)": _hf("facebook/dinov2-small", backend="torchvision"),
    "sam/vit_b (SamPredictor)": _sam,
    "medsam/vit_b (MedSAM recipe)": _medsam,
}


@lru_cache(maxsize=None)
def family(name: str):
    torch.manual_seed(0)
    return FAMILIES[name]()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_preprocess_equals_the_official_transform(name):
    encoder, official = family(name)
    worst, mean = grey_levels(encoder, official)
    assert worst <= MAX_GREY and mean <= MEAN_GREY, f"{name}: max {worst:.2f}, mean {mean:.3f} grey levels"


# -- mutations: each perturbation must make the comparison fail -------------------------------------------
def _other_interpolation(encoder):
    info = encoder.info
    info.interpolation = {"bicubic": "bilinear", "bilinear": "bicubic", "cubic-spline": "bilinear"}[info.interpolation]


def _other_normalisation(encoder):
    info = encoder.info
    if info.intensity == "minmax":  # MedSAM: [0, 1] after min-max; the mistake is SAM's pixel mean/std on top
        info.mean, info.std = encoder_base.IMAGENET_MEAN, encoder_base.IMAGENET_STD
        return
    if np.allclose(info.mean, encoder_base.IMAGENET_MEAN, atol=1e-4):  # ImageNet (SAM's pixel mean too)
        info.mean, info.std = encoder_base.CLIP_MEAN, encoder_base.CLIP_STD
    else:
        info.mean, info.std = encoder_base.IMAGENET_MEAN, encoder_base.IMAGENET_STD


def _shifted_crop(monkeypatch):
    """The centre crop taken 3 px off-centre (down and right)."""
    original = encoder_base.center_crop

    def off_centre(x, size):
        return original(torch.nn.functional.pad(x, (0, 3, 0, 3), mode="replicate")[..., 3:, 3:], size)

    monkeypatch.setattr(encoder_base, "center_crop", off_centre)


CROPPED = [n for n in FAMILIES if not n.startswith(("sam/", "medsam/", "hf/facebook/vit-mae"))]
MUTATIONS = [(n, "interpolation") for n in sorted(FAMILIES)] + [(n, "normalisation") for n in sorted(FAMILIES)] + \
    [(n, "crop offset") for n in sorted(CROPPED)]


@pytest.mark.parametrize("name,mutation", MUTATIONS)
def test_each_perturbation_fails_the_check(name, mutation, monkeypatch):
    encoder, official = family(name)
    mutant = copy.deepcopy(encoder)
    if mutation == "interpolation":
        _other_interpolation(mutant)
    elif mutation == "normalisation":
        _other_normalisation(mutant)
    else:
        _shifted_crop(monkeypatch)
    worst, mean = grey_levels(mutant, official)
    assert worst > MAX_GREY, f"{name}: {mutation} not caught (max {worst:.2f} grey levels)"


def mutated_max(name: str, mutation: str) -> float:
    """Max grey-level difference of the family's check after one mutation (outside pytest: for the docs table)."""
    encoder, official = family(name)
    mutant = copy.deepcopy(encoder)
    if mutation == "interpolation":
        _other_interpolation(mutant)
        return grey_levels(mutant, official)[0]
    if mutation == "normalisation":
        _other_normalisation(mutant)
        return grey_levels(mutant, official)[0]
    patch = pytest.MonkeyPatch()
    try:
        _shifted_crop(patch)
        return grey_levels(mutant, official)[0]
    finally:
        patch.undo()


if __name__ == "__main__":  # the table in docs/encoders.md: python -m tests.encoders.test_preprocessing
    print(f"| family | max | mean | interpolation mutated | crop 3 px off | normalisation mutated |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in sorted(FAMILIES):
        torch.manual_seed(0)
        worst, mean = grey_levels(*family(name))
        crop = f"{mutated_max(name, 'crop offset'):.1f}" if name in CROPPED else "n/a (no crop)"
        print(f"| {name} | {worst:.2f} | {mean:.3f} | {mutated_max(name, 'interpolation'):.1f} | {crop} | "
              f"{mutated_max(name, 'normalisation'):.1f} |", flush=True)
