"""Shared helpers for encoder tests: real IXI slices, the 8-bit PIL images official pipelines take, packaged weights."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


@lru_cache(maxsize=4)
def ixi_slices(manifest: Path, plane: str = "axial", n: int = 3, size: int | None = 224) -> torch.Tensor:
    """``n`` evenly spaced brain slices of the first IXI subject, (n, 1, H, W) float in [0, 1].

    ``size=None`` keeps the native in-plane grid (coronal: 90 x 120, non-square).
    """
    from slice2vol.data.manifest import load_manifest, load_subject
    from slice2vol.data.slicing import SliceConfig, slice_volume

    cohort = load_manifest(manifest)
    volume = load_subject(cohort.subjects[0], with_seg=False)
    planes = slice_volume(volume, SliceConfig(planes=(plane,), min_foreground=0.2, size=size))
    images = planes[plane].images
    pick = np.linspace(0, len(images) - 1, n + 2).round().astype(int)[1:-1]
    return images[pick].contiguous()


def to_pil(image: torch.Tensor):
    """(1, H, W) float in [0, 1] -> 8-bit RGB PIL image (the grey slice replicated), as a user would."""
    from PIL import Image

    array = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="L").convert("RGB")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (B, D) tensors."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def quantised(images: torch.Tensor) -> torch.Tensor:
    """What the 8-bit PIL image holds, as floats in [0, 1] (isolates the pipeline from input rounding)."""
    return (images.clamp(0, 1) * 255).round() / 255


def grey_levels(encoder, ours: torch.Tensor, official: torch.Tensor) -> torch.Tensor:
    """|ours - official| of two network inputs in grey levels (of 255) of the [0, 1] image, per pixel."""
    std = torch.tensor(encoder.info.std).view(1, -1, 1, 1)
    return (ours - official).abs() * std * 255


def randomise_layer_scale(module: torch.nn.Module, seed: int = 1) -> None:
    """DINOv2's LayerScale starts at 1e-5, so a random DINOv2 ignores its blocks (and nearly its input, through
    CLS pooling); give the scales weight so feature comparisons can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "layer_scale1.lambda1", "layer_scale2.lambda1")):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def pretrained_or_skip(key: str, **kwargs):
    """``build_encoder(key, 'pretrained')`` with the tests' weights folder (``tests.conftest.weights_root``:
    ``$SLICE2VOL_WEIGHTS``, else ``../shared/weights`` beside the checkout) first, then installed weight
    packages and caches; skips naming the fix when the weights are on no source."""
    import os
    from unittest import mock

    import pytest

    from slice2vol.encoders import WeightsUnavailable, build_encoder
    from slice2vol.encoders.weights import WEIGHTS_ENV
    from tests.conftest import weights_root

    root = weights_root()
    env = {WEIGHTS_ENV: str(root)} if root is not None else {}
    try:
        with mock.patch.dict(os.environ, env):
            return build_encoder(key, weights="pretrained", **kwargs)
    except WeightsUnavailable as err:
        pytest.skip(f"real weights not installed: {str(err)[:300]}")


def fake_hf_cache(cache: Path, repo: str) -> Path:
    """An empty snapshot directory laid out as the Hugging Face cache stores ``repo`` (commit ``c0ffee``)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c0ffee")
    snapshot = root / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    return snapshot
