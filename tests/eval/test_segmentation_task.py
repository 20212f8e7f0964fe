"""Dense linear probe on patch tokens: token-encoded classes are segmented, shuffled labels are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.eval.segmentation import DenseLinearProbe, dice_per_class


def _token_data(n_slices, rng, shuffle=False):
    """4x4 token grid over 16x16 label maps: each token's features encode its class."""
    k, d = 3, 12
    coarse = rng.integers(0, k + 1, (n_slices, 4, 4))
    labels = torch.as_tensor(np.kron(coarse, np.ones((4, 4), dtype=int)))
    feats = np.eye(k + 1)[coarse] @ rng.normal(size=(k + 1, d)) * 2 + rng.normal(size=(n_slices, 4, 4, d)) * 0.5
    tokens = torch.as_tensor(feats.reshape(n_slices, 16, d), dtype=torch.float32)
    if shuffle:
        labels = labels[torch.as_tensor(rng.permutation(n_slices))]
    return tokens, labels


@pytest.mark.parametrize("shuffle", [False, True])
def test_dense_probe_signal_and_chance(shuffle):
    rng = np.random.default_rng(0)
    tokens, labels = _token_data(120, rng, shuffle)
    probe = DenseLinearProbe(3, epochs=30, lr=0.05, seed=0).fit(tokens[:80], (4, 4), labels[:80])
    assert probe.losses_[-1] < probe.losses_[0]
    pred = probe.predict_proba(tokens[80:], (4, 4), (16, 16)).argmax(1).numpy()
    assert pred.shape == (40, 16, 16)
    dice = dice_per_class(pred, labels[80:].numpy(), 3)
    if shuffle:
        assert np.nanmean(dice) < 0.4  # four equiprobable classes: chance Dice ~0.25
    else:
        assert np.nanmean(dice) > 0.85


def test_dense_probe_tiny_scale_tokens():
    rng = np.random.default_rng(1)
    tokens, labels = _token_data(60, rng)
    probe = DenseLinearProbe(3, epochs=15, lr=0.05, seed=0).fit(tokens[:40] * 1e-9, (4, 4), labels[:40])
    pred = probe.predict_proba(tokens[40:] * 1e-9, (4, 4), (16, 16)).argmax(1).numpy()
    assert np.nanmean(dice_per_class(pred, labels[40:].numpy(), 3)) > 0.8
