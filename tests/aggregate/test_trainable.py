"""Trainable aggregators: the known-signal test, shapes, determinism, batch independence, errors."""

import numpy as np
import pytest

from slice2vol.aggregate import BagError, PlaneBag, build_aggregator, cross_validate_aggregator
from tests.aggregate.synthetic import witness_bags

FAST = dict(epochs=40, lr=1e-2, dropout=0.0, seed=0)
TRAINABLE = [
    ("mil", dict(hidden=16, attn_dim=16)),
    ("mil", dict(hidden=16, attn_dim=16, gated=False)),
    ("transformer", dict(d_model=16, heads=2, depth=1)),
    ("head3d", dict(channels=8, depth=1)),
    ("fusion", dict(base="mil", mode="attention", base_params=dict(hidden=16, attn_dim=8))),
    ("fusion", dict(base="gem", mode="attention")),
    ("fusion", dict(base="transformer", mode="concat", base_params=dict(d_model=8, heads=2, depth=1))),
]


@pytest.fixture(scope="module")
def data():
    return witness_bags(80, dim=8, seed=1)


def test_attention_mil_finds_the_witness_slices_and_beats_mean_pooling():
    """Class 1 differs only in 3 axial slices; the class means of every feature are equal."""
    bags, y, witness = witness_bags(72, dim=8, amplitude=6.0, seed=0)
    mean_cv = cross_validate_aggregator(bags, y, "mean", folds=3, seed=0)
    fast = {k: v for k, v in FAST.items() if k not in ("seed", "epochs")}
    # a narrow slice embedding (hidden=16) memorises noise instead; 64 finds the witnesses
    mil_cv = cross_validate_aggregator(bags, y, "mil", folds=3, seed=0, hidden=64, attn_dim=32, epochs=30, **fast)
    mean_auc, mil_auc = mean_cv.summary()["auc"][0], mil_cv.summary()["auc"][0]
    assert mean_cv.predictor == "probe" and mil_cv.predictor == "head"
    assert mean_auc < 0.7, mean_auc  # nothing to see in the mean
    assert mil_auc > 0.9, mil_auc
    train, test = np.arange(48), np.arange(48, 72)
    mil = build_aggregator("mil", hidden=64, attn_dim=32, **FAST).fit([bags[i] for i in train], y[train])
    attention = mil.attention([bags[i] for i in test])
    for a, i in zip(attention, test):
        assert set(a) == {"axial", "coronal", "sagittal"}
        assert sum(w.sum() for w in a.values()) == pytest.approx(1.0, abs=1e-5)
        assert len(a["axial"]) == len(bags[i]["axial"])
    mass = [a["axial"][witness[i]].sum() for a, i in zip(attention, test) if y[i] == 1]
    uniform = 3 / np.mean([sum(len(pb) for pb in bags[i].values()) for i in test])
    assert np.mean(mass) > 0.5 > 10 * uniform, (np.mean(mass), uniform)


@pytest.mark.parametrize("method, params", TRAINABLE, ids=lambda v: str(v)[:40])
def test_trainable_fit_transform_predict(data, method, params):
    bags, y, _ = data
    train, test = [bags[i] for i in range(60)], [bags[i] for i in range(60, 80)]
    fast = {**FAST, "epochs": 15}
    agg = build_aggregator(method, **params, **fast)
    with pytest.raises(RuntimeError, match="not fitted"):
        agg.transform(test)
    agg.fit(train, y[:60])
    assert agg.requires_fit and agg.objective_ == "supervised" and agg.task_ == "classification"
    assert agg.history_[-1] < agg.history_[0]
    X = agg.transform(test)
    assert X.shape == (20, agg.out_dim_) and X.dtype == np.float32 and np.isfinite(X).all()
    proba = agg.predict_proba(test)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert set(agg.predict(test)) <= {0, 1}
    # a subject's embedding does not depend on the other subjects in its batch (padding/masks)
    np.testing.assert_allclose(agg.transform(test[3:4]), X[3:4], rtol=1e-4, atol=1e-5)
    # same seed, same model
    again = build_aggregator(method, **params, **fast).fit(train, y[:60])
    np.testing.assert_allclose(again.transform(test), X, rtol=1e-4, atol=1e-5)
    if agg.has_attention:
        att = agg.attention(test)
        assert len(att) == 20 and all(np.isfinite(w).all() for a in att for w in a.values())


def test_regression_head_is_in_target_units(data):
    bags, y, _ = data
    target = 50.0 + 10.0 * y + np.random.default_rng(0).normal(0, 1, len(y))
    agg = build_aggregator("mil", hidden=16, attn_dim=16, task="regression", **FAST).fit(bags[:60], target[:60])
    pred = agg.predict(bags[60:])
    assert agg.task_ == "regression" and pred.shape == (20,)
    assert np.abs(pred - target[60:]).mean() < 5.0  # predicting the mean would give ~5
    with pytest.raises(RuntimeError, match="only defined for classification"):
        agg.predict_proba(bags[60:])


@pytest.mark.parametrize("views", ["subsets", "planes"])
def test_label_free_contrastive_objective(data, views):
    bags, _, _ = data
    agg = build_aggregator("mil", hidden=16, attn_dim=8, views=views, epochs=15, lr=1e-2, dropout=0.0)
    agg.fit(bags[:40])  # no labels -> contrastive
    assert agg.objective_ == "contrastive" and agg.history_[-1] < agg.history_[0]
    assert agg.transform(bags[40:]).shape == (40, 16)
    with pytest.raises(RuntimeError, match="without labels"):
        agg.predict(bags[40:])


@pytest.mark.parametrize(
    "method, params, fit_kwargs, error, match",
    [
        ("mil", {}, {"y": np.zeros(3)}, ValueError, r"shape \(80,\)"),
        ("mil", {"objective": "supervised"}, {}, ValueError, "needs labels"),
        ("mil", {}, {"y": np.zeros(80, int)}, ValueError, ">= 2 classes"),
        ("mil", {"task": "regression"}, {"y": np.full(80, np.nan)}, ValueError, "missing"),
        ("fusion", {"base": "mil", "views": "planes"}, {}, ValueError, "views='planes'"),
        ("mil", {"views": "slices"}, {}, ValueError, "views must be"),
        ("transformer", {"d_model": 10, "heads": 4}, None, ValueError, "divisible"),
        ("fusion", {"mode": "sum"}, None, ValueError, "mode must be"),
    ],
)
def test_trainable_errors(data, method, params, fit_kwargs, error, match):
    bags, _, _ = data
    with pytest.raises(error, match=match):
        agg = build_aggregator(method, epochs=1, **params)
        agg.fit(bags, **fit_kwargs)


def test_feature_dimension_must_match_the_fit(data):
    bags, y, _ = data
    agg = build_aggregator("mil", hidden=8, epochs=1).fit(bags[:10], y[:10])
    with pytest.raises(BagError, match="differs from the fitted"):
        agg.transform([{p: np.ones((4, 5)) for p in bags[0]}])


def test_head3d_reads_tokens_when_every_bag_has_them():
    rng = np.random.default_rng(0)
    y = np.arange(16) % 2
    bags = []
    for label in y:
        tokens = rng.normal(0, 1, (6, 4, 3)).astype(np.float32)
        tokens[2:4, :, 0] += 3.0 * label  # signal in the tokens only
        bags.append({"axial": PlaneBag(tokens.mean(1) * 0, tokens=tokens, token_grid=(2, 2))})
    agg = build_aggregator("head3d", channels=8, depth=1, **FAST).fit(bags, y)
    assert agg.uses_tokens_ and agg.module_.reduce.in_channels == 3
    assert (agg.predict(bags) == y).mean() == 1.0


@pytest.mark.parametrize("num_threads", [1, None])
def test_thread_setting_is_scoped_and_results_do_not_depend_on_it(data, num_threads):
    """Fitting and embedding run with ``num_threads`` torch threads and restore the process setting."""
    import torch

    bags, y, _ = data
    before = torch.get_num_threads()
    seen = []
    agg = build_aggregator("mil", hidden=8, epochs=2, num_threads=num_threads).fit(bags[:12], y[:12])
    assert torch.get_num_threads() == before
    agg.module_.pool.register_forward_hook(lambda m, i, o: seen.append(torch.get_num_threads()))
    x = agg.transform(bags[12:16])
    assert torch.get_num_threads() == before and seen
    assert set(seen) == ({1} if num_threads == 1 else {before})
    ref = build_aggregator("mil", hidden=8, epochs=2, num_threads=None).fit(bags[:12], y[:12]).transform(bags[12:16])
    np.testing.assert_allclose(x, ref, atol=1e-5)


def plane_signal_bags(n: int, signal_plane: str, dim: int = 4, amplitude: float = 2.0, seed: int = 0):
    """Three planes of noise slices; only ``signal_plane`` carries the label (feature 0 shifted by
    +-amplitude on all its slices), so a plane-attention fusion should learn to attend to it."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    rng.shuffle(y)
    bags = []
    for label in y:
        bag = {}
        for plane, size in (("axial", 12), ("coronal", 14), ("sagittal", 10)):
            feats = rng.normal(0, 1, (size, dim)).astype(np.float32)
            if plane == signal_plane:
                feats[:, 0] += amplitude * (2 * label - 1)
            bag[plane] = PlaneBag(feats, indices=np.arange(size))
        bags.append(bag)
    return bags, y


@pytest.mark.parametrize("signal_plane", ["axial", "coronal", "sagittal"])
def test_plane_attention_attends_to_the_plane_that_carries_the_label(signal_plane):
    """A uniform mean over the planes (1/3 each) passed every other test. Margins over seeds 0..4 of
    data and model were all > 0.75; the bounds below leave room for that spread."""
    bags, y = plane_signal_bags(48, signal_plane)
    fusion = build_aggregator("fusion", base="mean", mode="attention", attn_dim=8, epochs=25, lr=3e-2,
                              dropout=0.0, seed=0).fit(bags[:32], y[:32])
    weights = np.mean([a["planes"] for a in fusion.attention(bags[32:])], 0)  # (3,) over the held-out subjects
    assert fusion.planes_ == ["axial", "coronal", "sagittal"] and weights.sum() == pytest.approx(1.0, abs=1e-5)
    k = fusion.planes_.index(signal_plane)
    assert weights[k] > 0.6 and weights[k] - np.delete(weights, k).max() > 0.4, weights


@pytest.mark.parametrize("name, params", [("mil", dict(hidden=8, attn_dim=8)), ("head3d", dict(channels=4, depth=1)),
                                          ("fusion", dict(base="mil", mode="attention",
                                                          base_params=dict(hidden=8, attn_dim=8)))])
def test_trainable_aggregators_see_features_of_random_init_scale(name, params):
    """Fuzz round 16: random-init MobileNetV2 features (~1e-8) fell under the standardiser's absolute
    1e-6 floor, so every dimension was 'constant' and mil gave every subject the same vector (spread
    5e-7 of its size). Standardising is scale-free now: the features times 1e-8 train the same model."""
    import dataclasses

    bags, y, _ = witness_bags(16, dim=6, seed=3)
    tiny = [{p: dataclasses.replace(b, features=(b.features * 1e-8).astype(np.float32)) for p, b in bag.items()}
            for bag in bags]
    fast = dict(FAST, epochs=3)
    X = build_aggregator(name, **params, **fast).fit(bags, y).transform(bags)
    X_tiny = build_aggregator(name, **params, **fast).fit(tiny, y).transform(tiny)
    spread = np.abs(X_tiny - X_tiny.mean(0)).max() / max(np.abs(X_tiny).max(), 1e-30)
    assert spread > 1e-2, spread  # distinct subjects, not one vector
    np.testing.assert_allclose(X_tiny, X, rtol=1e-3, atol=1e-3 * np.abs(X).max())


def test_sinusoidal_encoding_against_hand_computed_values():
    """dim 6: three frequencies from 1 (period 2*pi mm) down to 2*pi / max_period; sines, then cosines."""
    import math

    import torch

    from slice2vol.aggregate.transformer import sinusoidal_encoding

    coords = torch.tensor([0.0, 3.0])
    enc = sinusoidal_encoding(coords, 6, max_period=1000.0)
    freqs = [math.exp(-math.log(1000.0 / (2 * math.pi)) * i / 2) for i in range(3)]
    expected = [[math.sin(c * f) for f in freqs] + [math.cos(c * f) for f in freqs] for c in (0.0, 3.0)]
    torch.testing.assert_close(enc, torch.tensor(expected))
    assert freqs[0] == 1.0 and math.isclose(2 * math.pi / freqs[-1], 1000.0)
    assert sinusoidal_encoding(coords, 7).shape == (2, 7) and bool((sinusoidal_encoding(coords, 7)[:, -1] == 0).all())


def test_slice_transformer_attention_is_a_distribution_over_real_slices_and_position_matters():
    """The exposed CLS attention sums to 1 over each bag's real slices (padding gets none), and moving
    one slice along its axis changes the embedding (the position encoding reaches the tokens)."""
    import torch

    from slice2vol.aggregate.trainer import PaddedPlane
    from slice2vol.aggregate.transformer import SliceTransformerModule

    torch.manual_seed(0)
    module = SliceTransformerModule(in_dim=8, d_model=16, depth=2, heads=2, dropout=0.0).eval()
    feats = {p: torch.randn(2, 5, 8) for p in ("axial", "coronal")}
    masks = {"axial": torch.tensor([[True] * 5, [True] * 3 + [False] * 2]), "coronal": torch.ones(2, 5, dtype=torch.bool)}
    coords = {p: torch.arange(5.0).repeat(2, 1) * 4 - 8 for p in feats}
    batch = {p: PaddedPlane(feats[p] * masks[p][..., None], masks[p], coords[p]) for p in feats}
    with torch.no_grad():
        emb, attention = module(batch)
        total = sum(a.sum(1) for a in attention.values())
        torch.testing.assert_close(total, torch.ones(2))
        assert bool((attention["axial"][1, 3:] == 0).all())
        moved = dict(batch)
        shifted = coords["axial"].clone()
        shifted[:, 0] += 30.0
        moved["axial"] = PaddedPlane(batch["axial"].features, masks["axial"], shifted)
        assert not torch.allclose(module(moved)[0], emb, atol=1e-4)


def test_head3d_is_the_masked_mean_over_slices_and_patches_averaged_over_planes():
    """Without residual blocks the head is gelu(1x1x1 conv) averaged over real slices and every token
    of their grids (by hand from the conv's weights), then over planes."""
    import torch
    import torch.nn.functional as F

    from slice2vol.aggregate.head3d import Head3DModule
    from slice2vol.aggregate.trainer import PaddedPlane

    torch.manual_seed(0)
    head = Head3DModule(in_dim=4, channels=3, depth=0, dropout=0.0).eval()
    w, b = head.reduce.weight[:, :, 0, 0, 0], head.reduce.bias

    def plane(s, real, grid):
        tokens = torch.randn(2, s, grid[0] * grid[1], 4)
        mask = torch.arange(s)[None, :] < torch.tensor(real)[:, None]
        return PaddedPlane(torch.zeros(2, s, 4), mask, torch.zeros(2, s), tokens * mask[..., None, None], grid)

    def by_hand(pp):
        out = F.gelu(pp.tokens @ w.T + b)  # (B, S, T, C)
        return torch.stack([out[i, pp.mask[i]].mean((0, 1)) for i in range(len(out))])

    axial, coronal = plane(5, [5, 3], (2, 3)), plane(4, [2, 4], (2, 2))
    with torch.no_grad():
        torch.testing.assert_close(head({"axial": axial})[0], by_hand(axial))
        both = head({"axial": axial, "coronal": coronal})[0]
        torch.testing.assert_close(both, (by_hand(axial) + by_hand(coronal)) / 2)
