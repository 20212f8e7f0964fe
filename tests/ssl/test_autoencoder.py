import pytest
import torch

from slice2vol.ssl import build_method
from slice2vol.ssl.losses import reconstruction_loss
from tests.ssl.conftest import fit_fixed_batch, tiny_config


@pytest.mark.parametrize("dims", [3, 2])
def test_autoencoder_fits_fixed_batch(dims, bank, tmp_path):
    before, after, result = fit_fixed_batch(tiny_config("autoencoder", dims), bank, tmp_path)
    assert after < 0.6 * before, (before, after)
    assert result.step == 8


def test_reconstruction_shape_and_loss_reference():
    cfg = tiny_config("autoencoder", 3)
    model = build_method(cfg)
    x = torch.rand(2, 1, 24, 24, 24)
    assert model.reconstruct(x).shape == x.shape
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])
    assert reconstruction_loss(pred, target).item() == pytest.approx((1 + 4 + 0 + 1) / 4)
    assert reconstruction_loss(pred, target, "l1").item() == pytest.approx(1.0)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert reconstruction_loss(pred, target, weight=w).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(pred, target[..., :1])
