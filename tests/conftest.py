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


def _shared_dir(env: str, relative: str, marker: str) -> Path | None:
    """``$<env>`` if set (even when wrong: a set variable is never silently replaced), else
    ``../shared/<relative>`` beside the checkout when it holds ``marker``."""
    value = os.environ.get(env)
    if value:
        return Path(value) if (Path(value) / marker).exists() else None
    default = REPO.parent / "shared" / relative
    return default if (default / marker).exists() else None


def ixi_root() -> Path | None:
    """``$SLICE2VOL_IXI`` or ``../shared/data/ixi-hh-2mm`` beside the checkout, if it exists."""
    return _shared_dir("SLICE2VOL_IXI", "data/ixi-hh-2mm", "participants.csv")


def weights_root() -> Path | None:
    """``$SLICE2VOL_WEIGHTS`` or ``../shared/weights`` beside the checkout, if it exists."""
    return _shared_dir("SLICE2VOL_WEIGHTS", "weights", "SHA256SUMS")


def shared_weight(filename: str) -> Path:
    """A real weights file from the weights folder; skips the test (naming the variable) when absent."""
    root = weights_root()
    if root is None or not (root / filename).exists():
        pytest.skip(f"real weights {filename} not found: set SLICE2VOL_WEIGHTS to a folder holding it "
                    "(or place it in ../shared/weights)")
    return root / filename


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    root = ixi_root()
    if root is None:
        pytest.skip("IXI cohort not found: set SLICE2VOL_IXI or place it at ../shared/data/ixi-hh-2mm")
    return root


@pytest.fixture(scope="session")
def ixi_manifest(ixi_dir: Path) -> Path:
    return ixi_dir / "participants.csv"


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    root = weights_root()
    if root is None:
        pytest.skip("real weights folder not found: set SLICE2VOL_WEIGHTS or place it at ../shared/weights")
    return root


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


def fail_subject(monkeypatch, module, subject_id: str, error: BaseException) -> None:
    """Makes ``module.load_subject`` raise ``error`` for one subject: an unexpected exception from deep
    inside loading, for the tests that every per-subject loop records it and goes on."""
    real = module.load_subject

    def flaky(subject, *args, **kwargs):
        if subject.subject_id == subject_id:
            raise error
        return real(subject, *args, **kwargs)

    monkeypatch.setattr(module, "load_subject", flaky)
