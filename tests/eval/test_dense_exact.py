"""Exact values of the dense probes' geometry and storage: level selection, float16 scaling of signed
maps, slice and cell centres, the brain's box under anisotropic voxels, the intensity control's
channel, and the paired-rank interval (each once checked only loosely or on symmetric cases)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from slice2vol.data.io import load_volume
from slice2vol.data.slicing import _IN_PLANE, PLANES
from slice2vol.eval.anomaly import cell_positions, paired_rank_fraction
from slice2vol.eval.dense import (IntensityFeatures, Level, _cell_patches, _quantize, brain_box, extract_dense,
                                  select_levels)
from tests.conftest import blob_volume, write_nifti

LEVELS = [Level(i, f"l{i}", 8, 2 ** i) for i in range(4)]


def test_a_level_index_past_the_last_is_refused():
    """Index 4 of 4 levels used to wrap to level 0; -4 is the first level, -5 is nothing."""
    assert select_levels(LEVELS, [-4]) == [0] and select_levels(LEVELS, [3, "-1"]) == [3]
    for bad in (4, -5, "4"):
        with pytest.raises(ValueError, match=r"level -?\d out of range: the encoder has 4 levels"):
            select_levels(LEVELS, [bad])


def test_signed_maps_are_scaled_by_their_largest_magnitude():
    """A channel reaching -50 but only 1e-4 above 0 (signed transformer features) is scaled by 50:
    scaled by its signed maximum it overflowed float16 and was clipped to -65000."""
    maps = torch.tensor([-50.0, -1.0, 1e-4, 0.5]).reshape(1, 1, 1, 4)
    q, scale = _quantize(maps)
    assert scale.tolist() == [50.0] and np.abs(q).max() == 1
    np.testing.assert_allclose(q.astype(np.float32) * scale[None, :, None, None], maps.numpy(), rtol=1e-3, atol=1e-5)
    q, scale = _quantize(-torch.rand(2, 3, 4, 4) - 0.1)  # all negative
    assert (scale > 0).all() and np.abs(q).max() == 1


def test_the_intensity_control_reads_the_middle_channel_of_a_stack():
    images = torch.stack([torch.full((4, 4), float(c)) for c in range(3)])[None]  # channels 0, 1, 2
    patch, = IntensityFeatures(patch=1, coords=False).feature_maps(images, [0])
    assert patch.shape == (1, 1, 4, 4) and torch.all(patch == 1.0)


def test_cells_sample_the_centre_of_their_pixels():
    """A cell of a stride-4 grid stands for pixels 0-3: its centre is 1.5 (the bilinear value of a row
    ramp there), as average pooling of the ramp gives; stride 1 keeps the pixels themselves."""
    ramp = torch.arange(16, dtype=torch.float32)[None, None, :, None].expand(1, 1, 16, 16).contiguous()
    cells = _cell_patches(ramp, 1, 4)[0, 0]
    np.testing.assert_allclose(cells[:, 0].numpy(), [1.5, 5.5, 9.5, 13.5])
    np.testing.assert_allclose(cells.numpy(), torch.nn.functional.avg_pool2d(ramp, 4)[0, 0].numpy())
    np.testing.assert_allclose(_cell_patches(ramp, 1, 1)[0, 0].numpy(), ramp[0, 0].numpy())


def test_cell_positions_are_cell_centres_in_mm():
    """A 32 x 32 slice at 1 mm cut into 4 x 4 cells: row and column centres 4, 12, 20, 28 mm; the
    through-plane position is the slice index x its spacing."""
    ds = SimpleNamespace(box=(0, 0, 32, 32), content_box=(0, 0, 32, 32), plane="axial", grid_shape=(32, 32),
                         spacing=(1.0, 1.0, 2.5), indices=np.array([3, 7]), brain_box=None)
    pos = cell_positions(ds, (4, 4))
    assert pos.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(pos[0, :, 0, 1], [4, 12, 20, 28])
    np.testing.assert_allclose(pos[0, 0, :, 2], [4, 12, 20, 28])
    np.testing.assert_allclose(pos[:, 0, 0, 0], [7.5, 17.5])


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_the_brain_box_uses_each_axis_own_spacing(plane):
    """Voxels of 1 x 2 x 3 mm and a brain of 4 x 6 x 8 voxels: the box spans (n - 1) x spacing along
    each axis of the plane's frame (rows took the column spacing unseen with isotropic voxels)."""
    mask = np.zeros((12, 14, 16), bool)
    mask[2:6, 3:9, 4:12] = True
    spacing, size = (1.0, 2.0, 3.0), (4, 6, 8)
    box = brain_box(SimpleNamespace(seg=None, mask=mask, spacing=spacing), plane)
    z, (r, c) = PLANES[plane], _IN_PLANE[plane]
    assert box[1] - box[0] == pytest.approx((size[z] - 1) * spacing[z])
    assert box[3] - box[2] == pytest.approx((size[r] - 1) * spacing[r])
    assert box[5] - box[4] == pytest.approx((size[c] - 1) * spacing[c])
    assert box[2] / spacing[r] % 1 == pytest.approx(0.5) and box[4] / spacing[c] % 1 == pytest.approx(0.5)


def test_slice_coordinates_are_slice_centres(tmp_path):
    """The through-plane coordinate given to a position-aware encoder is (i + 0.5) / n: the first and
    last slices sit symmetrically, as in-plane rows and columns do."""
    vol = load_volume(write_nifti(tmp_path / "v.nii.gz", blob_volume((20, 24, 18), seed=1)))
    dense = extract_dense(IntensityFeatures(patch=1, coords=True), vol, "axial", 32, [1])
    z = dense.maps[0][:, 2].astype(np.float32) * dense.scales[0][2]
    n = vol.shape[PLANES["axial"]]
    np.testing.assert_allclose(z[:, 0, 0], (dense.indices + 0.5) / n, atol=2e-3)
    assert dense.indices[0] == 0 and z[0, 0, 0] == pytest.approx(0.5 / n, abs=1e-3)


def test_the_paired_rank_interval_is_the_95_percent_bootstrap_interval():
    """Recomputed from the same draws: 2.5 and 97.5 percentiles of the resampled win fractions."""
    rng = np.random.default_rng(3)
    healthy, lesioned = rng.random(40), rng.random(40) + 0.2
    lesioned[:3] = healthy[:3]  # ties count half
    est, low, high = paired_rank_fraction(healthy, lesioned, n_boot=500, seed=7)
    wins = (lesioned > healthy) + 0.5 * (lesioned == healthy)
    boots = wins[np.random.default_rng(7).integers(0, 40, (500, 40))].mean(1)
    assert est == pytest.approx(wins.mean())
    assert (low, high) == pytest.approx((np.quantile(boots, 0.025), np.quantile(boots, 0.975)))
