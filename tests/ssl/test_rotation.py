import pytest
import torch

from slice2vol.ssl.rotation import rotate, rotation_classes
from tests.ssl.conftest import fit_fixed_batch, tiny_config


@pytest.mark.parametrize("dims,n", [(2, 4), (3, 10)])
def test_rotation_classes_are_distinct_rotations(dims, n):
    classes = rotation_classes(dims)
    assert len(classes) == n
    x = torch.randn(1, *(5,) * dims)
    outs = [rotate(x, k, plane) for k, plane in classes]
    assert torch.equal(outs[0], x)
    assert all(o.shape == x.shape for o in outs)
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.equal(outs[i], outs[j]), (classes[i], classes[j])


def test_rotate_matches_hand_case():
    x = torch.tensor([[[1, 2], [3, 4]]])
    assert rotate(x, 1, (0, 1)).tolist() == [[[2, 4], [1, 3]]]


@pytest.mark.parametrize("dims", [3, 2])
def test_rotation_fits_fixed_batch(dims, bank, tmp_path):
    before, after, result = fit_fixed_batch(tiny_config("rotation", dims), bank, tmp_path)
    assert after < before - 0.5, (before, after)
    assert "acc" in result.history[-1]


def test_rotation_refuses_non_cubic_crops():
    from slice2vol.config import from_dict
    from slice2vol.ssl import SSLConfig, build_method

    cfg = from_dict(SSLConfig, {"method": "rotation", "data": {"crop_size": [32, 32, 16]}})
    with pytest.raises(ValueError, match="cubic"):
        build_method(cfg)
