import pytest
import torch
import torch.nn.functional as F

from slice2vol.ssl.augment import MRIAugment
from slice2vol.ssl.losses import nt_xent
from tests.ssl.conftest import fit_fixed_batch, tiny_config


def naive_nt_xent(z1, z2, t):
    """Loop over the 2B anchors, as written in the SimCLR paper."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
        total += -torch.log(torch.exp(z[i] @ z[j] / t) / denom)
    return total / n


def test_nt_xent_matches_paper_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(naive_nt_xent(z1, z2, 0.3).item(), rel=1e-5)
    # identical, well separated views -> loss near its minimum
    eye = torch.eye(4) * 10
    assert nt_xent(eye, eye, 0.1).item() < 1e-3


@pytest.mark.parametrize("dims,size", [(3, (32, 32, 32)), (2, (32, 32))])
def test_augment_is_seeded_by_torch_and_keeps_shape(dims, size):
    aug = MRIAugment(dims, size)
    x = torch.rand(3, 1, *size)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a[0], aug(x)[0])  # next draw differs


@pytest.mark.parametrize("dims", [3, 2])
def test_simclr_fits_fixed_batch(dims, bank, tmp_path):
    cfg = tiny_config("simclr", dims)
    before, after, result = fit_fixed_batch(cfg, bank, tmp_path)
    assert after < before - 0.1, (before, after)
    assert "view_acc" in result.history[-1]
