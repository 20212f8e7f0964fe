"""Shared fixtures: the IXI development cohort (skipped when absent), offline hub, small NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ixi_root() -> Path | None:
    """``$SLICE2VOL_IXI`` or ``../shared/data/ixi-hh-2mm`` beside the checkout, if it exists."""
    candidates = [os.environ.get("SLICE2VOL_IXI"), REPO.parent / "shared" / "data" / "ixi-hh-2mm"]
    for c in candidates:
        if c and (Path(c) / "participants.csv").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    root = ixi_root()
    if root is None:
        pytest.skip("IXI cohort not found: set SLICE2VOL_IXI or place it at ../shared/data/ixi-hh-2mm")
    return root


@pytest.fixture(scope="session")
def ixi_manifest(ixi_dir: Path) -> Path:
    return ixi_dir / "participants.csv"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Writes ``data`` as NIfTI (identity affine by default) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def blob_volume(shape=(24, 28, 20), seed: int = 0) -> np.ndarray:
    """A smooth ellipsoid 'head' with structure inside, float32 (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    vol = np.clip(1.2 - radius, 0, None) * 100 + rng.normal(0, 1, shape)
    vol[radius > 0.9] = 0
    return vol.astype(np.float32)


@pytest.fixture
def small_nifti(tmp_path: Path) -> Path:
    return write_nifti(tmp_path / "small.nii.gz", blob_volume())
