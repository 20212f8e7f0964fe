"""Exact values of the data layer, checked against hand-computed cases or independent implementations
(skimage, PIL, the affine a function returns): resampling and slice-resizing geometry, reslicing fill,
Otsu's threshold, cropping, input fingerprints, plane lists and manifest parsing details."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from slice2vol.data import SliceConfig, Volume, VolumeConfig, load_manifest, load_volume, slice_volume
from slice2vol.data.io import (
    fingerprint,
    fingerprint_changes,
    nearest_ras_grid,
    otsu_threshold,
    resample,
    reslice,
)
from slice2vol.data.manifest import identical_files, infer_label_type
from slice2vol.data.slicing import split_planes
from tests.conftest import blob_volume, write_nifti


def _rot_z(deg: float, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return nib.affines.from_matvec(rot @ np.diag(spacing), origin)


def _volume(data: np.ndarray, spacing=(1.0, 1.0, 1.0), seg: np.ndarray | None = None) -> Volume:
    """A Volume on an axis-aligned grid with every voxel foreground; ``data`` (X, Y, Z)."""
    return Volume(subject_id="v", data=data[None].astype(np.float32), affine=np.diag([*spacing, 1.0]),
                  mask=np.ones(data.shape, dtype=bool), seg=seg)


# -- io: resampling, reslicing, Otsu, cropping, fingerprints -------------------------------------------
def test_nearest_resampling_picks_the_source_voxel_at_each_new_voxel_centre():
    """A label map resampled with ``order="nearest"`` takes, for each new voxel, the source voxel whose
    centre lies at that new voxel's world position (align_corners=False centres, the geometry of the
    returned affine): for a 3x coarser grid, new voxel j sits on old voxel 3j + 1."""
    labels = np.arange(9, dtype=np.int32)[:, None, None].repeat(2, 1).repeat(2, 2)
    out, affine = resample(labels, np.eye(4), (3.0, 1.0, 1.0), order="nearest")
    assert out.shape == (3, 2, 2) and out.dtype == np.int32
    assert out[:, 0, 0].tolist() == [1, 4, 7]
    # independent of the hand count: the returned affine maps new voxel j onto the old index it holds
    old_index = (affine @ np.array([[j, 0, 0, 1] for j in range(3)], dtype=float).T)[0]
    np.testing.assert_allclose(out[:, 1, 1], old_index)
    # and a 2x coarser grid of 8 voxels: new voxel j centred at old 2j + 0.5, rounded half up
    out2, _ = resample(np.arange(8)[:, None, None].repeat(2, 1).repeat(2, 2).astype(np.int32), np.eye(4),
                       (2.0, 1.0, 1.0), order="nearest")
    assert out2[:, 0, 0].tolist() == [1, 3, 5, 7]


@pytest.mark.parametrize("margin", [0, 1])
def test_crop_box_is_the_foreground_bounding_box_plus_margin(tmp_path, margin):
    """``crop_foreground`` cuts to the foreground bounding box plus ``crop_margin`` voxels on both sides
    (clipped to the grid): the cropped mask holds every foreground voxel of the uncropped one, and the
    cropped shape is the box's extent + 1 + 2 * margin."""
    path = write_nifti(tmp_path / "t1.nii.gz", blob_volume(seed=1))
    full = load_volume(path)
    vol = load_volume(path, VolumeConfig(crop_foreground=True, crop_margin=margin))
    fg = np.argwhere(full.mask)
    lo = np.maximum(fg.min(0) - margin, 0)
    hi = np.minimum(fg.max(0) + 1 + margin, full.mask.shape)
    assert vol.shape == tuple(int(n) for n in hi - lo)
    assert int(vol.mask.sum()) == int(full.mask.sum())
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    np.testing.assert_array_equal(vol.mask, full.mask[box])
    np.testing.assert_array_equal(vol.data, full.data[(slice(None),) + box])


def test_fingerprint_changes_rehashes_a_same_size_file_whose_mtime_moved(tmp_path):
    """A file rewritten with the same size but other bytes (its mtime moved) is a content change; a
    file only touched (same bytes, new mtime) is no change."""
    path = write_nifti(tmp_path / "x.nii.gz", blob_volume())
    stored = fingerprint({"t1": path})
    st = os.stat(path)
    # touch: same bytes, another mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint_changes(stored, {"t1": path}) == []
    # same length, other bytes, another mtime
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert os.stat(path).st_size == stored["t1"]["size"]
    assert fingerprint_changes(stored, {"t1": path}) == ["t1 (x.nii.gz): content"]
    # a different size is named as such
    path.write_bytes(bytes(raw) + b"\0")
    assert fingerprint_changes(stored, {"t1": path}) == [
        f"t1 (x.nii.gz): size {len(raw)} -> {len(raw) + 1} bytes"]


def test_nearest_ras_grid_is_centred_on_the_oblique_field_of_view():
    """The RAS grid chosen for an oblique volume is centred on its field of view: the centre of the
    grid's voxel centres is the centre of the 8 corner voxel centres of the oblique volume."""
    shape = (20, 24, 16)
    affine = _rot_z(30, spacing=(1.0, 1.2, 2.0), origin=(-7.0, 3.0, 11.0))
    target, size = nearest_ras_grid(affine, shape)
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], dtype=float)
    world_centre = (corners @ affine.T)[:, :3].mean(0)
    grid_centre = target[:3, 3] + (np.array(size) - 1) * np.diag(target)[:3] / 2
    np.testing.assert_allclose(grid_centre, world_centre, atol=1e-6)
    # the grid covers the field of view to within one voxel on each side
    lo = (corners @ affine.T)[:, :3].min(0)
    assert np.all(target[:3, 3] >= lo - 1e-9) and np.all(target[:3, 3] - lo < np.diag(target)[:3])


def test_reslice_fills_outside_the_field_of_view_with_the_source_minimum():
    """Reslicing an oblique image fills target voxels outside its field of view with the source
    minimum (its background), not 0: a CT-like background of -100 stays -100 there."""
    shape = (24, 28, 20)
    data = blob_volume(shape) - 100.0  # background -100, head 0..~120
    affine = _rot_z(30)
    img = nib.Nifti1Image(data, affine)
    target, size = nearest_ras_grid(affine, shape)
    out = reslice(img, target, size, order=3)
    # target voxels more than 3 source voxels outside the source grid (beyond the spline's reach)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ target[:3, :3].T + target[:3, 3]
    src = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    outside = np.any((src < -3) | (src > np.array(shape) - 1 + 3), axis=1)
    assert outside.sum() > 100
    np.testing.assert_array_equal(out.reshape(-1)[outside], -100.0)
    # nearest-neighbour (label maps) fills with 0
    labels = reslice(nib.Nifti1Image(np.ones(shape, np.float32) * 3, affine), target, size, order=0)
    np.testing.assert_array_equal(labels.reshape(-1)[outside], 0.0)


def test_otsu_threshold_matches_skimage():
    """``otsu_threshold`` is Otsu's threshold as skimage computes it (the centre of the best bin of a
    256-bin histogram), not a bin edge."""
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(10, 2, 4000), rng.normal(40, 5, 6000)])
    assert otsu_threshold(x) == pytest.approx(threshold_otsu(x, nbins=256), rel=1e-9)
    y = np.concatenate([rng.gamma(2.0, 3.0, 5000), rng.normal(200, 30, 2000)]).astype(np.float32)
    assert otsu_threshold(y) == pytest.approx(threshold_otsu(y.astype(np.float64), nbins=256), rel=1e-9)


# -- slicing ---------------------------------------------------------------------------------------
def test_resized_slices_are_padded_centred_with_zeros():
    """A slice resized to keep its physical aspect sits centred in the square, the padding exactly 0."""
    rng = np.random.default_rng(0)
    vol = _volume(1.0 + rng.random((20, 30, 6)), spacing=(1.0, 2.0, 1.0))  # axial: 60 mm high, 20 mm wide
    axial = slice_volume(vol, SliceConfig(planes=("axial",), min_foreground=0.0, size=64))["axial"]
    width = round(64 * 20 / 60)
    left = (64 - width) // 2
    assert axial.content_box == (0, left, 64, width)
    images = axial.images
    assert torch.all(images[..., :left] == 0) and torch.all(images[..., left + width:] == 0)
    assert torch.all(images[..., left:left + width] > 0)
    # coronal: 20 mm wide (x), 6 mm high (z): padded above and below, centred
    coronal = slice_volume(vol, SliceConfig(planes=("coronal",), min_foreground=0.0, size=64))["coronal"]
    height = round(64 * 6 / 20)
    top = (64 - height) // 2
    assert coronal.content_box == (top, 0, height, 64)
    assert torch.all(coronal.images[..., :top, :] == 0) and torch.all(coronal.images[..., top + height:, :] == 0)
    assert torch.all(coronal.images[..., top:top + height, :] > 0)


def test_label_slices_take_the_source_pixel_at_each_output_pixel_centre():
    """Resizing label slices takes for output row r the source row under its centre (align_corners=False):
    a 3x shrink of rows 0..47 gives rows 1, 4, 7, ... (the same geometry as the bilinear image)."""
    n = 48
    rows = np.arange(n)[::-1]  # axial display row r is y = n - 1 - r
    seg = np.broadcast_to(rows[None, :, None], (n, n, 2)).astype(np.int32).copy()
    vol = _volume(seg.astype(np.float32) + 1.0, seg=seg)
    axial = slice_volume(vol, SliceConfig(planes=("axial",), min_foreground=0.0, size=16))["axial"]
    assert axial.content_box == (0, 0, 16, 16)
    labels = axial.labels.numpy()
    expected = np.floor((np.arange(16) + 0.5) * n / 16).astype(int)
    assert expected.tolist()[:3] == [1, 4, 7]
    np.testing.assert_array_equal(labels, np.broadcast_to(expected[None, :, None], labels.shape))
    # the bilinear image of the same ramp (+1) is centred on the same rows away from the borders
    image = axial.images[:, 0].numpy()
    np.testing.assert_allclose(image[:, 1:-1, :], labels[:, 1:-1, :] + 1.0, atol=1e-4)


def test_shrinking_slices_is_antialiased_like_pil():
    """Shrinking a slice low-pass filters it as PIL's bilinear resize does: a one-pixel checkerboard
    shrunk 3x comes out near-uniform grey, not aliased to 0/1."""
    from PIL import Image

    n = 48
    board = (np.add.outer(np.arange(n), np.arange(n)) % 2).astype(np.float32)
    data = np.repeat(board[:, :, None], 2, axis=2)  # (X, Y, Z)
    axial = slice_volume(_volume(data), SliceConfig(planes=("axial",), min_foreground=0.0, size=16))["axial"]
    shown = data[:, :, 0].T[::-1]  # display orientation: rows y flipped, columns x
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(shown), mode="F").resize((16, 16), Image.BILINEAR))
    got = axial.images[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert got[2:-2, 2:-2].std() < 0.05


def test_split_planes_allows_one_trailing_comma_only():
    """``split_planes`` strips names, allows one trailing comma, returns () for nothing, and refuses
    an empty name between commas."""
    assert split_planes("axial, coronal,") == ("axial", "coronal")
    assert split_planes("axial,") == ("axial",)
    assert split_planes(" sagittal ") == ("sagittal",)
    assert split_planes("") == ()
    assert split_planes(" , ") == ()
    with pytest.raises(ValueError, match="empty plane name"):
        split_planes("axial,,coronal")
    assert SliceConfig(planes="axial,coronal,").planes == ("axial", "coronal")


# -- manifest --------------------------------------------------------------------------------------
def test_infer_label_type_allows_at_most_ten_repeated_integer_classes():
    """Integer codes that repeat are categorical up to 10 distinct values; 11 are continuous."""
    ten = pd.Series(np.repeat(np.arange(1, 11), 3))
    eleven = pd.Series(np.repeat(np.arange(1, 12), 3))
    assert infer_label_type(ten) == "categorical"
    assert infer_label_type(eleven) == "continuous"
    assert infer_label_type(eleven, max_classes=11) == "categorical"


def test_label_map_columns_are_recognised_whatever_their_case(tmp_path):
    """Columns named BrainMask or LesionSeg hold label maps, not image channels (the name match
    ignores case)."""
    for i, name in enumerate(["a.nii.gz", "a_mask.nii.gz", "a_les.nii.gz"]):
        write_nifti(tmp_path / "img" / name, blob_volume(seed=i))
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,BrainMask,LesionSeg\na,img/a.nii.gz,img/a_mask.nii.gz,img/a_les.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.modalities == ["t1"]
    assert sorted(cohort.subjects[0].maps) == ["BrainMask", "LesionSeg"]


def test_identical_files_groups_are_sorted_by_first_path(tmp_path):
    """``identical_files`` returns each group sorted, and the groups sorted by their first path,
    whatever the order the paths were given in."""
    a, b, c, d = (tmp_path / f"{n}.bin" for n in "abcd")
    a.write_bytes(b"x" * 5000)
    b.write_bytes(b"x" * 5000)
    c.write_bytes(b"y" * 5000)
    d.write_bytes(b"y" * 5000)
    assert identical_files([d, c, b, a]) == [[a, b], [c, d]]
    assert identical_files([c, d, a, b]) == [[a, b], [c, d]]
