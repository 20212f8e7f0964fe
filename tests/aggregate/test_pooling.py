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


# GeM on a hand-computed bag: x = [[1, 4], [2, -1]] times `scale`, p = 2. The clamp floor is
# eps * min(1, max|x|), so the -1 contributes ~0: (sqrt((1 + 4) / 2), sqrt((16 + 0) / 2)) * scale.
# At scale 1e-8 (random-init BatchNorm nets) a fixed eps = 1e-6 gave (1e-6, 1e-6) for every subject.
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-8, 1e-20])
@pytest.mark.parametrize("p, expected", [
    (2.0, [np.sqrt(2.5), np.sqrt(8.0)]),
    (1.0, [1.5, 2.0]),
    (1e6, [2.0, 4.0]),  # p -> inf is max; it underflowed to 0 (p=100 at scale 1e-8 too)
    (100.0, [2.0 * 0.5 ** (1 / 100) * (1 + 0.5 ** 100) ** (1 / 100), 4.0 * 0.5 ** (1 / 100)]),
])
def test_gem_matches_the_hand_computed_reference_at_every_feature_scale(scale, p, expected):
    x = np.array([[1.0, 4.0], [2.0, -1.0]]) * scale
    out = build_aggregator("gem", p=p).transform([{"axial": x.astype(np.float32)}])[0]
    np.testing.assert_allclose(out, np.array(expected) * scale, rtol=2e-5)


def test_gem_is_the_standard_gem_for_features_of_normal_scale():
    """Radenović et al.: (mean(clamp(x, eps)^p))^(1/p), negatives clamped at eps itself."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 1.0, (9, 6))  # max |x| > 1: floor = eps
    for p, eps in ((3.0, 1e-6), (2.0, 0.1), (7.5, 1e-3)):
        reference = np.power(np.power(np.clip(x, eps, None), p).mean(0), 1.0 / p)
        out = build_aggregator("gem", p=p, eps=eps).transform([{"axial": x.astype(np.float32)}])[0]
        np.testing.assert_allclose(out, reference, rtol=1e-5)


def test_gem_keeps_subjects_apart_when_features_are_tiny():
    rng = np.random.default_rng(1)
    bags = [{"axial": (rng.random((5, 4)) * 1e-8).astype(np.float32)} for _ in range(4)]
    for p in (3.0, 100.0):
        X = build_aggregator("gem", p=p).transform(bags)
        assert len(np.unique(X, axis=0)) == 4 and X.max() < 1e-8
        scaled = build_aggregator("gem", p=p).transform([{"axial": b["axial"] * 1e8} for b in bags])
        np.testing.assert_allclose(X * 1e8, scaled, rtol=1e-4)


@pytest.mark.parametrize("p", [0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_gem_refuses_an_exponent_that_is_not_finite_and_positive(p):
    with pytest.raises(ValueError, match="GeM exponent p must be > 0 and finite"):
        build_aggregator("gem", p=p)


@pytest.mark.parametrize("scale, p", [(1.0, 3.0), (1e-8, 3.0), (1e-8, 100.0), (1.0, 0.5)])
def test_torch_gem_matches_numpy_at_every_scale(scale, p):
    from slice2vol.aggregate.pooling import MaskedPool

    rng = np.random.default_rng(2)
    bags = [rng.normal(0.3, 1.0, (s, 3)) * scale for s in (4, 6)]
    feats = torch.full((2, 6, 3), 99.0, dtype=torch.float32)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for i, b in enumerate(bags):
        feats[i, : len(b)] = torch.from_numpy(b.astype(np.float32))
        mask[i, : len(b)] = True
    module = MaskedPool("gem", 3, p=p)
    out, _ = module({"axial": PaddedPlane(feats, mask, torch.zeros(2, 6))})
    expected = build_aggregator("gem", p=p).transform([{"axial": b.astype(np.float32)} for b in bags])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4)
    feats.requires_grad_(True)
    module({"axial": PaddedPlane(feats, mask, torch.zeros(2, 6))})[0].sum().backward()
    assert torch.isfinite(feats.grad).all()
    zeros = torch.zeros(1, 3, 2, requires_grad=True)  # an all-zero bag pools to 0 with a finite gradient
    out, _ = module({"axial": PaddedPlane(zeros, torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3))})
    out.sum().backward()
    assert (out == 0).all() and torch.isfinite(zeros.grad).all()
