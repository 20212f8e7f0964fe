"""Parameter-free pooling and concat fusion against hand-computed references."""

import numpy as np
import pytest
import torch

from slice2vol.aggregate import build_aggregator
from slice2vol.aggregate.trainer import PaddedPlane, Standardizer


@pytest.fixture
def bags():
    rng = np.random.default_rng(0)
    return [{"axial": rng.random((s, 3)).astype(np.float32), "coronal": rng.random((s + 2, 3)).astype(np.float32)}
            for s in (4, 7)]


@pytest.mark.parametrize(
    "method, params, reference",
    [
        ("mean", {}, lambda x: x.mean(0)),
        ("max", {}, lambda x: x.max(0)),
        ("gem", {"p": 3.0}, lambda x: np.cbrt((x.astype(np.float64) ** 3).mean(0))),
        ("gem", {"p": 1.0}, lambda x: x.mean(0)),
    ],
)
def test_pooling_pools_all_slices_of_the_planes(bags, method, params, reference):
    X = build_aggregator(method, **params).transform(bags)  # no fit needed
    expected = np.stack([reference(np.concatenate([b["axial"], b["coronal"]])) for b in bags])
    assert X.shape == (2, 3) and X.dtype == np.float32
    np.testing.assert_allclose(X, expected, rtol=1e-5)
    X_axial = build_aggregator(method, planes=["axial"], **params).transform(bags)
    np.testing.assert_allclose(X_axial, np.stack([reference(b["axial"]) for b in bags]), rtol=1e-5)


def test_gem_clamps_negatives_and_approaches_max():
    x = np.array([[-1.0, 0.5], [2.0, 0.25]], np.float32)
    out = build_aggregator("gem", p=50.0).transform([{"axial": x}])[0]
    assert out[0] == pytest.approx(2.0 * 0.5 ** (1 / 50), rel=1e-4)  # clamp(-1) ~ 0
    with pytest.raises(ValueError, match="p must be > 0"):
        build_aggregator("gem", p=0)


def test_concat_fusion_is_per_plane_pooling_in_canonical_order(bags):
    fusion = build_aggregator("fusion", base="max", mode="concat").fit(bags)
    X = fusion.transform(bags)
    expected = np.stack([np.concatenate([b["axial"].max(0), b["coronal"].max(0)]) for b in bags])
    np.testing.assert_allclose(X, expected)


@pytest.mark.parametrize("kind", ["mean", "max", "gem"])
def test_torch_twin_matches_numpy_on_padded_batches(bags, kind):
    """MaskedPool (the branch of trainable fusion) == numpy pooling, padding ignored."""
    agg = build_aggregator(kind)
    rows = np.concatenate([b["axial"] for b in bags])
    scaler = Standardizer(rows)
    module = agg._build_module(3, ["axial"], scaler=scaler)
    length = max(len(b["axial"]) for b in bags)
    feats = torch.full((2, length, 3), 99.0)  # garbage in the padding must not matter
    mask = torch.zeros(2, length, dtype=torch.bool)
    for i, b in enumerate(bags):
        feats[i, : len(b["axial"])] = torch.from_numpy(scaler(b["axial"]))
        mask[i, : len(b["axial"])] = True
    out, _ = module({"axial": PaddedPlane(feats, mask, torch.zeros(2, length))})
    expected = scaler(agg.transform([{"axial": b["axial"]} for b in bags]))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
