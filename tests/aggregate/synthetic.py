"""Seeded synthetic bags with a known, slice-local signal (shared by the aggregation tests)."""

from __future__ import annotations

import numpy as np

from slice2vol.aggregate import PlaneBag

PLANE_SIZES = {"axial": 24, "coronal": 28, "sagittal": 22}


def witness_bags(n: int = 60, dim: int = 8, amplitude: float = 4.0, n_witness: int = 3,
                 seed: int = 0, planes=("axial", "coronal", "sagittal"), signal_plane: str = "axial"):
    """Class 1 has ``n_witness`` slices of ``signal_plane`` (always near +20 mm) shifted by
    ``amplitude`` along feature 0; class 0 spreads the same total shift over all its slices.

    The mean of every feature is equal between classes, so mean pooling sees nothing, while an
    aggregator that finds the witness slices separates the classes.

    Returns:
        (bags, y (n,) int, witness: list of (S,) bool masks of the signal plane).
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    rng.shuffle(y)
    bags, witness = [], []
    for label in y:
        bag = {}
        for plane in planes:
            size = PLANE_SIZES[plane] + int(rng.integers(-3, 4))
            feats = rng.normal(0, 1, (size, dim)).astype(np.float32)
            indices = np.arange(size) * 2 + 5
            positions = np.zeros((size, 3))
            positions[:, {"sagittal": 0, "coronal": 1, "axial": 2}[plane]] = indices * 2.0 - 50
            if plane == signal_plane:
                coord = positions[:, 2 if plane == "axial" else 0] - positions.mean(0)[2 if plane == "axial" else 0]
                hit = np.zeros(size, bool)
                hit[np.argsort(np.abs(coord - 20.0))[:n_witness]] = True
                if label == 1:
                    feats[hit, 0] += amplitude
                else:
                    feats[:, 0] += amplitude * n_witness / size
                witness.append(hit)
            bag[plane] = PlaneBag(feats, positions=positions, indices=indices)
        bags.append(bag)
    return bags, y, witness


class FakeStore:
    """In-memory stand-in with the FeatureStore API the aggregation code uses."""

    def __init__(self, ids, bags, labels=None, label_types=None, path=None):
        import pandas as pd

        self._ids = list(ids)
        self._bags = dict(zip(ids, bags))
        self.planes = [p for p in ("axial", "coronal", "sagittal") if p in bags[0]]
        self._labels = labels if labels is not None else pd.DataFrame(index=pd.Index(self._ids, name="subject_id"))
        self.label_types = label_types or {}
        self.feature_set = "fake123"
        self.provenance = {"encoder": "fake"}
        self.path = path
        self.written = {}
        self.reads = []  # (subject, plane) of every features read

    def subjects(self):
        return list(self._ids)

    def slice_features(self, subject, plane):
        self.reads.append((subject, plane))
        return self._bags[subject][plane].features

    def slice_meta(self, subject, plane):
        pb = self._bags[subject][plane]
        return {"indices": pb.indices, "positions": pb.positions}

    def slice_tokens(self, subject, plane):
        pb = self._bags[subject][plane]
        if pb.tokens is None:
            raise KeyError("no tokens cached")
        return pb.tokens, pb.token_grid

    def labels(self):
        return self._labels

    def write_volume_embeddings(self, name, ids, X, provenance):
        self.written[name] = (list(ids), np.asarray(X), dict(provenance))

    def volume_embeddings(self, name, *, check_fresh=True):  # the fake's rows never change: always fresh
        return self.written[name]

    def volume_embedding_names(self):
        return sorted(self.written)


def fake_store(n=40, seed=0, tmp_path=None, **kwargs):
    """FakeStore over :func:`witness_bags`, labels ``group`` (categorical) and ``score`` (continuous)."""
    import pandas as pd

    bags, y, _ = witness_bags(n, seed=seed, **kwargs)
    ids = [f"sub-{i:03d}" for i in range(n)]
    rng = np.random.default_rng(seed)
    labels = pd.DataFrame({"group": np.where(y == 1, "B", "A"), "score": y * 2.0 + rng.normal(0, 0.1, n)},
                          index=pd.Index(ids, name="subject_id"))
    path = None if tmp_path is None else tmp_path / "features.h5"
    return FakeStore(ids, bags, labels, {"group": "categorical", "score": "continuous"}, path=path), y
