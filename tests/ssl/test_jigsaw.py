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
