"""Shared helpers for encoder tests: real IXI slices and the 8-bit PIL images official pipelines take."""

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


def preprocess_8bit(encoder, images: torch.Tensor) -> torch.Tensor:
    """Our batched preprocessing with the two roundings an 8-bit PIL pipeline adds (input and resized
    image stored as uint8). Trained CNNs on dark MRI slices move by ~1e-3 in cosine from rounding
    alone, so this separates "same pipeline" from "same bits"."""
    from slice2vol.encoders.base import center_crop, resize_images, resize_shorter

    info = encoder.info
    x = encoder.adapt_channels((images.clamp(0, 1) * 255).round() / 255)
    if info.resize == "shorter":
        x = center_crop(resize_shorter(x, info.resize_size or max(info.input_size), info.interpolation),
                        info.input_size)
    else:
        x = resize_images(x, info.input_size, info.interpolation)
    x = (x * 255).round() / 255
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x - mean) / std


def fake_hf_cache(cache: Path, repo: str) -> Path:
    """An empty snapshot directory laid out as the Hugging Face cache stores ``repo`` (commit ``c0ffee``)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c0ffee")
    snapshot = root / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    return snapshot
