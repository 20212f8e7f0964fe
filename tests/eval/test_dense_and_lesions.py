"""Label mapping for the dense probe, reassembly geometry, and the lesion simulation's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.data.io import Volume
from slice2vol.data.slicing import SliceConfig, slice_volume, slices_to_grid
from slice2vol.eval.dense import token_box
from slice2vol.eval.lesions import LesionConfig, simulate_lesions
from slice2vol.eval.segmentation import (apply_lut, dice_per_class, label_lut, muse_structures, place_in_box,
                                         read_composite_mapping)


def test_composite_mapping_and_lut(tmp_path):
    csv = tmp_path / "map.csv"
    csv.write_text("702,ICV,1,4,11,,\n601,GM,23,30,,\n604,WM,40,41,,\n509,Ventricles,4,11,49,,\n601,GM,23,30,,\n")
    table = read_composite_mapping(csv)
    assert table[601] == [23, 30] and table[509] == [4, 11, 49]
    structures = muse_structures({"gm": [601], "wm": [604], "vent": [509], "raw": [7]}, csv)
    assert structures == {"gm": [23, 30], "wm": [40, 41], "vent": [4, 11, 49], "raw": [7]}
    lut = label_lut(structures, max_label=255)
    seg = np.array([0, 23, 30, 40, 4, 49, 7, 200, 255])
    np.testing.assert_array_equal(apply_lut(seg, lut), [0, 1, 1, 2, 3, 3, 4, 0, 0])
    np.testing.assert_array_equal(apply_lut(torch.as_tensor(seg), lut).numpy(), [0, 1, 1, 2, 3, 3, 4, 0, 0])
    with pytest.raises(ValueError, match="two structures"):
        label_lut({"a": [1, 2], "b": [2]})


def test_ixi_composites_do_not_overlap(ixi_dir):
    structures = muse_structures({"gm": [601], "wm": [604], "ventricles": [509]},
                                 ixi_dir / "labels" / "list_MUSE_mapping_derived.csv")
    label_lut(structures)  # raises on overlap
    assert 4 in structures["ventricles"] and len(structures["gm"]) > 50


def test_dice():
    a = np.array([[1, 1, 0], [2, 2, 0]])
    b = np.array([[1, 0, 0], [2, 2, 2]])
    np.testing.assert_allclose(dice_per_class(a, b, 3), [2 / 3, 0.8, np.nan])


def test_token_box_and_placement():
    class Info:
        resize, input_size, resize_size = "shorter", (160, 160), 183

    top, left, h, w = token_box(Info, 112)
    assert h == w == 98 and top == left == 7
    assert token_box(type("I", (), {"resize": "squash"}), 112) == (0, 0, 112, 112)
    maps = torch.rand(2, 3, 10, 10)
    full = place_in_box(maps, (top, left, h, w), 112)
    assert full.shape == (2, 3, 112, 112) and torch.all(full[:, 0, 0, 0] == 1) and torch.all(full[:, 1:, 0, 0] == 0)


def _blob(shape=(20, 24, 16)):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    seg = np.where(r < 0.4, 2, np.where(r < 0.85, 1, 0)).astype(np.int32)
    data = np.where(r < 0.85, 0.5 + 0.3 * (r < 0.4), 0.0).astype(np.float32)[None]
    return Volume("b", data, np.diag([2.0, 2.0, 2.0, 1.0]), r < 0.9, seg)


def test_reassembly_recovers_labels_on_the_original_grid():
    vol = _blob()
    cfg = SliceConfig(planes=("axial",), stride=1, min_foreground=0.0, size=32)
    ps = slice_volume(vol, cfg)["axial"]
    onehot = torch.nn.functional.one_hot(ps.labels.long(), 3).permute(0, 3, 1, 2).float()
    grid = slices_to_grid(onehot, ps, vol.shape)
    pred = grid.argmax(0).numpy()
    dice = dice_per_class(pred, vol.seg, 2)
    assert np.all(dice > 0.85), dice


def test_simulated_lesions_inside_brain_and_seeded():
    vol = _blob()
    cfg = LesionConfig(n_lesions=(2, 2), radius_mm=(4.0, 6.0), contrast=(0.5, 0.5))
    sick, lesion = simulate_lesions(vol, np.random.default_rng(0), cfg)
    assert lesion.any() and not (lesion & (vol.seg == 0)).any()
    changed = np.abs(sick.data - vol.data)[0] > 1e-6
    assert changed.any() and not (changed & (vol.seg == 0)).any()
    assert np.abs(sick.data - vol.data)[0][lesion].mean() > 0.1
    again, lesion2 = simulate_lesions(vol, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(again.data, sick.data)
    assert sick.data.min() >= 0 and sick.data.max() <= 1
    assert vol.data.max() == pytest.approx(0.8)  # the input is not modified
