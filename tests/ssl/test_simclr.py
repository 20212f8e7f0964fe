import pytest
import torch
import torch.nn.functional as F

from slice2vol.ssl import build_method
from slice2vol.ssl.augment import MRIAugment
from slice2vol.ssl.data import make_dataset
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


def test_subject_positives_pair_two_crops_of_one_subject(bank, tmp_path):
    """crops_per_subject=2 puts two different crops of one subject next to each other, and SimCLR with
    positives=subject contrasts exactly those pairs."""
    from slice2vol.ssl.streaming import SeededSamples

    cfg = tiny_config("simclr", 3, batch_size=4)
    cfg.data.crops_per_subject = 2
    cfg.method_params = {"positives": "subject", "proj_hidden": 32, "proj_dim": 16}
    dataset = make_dataset(bank, 3, cfg.data)
    keyed = SeededSamples(dataset, seed=0)
    subjects = [keyed.subject_of(g) for g in range(2 * len(bank))]
    assert subjects[0::2] == subjects[1::2] and sorted(subjects[0::2]) == list(range(len(bank)))
    assert not torch.equal(keyed[0], keyed[1])  # two crops, not one crop twice
    batch = torch.stack([keyed[g] for g in range(4)])
    model = build_method(cfg)
    loss, extra = model.training_step(batch)
    assert torch.isfinite(loss) and 0 <= extra["view_acc"] <= 1
    with pytest.raises(ValueError, match="consecutive pairs"):
        model.training_step(batch[:3])
    with pytest.raises(ValueError, match="whole number of groups"):
        dataset.sample(3)
    cfg.train.batch_size = 3  # per-rank micro-batches are contiguous: a pair must not straddle two
    with pytest.raises(ValueError, match="crops_per_subject=2"):
        from slice2vol.ssl.trainer import pretrain

        pretrain(cfg, tmp_path / "odd", bank=bank, progress=False, plot=False)
