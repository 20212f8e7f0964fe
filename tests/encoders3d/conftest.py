"""Shared pieces of the 3D-encoder tests: small synthetic NIfTI heads (always available) and a manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import blob_volume, write_nifti

SPACING_2MM = np.diag([2.0, 2.0, 2.0, 1.0])


def head(shape=(30, 34, 28), seed: int = 0) -> np.ndarray:
    """A blob head with a brighter inner 'brain' and a darker 'ventricle', raw scanner-like values."""
    vol = blob_volume(shape, seed=seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    vol[radius < 0.6] += 40.0
    vol[np.sqrt((grid[0] * 3) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.25] -= 60.0
    return np.clip(vol, 0, None).astype(np.float32)


@pytest.fixture
def head_manifest(tmp_path: Path) -> Path:
    """4 subjects of 2 mm synthetic heads of slightly different sizes, with age/sex labels."""
    import pandas as pd

    rows = []
    for i in range(4):
        shape = (28 + 2 * i, 32 + i, 26 + i)
        path = write_nifti(tmp_path / "nii" / f"s{i}.nii.gz", head(shape, seed=i), SPACING_2MM)
        rows.append({"subject_id": f"s{i}", "age": 20.5 + 10 * i, "sex": "MF"[i % 2], "t1": f"nii/s{i}.nii.gz"})
    csv = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.fixture
def head_volume(tmp_path: Path):
    """One raw 2 mm synthetic head as slice2vol loads it for 3D encoders (RAS, raw intensities)."""
    from slice2vol.data.io import VolumeConfig, load_volume

    path = write_nifti(tmp_path / "head.nii.gz", head(), SPACING_2MM)
    return load_volume(path, VolumeConfig(normalize="none"))
