"""Slicing: counts per plane, orientation, 2.5D stacks, aspect-preserving resize and the inverse."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from slice2vol.data import SliceConfig, Volume, load_manifest, load_subject, slice_volume, slices_to_grid


def _volume(shape=(20, 30, 40), spacing=(1.0, 1.0, 1.0)):
    data = np.zeros((1, *shape), np.float32)
    data[0, 5:15, 5:25, 5:35] = 1.0
    data[0, 6, 7, 8] = 0.5  # a marker voxel
    mask = data[0] > 0
    seg = (data[0] > 0).astype(np.int32) * 3
    return Volume("v", data, np.diag([*spacing, 1.0]), mask, seg=seg)


def test_counts_follow_grid_and_stride():
    vol = _volume()
    out = slice_volume(vol, SliceConfig(min_foreground=0.0, size=None))
    assert {p: len(s) for p, s in out.items()} == {"axial": 40, "coronal": 30, "sagittal": 20}
    strided = slice_volume(vol, SliceConfig(min_foreground=0.0, stride=3, size=None))
    assert list(strided["axial"].indices) == list(range(0, 40, 3))


def test_min_foreground_skips_empty_slices():
    out = slice_volume(_volume(), SliceConfig(min_foreground=0.01, size=None))
    assert list(out["sagittal"].indices) == list(range(5, 15))


def test_orientation_superior_up_and_marker_position():
    vol = _volume()
    out = slice_volume(vol, SliceConfig(min_foreground=0.0, size=None, planes=("coronal",)))
    coronal = out["coronal"]
    image = coronal.images[list(coronal.indices).index(7), 0]
    # coronal image: rows = z descending (superior on top), cols = x
    assert image.shape == (40, 20)
    assert image[40 - 1 - 8, 6] == pytest.approx(0.5)
    # slice positions are world coordinates of slice centres
    np.testing.assert_allclose(coronal.positions[7], [9.5, 7.0, 19.5])


def test_context_stacks_neighbours_as_channels():
    vol = _volume()
    out = slice_volume(vol, SliceConfig(min_foreground=0.0, size=None, context=3, planes=("sagittal",)))
    sag = out["sagittal"]
    assert sag.images.shape[1] == 3
    # middle channel is the slice itself, neighbours are slices i-1, i+1 (clamped at the edge)
    plain = slice_volume(vol, SliceConfig(min_foreground=0.0, size=None, planes=("sagittal",)))["sagittal"]
    torch.testing.assert_close(sag.images[6, 1], plain.images[6, 0])
    torch.testing.assert_close(sag.images[6, 0], plain.images[5, 0])
    torch.testing.assert_close(sag.images[0, 0], plain.images[0, 0])


@pytest.mark.parametrize("context", [1, 3])
def test_slices_foreground_and_labels_match_a_numpy_reference(context):
    """Every plane against np.take + transpose + row flip of the whole volume: two modalities
    (stacked modality-major), a ragged random mask near the min_foreground cut, labels, stride 2."""
    rng = np.random.default_rng(3)
    shape = (11, 14, 9)
    data = rng.random((2, *shape), dtype=np.float32)
    mask = rng.random(shape) < np.linspace(0.0, 0.8, shape[0])[:, None, None]
    seg = rng.integers(0, 5, shape).astype(np.int32)
    vol = Volume("v", data, np.diag([1.0, 1.2, 1.5, 1.0]), mask, seg=seg)
    cfg = SliceConfig(min_foreground=0.3, size=None, stride=2, context=context)
    out = slice_volume(vol, cfg)
    half = context // 2

    def display(array, axis, i):  # (X, Y, Z) -> slice i of the plane: rows = later axis, flipped
        return np.flip(np.take(array, i, axis=axis).T, axis=0)

    for plane, axis in {"sagittal": 0, "coronal": 1, "axial": 2}.items():
        n = shape[axis]
        fg = np.array([display(mask, axis, i).astype(np.float32).mean(dtype=np.float32) for i in range(n)])
        keep = [i for i in range(0, n, 2) if fg[i] >= 0.3]
        got = out[plane]
        assert list(got.indices) == keep and len(keep) > 0
        if plane == "sagittal":  # the mask thins out along x: there the cut bites
            assert len(keep) < len(range(0, n, 2))
        np.testing.assert_array_equal(got.foreground, fg[keep])
        expected = np.stack([np.stack([display(data[m], axis, min(max(i + d, 0), n - 1))
                                       for m in range(2) for d in range(-half, half + 1)]) for i in keep])
        np.testing.assert_array_equal(got.images.numpy(), expected)
        np.testing.assert_array_equal(got.labels.numpy(), np.stack([display(seg, axis, i) for i in keep]))


@pytest.mark.parametrize("size", [None, 16])
def test_a_volume_without_foreground_gives_empty_planes_with_context(size):
    """No slice passes min_foreground: every plane is empty, with the 2.5D channel count (this used to
    fail reshaping 0 elements with an inferred dimension)."""
    vol = Volume("empty", np.zeros((2, 10, 12, 8), np.float32), np.eye(4), np.zeros((10, 12, 8), bool))
    out = slice_volume(vol, SliceConfig(context=3, min_foreground=0.5, size=size))
    for plane, rows_cols in {"sagittal": (8, 12), "coronal": (8, 10), "axial": (12, 10)}.items():
        assert len(out[plane]) == 0
        assert tuple(out[plane].images.shape) == (0, 6, *((size, size) if size else rows_cols))


def test_resize_keeps_physical_aspect_and_inverse_restores_grid():
    vol = _volume(spacing=(1.0, 2.0, 1.0))  # coronal extent: 20 mm wide (x), 40 mm high (z)
    out = slice_volume(vol, SliceConfig(min_foreground=0.0, size=64))
    axial = out["axial"]  # rows y (30 x 2 mm = 60 mm), cols x (20 mm)
    top, left, height, width = axial.content_box
    assert (height, width) == (64, round(64 * 20 / 60))
    assert axial.images.shape == (40, 1, 64, 64)
    # labels survive the round trip back onto the volume grid
    onehot = torch.nn.functional.one_hot(axial.labels, 4).permute(0, 3, 1, 2).float()
    grid = slices_to_grid(onehot, axial, vol.shape, mode="nearest-exact")
    restored = grid.argmax(0).numpy()
    assert (restored == vol.seg).mean() > 0.97


@pytest.mark.ixi
def test_ixi_slicing_is_complete(ixi_manifest):
    """Every slice of a real IXI scan, with its labels (speed is measured by scripts/bench_slicing.py,
    not asserted here: a timed test fails on a loaded machine)."""
    cohort = load_manifest(ixi_manifest)
    vol = load_subject(cohort.subjects[0])
    out = slice_volume(vol, SliceConfig(min_foreground=0.0, size=224))
    assert {p: len(s) for p, s in out.items()} == {"sagittal": 90, "coronal": 120, "axial": 120}
    for plane in out.values():
        assert plane.labels is not None and plane.labels.shape[0] == len(plane)


def test_planes_given_as_a_string_are_plane_names():
    """``SliceConfig(planes="axial")`` used to be five one-letter planes ('unknown plane(s) ['a', 'x', ...]')."""
    from slice2vol.data.slicing import SliceConfig

    assert SliceConfig(planes="axial").planes == ("axial",)
    assert SliceConfig(planes="axial, coronal").planes == ("axial", "coronal")
