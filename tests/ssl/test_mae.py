import pytest
import torch

from slice2vol.ssl import build_method
from slice2vol.ssl.losses import masked_reconstruction_loss, patchify
from tests.ssl.conftest import fit_fixed_batch, tiny_config


def test_patchify_matches_conv_patch_embedding_order():
    # a conv with a one-hot kernel per voxel reads patches in the same order as patchify
    x = torch.arange(2 * 1 * 4 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 8, 8)
    conv = torch.nn.Conv3d(1, 8, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(8).view(8, 1, 2, 2, 2))
    ref = conv(x).flatten(2).transpose(1, 2)
    assert torch.equal(p, ref)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 5, 4), 2)


def test_masked_loss_ignores_visible_patches():
    pred, target = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    target[0, 0] = 100.0  # visible patch with a huge error must not count
    mask = torch.tensor([[0, 1, 1]])
    assert masked_reconstruction_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(1.0)


@pytest.mark.parametrize("dims", [3, 2])
def test_mae_fits_fixed_batch(dims, bank, tmp_path):
    before, after, _ = fit_fixed_batch(tiny_config("mae", dims), bank, tmp_path)
    assert after < 0.8 * before, (before, after)


def test_mae_encoder_uses_all_patches():
    model = build_method(tiny_config("mae", 3))
    enc = model.encoder
    assert enc.embed_dim == 48 and enc.fixed_size == (24, 24, 24)
    assert enc.feature_map(torch.rand(2, 1, 24, 24, 24)).shape == (2, 48, 3, 3, 3)
    # the encoder shares the MAE parameters (trained weights are the exported ones)
    assert enc.patch_embedding is model.mae.patch_embedding


def test_norm_pix_loss_normalises_each_target_patch_by_its_own_mean_and_sd():
    """MAE's norm_pix_loss: (target - patch mean) / sqrt(patch variance + 1e-6), by hand in numpy."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 8, generator=g), 3 + 2 * torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]])
    t = target.numpy().astype(np.float64)
    z = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    per_patch = ((pred.numpy() - z) ** 2).mean(-1)
    expected = (per_patch * mask.numpy()).sum() / mask.sum().item()
    assert masked_reconstruction_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(expected, rel=1e-5)


def test_the_mae_step_scores_only_the_patches_the_encoder_did_not_see():
    """The step's loss, recomputed from the network's own prediction and mask (captured by a hook):
    the error of the hidden patches only, never of the visible ones."""
    model = build_method(tiny_config("mae", 3))
    seen = {}
    model.mae.register_forward_hook(lambda module, inputs, output: seen.update(pred=output[0], mask=output[1]))
    batch = torch.rand(2, 1, 24, 24, 24)
    torch.manual_seed(0)
    loss, _ = model.training_step(batch)
    pred, mask = seen["pred"].detach(), seen["mask"]
    assert 0 < mask.float().mean() < 1  # some patches visible, some hidden
    target = patchify(batch, model.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    hidden = per_patch[mask.bool()].mean()
    visible = per_patch[~mask.bool()].mean()
    assert loss.item() == pytest.approx(hidden.item(), rel=1e-5) and abs(hidden - visible) > 1e-4
