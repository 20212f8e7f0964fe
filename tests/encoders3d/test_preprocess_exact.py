"""Exact values of the 3D recipes' geometry: aspect-keeping fit, nearest resizing on voxel centres,
and which channels feed a network by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.data.io import Volume
from slice2vol.encoders3d.preprocess import fit_into, resize_to, select_channels


def test_fit_keeps_the_aspect_ratio_and_centres_the_volume():
    """A 20 x 40 x 40 box fitted into 32^3 becomes 16 x 32 x 32 (scale 0.8 by its longest side),
    padded by 8 zero planes on each side of its short axis."""
    x = torch.ones(1, 20, 40, 40)
    out = fit_into(x, (32, 32, 32))
    assert out.shape == (1, 32, 32, 32)
    filled = np.argwhere(out[0].numpy() > 0.5)
    assert filled.min(0).tolist() == [8, 0, 0] and filled.max(0).tolist() == [23, 31, 31]
    assert torch.all(out[0, :8] == 0) and torch.all(out[0, 24:] == 0)


def test_nearest_resizing_picks_the_voxel_under_each_new_centre():
    """Halving 0..7 keeps voxels 1, 3, 5, 7: new centre j sits at old 2j + 0.5, whose nearest voxel
    (round half up, as nearest-exact and scipy's zoom on centres do) is 2j + 1; torch's legacy
    'nearest' gives 0, 2, 4, 6, half a voxel off the trilinear image."""
    ramp = torch.arange(8.0).reshape(1, 8, 1, 1).expand(1, 8, 2, 2)
    assert resize_to(ramp, (4, 2, 2), "nearest")[0, :, 0, 0].tolist() == [1.0, 3.0, 5.0, 7.0]
    # the trilinear image of the same resize is centred the same way: 0.5, 2.5, ... averaged pairs
    assert resize_to(ramp, (4, 2, 2), "area")[0, :, 0, 0].tolist() == [0.5, 2.5, 4.5, 6.5]


def test_the_first_channels_feed_a_network_by_default():
    vol = Volume("s", np.zeros((2, 4, 4, 4), np.float32), np.eye(4), np.ones((4, 4, 4), bool),
                 modalities=("t1", "t2"))
    assert select_channels(vol, 1, None) == [0]
    assert select_channels(vol, 2, None) == [0, 1]
    assert select_channels(vol, 1, 1) == [1]
    with pytest.raises(ValueError, match=r"s: channel \[2\] out of range \(the volume has 2\)"):
        select_channels(vol, 1, 2)
