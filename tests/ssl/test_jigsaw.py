import itertools

import numpy as np
import pytest
import torch

from slice2vol.ssl import build_method
from slice2vol.ssl.jigsaw import hamming_permutations
from tests.ssl.conftest import fit_fixed_batch, tiny_config


def test_hamming_permutations_are_distinct_and_spread():
    perms = hamming_permutations(8, 24, seed=0)
    assert perms.shape == (24, 8)
    assert len({tuple(p) for p in perms}) == 24
    assert all(sorted(p) == list(range(8)) for p in perms)
    assert (perms[0] == np.arange(8)).all()
    dists = [(a != b).sum() for a, b in itertools.combinations(perms, 2)]
    assert min(dists) >= 5  # random pairs of 24 permutations of 8 would often be 2-4 apart
    with pytest.raises(ValueError, match="permutations"):
        hamming_permutations(3, 7)


def test_tiles_are_shuffled_by_the_labelled_permutation():
    model = build_method(tiny_config("jigsaw", 2, ))
    x = torch.zeros(1, 1, 32, 32)
    for i, (r, c) in enumerate(itertools.product(range(3), repeat=2)):  # each cell filled with its index
        x[..., r * 10:(r + 1) * 10, c * 10:(c + 1) * 10] = i
    tiles = model.tiles(x)
    assert tiles.shape == (1, 9, 1, 8, 8)  # cells of 10, tiles of floor(10 * 0.875)
    assert [int(t.unique().item()) for t in tiles[0]] == list(range(9))


@pytest.mark.parametrize("dims", [3, 2])
def test_jigsaw_fits_fixed_batch(dims, bank, tmp_path):
    before, after, _ = fit_fixed_batch(tiny_config("jigsaw", dims), bank, tmp_path)
    assert after < before - 0.5, (before, after)


def test_the_step_shows_each_sample_its_own_labelled_permutation(monkeypatch):
    """In training_step itself: position i of sample b shows tile permutations[label_b][i] of sample b."""
    import slice2vol.ssl.jigsaw as jigsaw_module

    model = build_method(tiny_config("jigsaw", 3))
    seen = {}
    real_tiles, real_loss = model.tiles, jigsaw_module.classification_loss
    monkeypatch.setattr(model, "tiles", lambda batch: seen.setdefault("tiles", real_tiles(batch)))
    monkeypatch.setattr(jigsaw_module, "classification_loss",
                        lambda logits, labels: seen.update(labels=labels) or real_loss(logits, labels))
    model.backbone.register_forward_pre_hook(lambda module, args: seen.update(shown=args[0]))
    batch = torch.rand(5, 1, 24, 24, 24)
    torch.manual_seed(1)
    model.training_step(batch)
    tiles, labels = seen["tiles"], seen["labels"].tolist()
    n_tiles = tiles.shape[1]
    shown = seen["shown"].view(5, n_tiles, *tiles.shape[2:])
    assert len(set(labels)) > 1
    for b, label in enumerate(labels):
        order = model.permutations[label].tolist()
        for i in range(n_tiles):
            assert torch.equal(shown[b, i], tiles[b, order[i]]), (b, i)
