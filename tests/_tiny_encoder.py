"""A tiny registered encoder for cache tests: ``test/tiny_cnn`` (32 px, 16-dim, deterministic).

Importing this module registers it once. ``delay`` (seconds per batch, or env
``TINY_ENCODER_DELAY``) makes a job slow enough to be killed mid-run; it does not change the features. Weights are seeded, so every process builds the
same network (the job also seeds ``random`` weights itself).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

from slice2vol.encoders.base import ENCODERS, Encoder, EncoderInfo

KEY = "test/tiny_cnn"


class TinyEncoder(Encoder):
    """Two conv layers; ``encode`` -> (B, 16) mean-pooled, ``tokens`` -> (B, 16, 8) on a 4x4 grid."""

    def __init__(self, img_size: int = 32, embed_dim: int = 16, delay: float = 0.0) -> None:
        super().__init__()
        self.info = EncoderInfo(key=KEY, embed_dim=embed_dim, input_size=(img_size, img_size),
                                patch_size=img_size // 4, token_dim=8, source="test")
        self.delay = delay
        gen = torch.Generator().manual_seed(1234)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, embed_dim, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        # TINY_ENCODER_DELAY slows a subprocess job down without entering the provenance
        delay = self.delay or float(os.environ.get("TINY_ENCODER_DELAY", "0"))
        if delay:
            time.sleep(delay)
        # TINY_ENCODER_FAIL_AFTER=k: the (k+1)-th forward pass raises, like a CUDA out-of-memory error
        fail_after = int(os.environ.get("TINY_ENCODER_FAIL_AFTER", "-1"))
        self.calls = getattr(self, "calls", 0) + 1
        if 0 <= fail_after < self.calls:
            raise RuntimeError("simulated out of memory")
        return self.conv2(torch.relu(self.conv1(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x).mean((-2, -1))

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        fmap = nn.functional.adaptive_avg_pool2d(self._map(x)[:, :8], 4)
        return fmap.flatten(2).transpose(1, 2), (4, 4)


if KEY not in ENCODERS:
    @ENCODERS.register(KEY, embed_dim=16)
    def build_tiny(weights: str = "random", img_size: int = 32, embed_dim: int = 16,
                   delay: float = 0.0) -> TinyEncoder:
        if weights not in ("random", None, ""):
            raise ValueError(f"{KEY}: only random weights")
        return TinyEncoder(img_size, embed_dim, delay)


def make_tiny_cohort(root, n: int = 6, corrupt: bool = False, shape=(24, 28, 20)):
    """Writes ``n`` blob volumes + ``manifest.csv`` (labels ``age`` continuous, ``sex`` categorical).

    With ``corrupt`` an extra row ``bad`` points at a file that is not NIfTI. Returns the manifest path.
    """
    from pathlib import Path

    import pandas as pd

    from tests.conftest import blob_volume, write_nifti

    root = Path(root)
    rows = []
    for i in range(n):
        write_nifti(root / f"sub{i}.nii.gz", blob_volume(shape, seed=i))
        rows.append({"subject_id": f"sub{i}", "t1": f"sub{i}.nii.gz", "age": 20.5 + 7.25 * i, "sex": "MF"[i % 2]})
    if corrupt:
        (root / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        rows.insert(2, {"subject_id": "bad", "t1": "bad.nii.gz", "age": 50.0, "sex": "F"})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
