import pytest
import torch

from slice2vol.ssl.genesis import bezier_intensity, corrupt, in_paint, local_shuffle, out_paint
from tests.ssl.conftest import fit_fixed_batch, tiny_config


def test_bezier_is_monotone_and_keeps_range():
    torch.manual_seed(0)
    x = torch.linspace(0, 1, 101).view(1, 101)
    up, down = bezier_intensity(x, invert=False), bezier_intensity(x, invert=True)
    assert (up.diff() >= -1e-6).all() and (down.diff() <= 1e-6).all()
    assert up.min() >= 0 and up.max() <= 1
    assert up[0, 0].item() == pytest.approx(0, abs=1e-3) and up[0, -1].item() == pytest.approx(1, abs=1e-3)


def test_local_shuffle_permutes_values_inside_boxes():
    torch.manual_seed(0)
    x = torch.rand(1, 16, 16, 16)
    y = local_shuffle(x, n_blocks=20)
    assert not torch.equal(x, y)
    assert torch.equal(x.flatten().sort().values, y.flatten().sort().values)


def test_paintings_touch_the_right_region():
    torch.manual_seed(1)
    x = torch.full((1, 21, 21), 5.0)  # noise is in [0, 1): changed voxels are recognisable
    inp = in_paint(x)
    changed = inp != 5.0
    assert 0 < changed.float().mean() < 0.5  # a few boxes of <= 1/3 side
    outp = out_paint(x)
    kept = outp == 5.0
    assert 0 < kept.float().mean() < 1.0
    assert corrupt(x).shape == x.shape


@pytest.mark.parametrize("dims", [3, 2])
def test_genesis_fits_fixed_batch(dims, bank, tmp_path):
    before, after, _ = fit_fixed_batch(tiny_config("genesis", dims), bank, tmp_path)
    assert after < 0.7 * before, (before, after)
