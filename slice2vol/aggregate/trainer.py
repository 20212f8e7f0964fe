"""The shared trainer of every trainable aggregator.

Bags have different numbers of slices, so batches are padded per plane (:class:`PaddedPlane`,
with a mask of real slices). A :class:`TorchAggregator` builds a torch module mapping such a batch
to one embedding per subject and trains it either

* supervised, on a label column of the *training* subjects (classification: cross-entropy,
  regression: MSE on the standardised target), through a linear head; or
* label-free, with a symmetric InfoNCE loss between two views of the same subject: two disjoint
  random halves of its slices (``views="subsets"``) or two different planes (``views="planes"``),
  so label-free volume embeddings exist for k-NN and retrieval.

Inputs are standardised with per-dimension statistics of the training slices only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.aggregate.base import Aggregator, Bag, BagError, check_bags, slice_coordinates
from slice2vol.data.slicing import PLANES


@dataclass
class PaddedPlane:
    """One plane of a batch of bags, padded to the longest bag.

    Attributes:
        features: (B, S, D) standardised slice features, zero where padded.
        mask: (B, S) bool, True for real slices.
        coords: (B, S) slice coordinate along the plane axis (mm, centred per bag).
        tokens: optional (B, S, T, Dt) patch tokens.
        token_grid: (gh, gw) of the tokens.
    """

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    tokens: torch.Tensor | None = None
    token_grid: tuple[int, int] | None = None


Batch = dict  # plane -> PaddedPlane
PLANE_IDS = {p: i for i, p in enumerate(PLANES)}


def union_planes(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Concatenates the planes of a batch along the slice axis.

    Returns:
        features (B, S_tot, D), mask (B, S_tot), coords (B, S_tot), plane ids (B, S_tot) and
        ``[(plane, S_p), ...]`` to split per-slice outputs back with :func:`split_planes`.
    """
    planes = list(batch)
    feats = torch.cat([batch[p].features for p in planes], 1)
    mask = torch.cat([batch[p].mask for p in planes], 1)
    coords = torch.cat([batch[p].coords for p in planes], 1)
    ids = torch.cat([torch.full_like(batch[p].mask, PLANE_IDS[p], dtype=torch.long) for p in planes], 1)
    sizes = [(p, batch[p].mask.shape[1]) for p in planes]
    return feats, mask, coords, ids, sizes


def split_planes(values: torch.Tensor, sizes: list) -> dict[str, torch.Tensor]:
    """(B, S_tot) -> plane -> (B, S_p), inverse of the concatenation in :func:`union_planes`."""
    parts = torch.split(values, [s for _, s in sizes], dim=1)
    return {p: part for (p, _), part in zip(sizes, parts)}


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax over real entries only; padded entries get weight 0."""
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)


class Standardizer:
    """Per-dimension mean/std of training rows.

    A dimension is near-constant when its std is at most 1e-6 of the largest one; it is scaled by that
    largest std (all constant: by 1), the linear probe's rule (:mod:`slice2vol.eval.linear`). The floor
    is relative: an absolute 1e-6 took every dimension of random-init features (std ~1e-8) for
    constant, so trainable aggregators gave every subject the same vector.
    """

    def __init__(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64)
        self.mean = rows.mean(0).astype(np.float32)
        std = rows.std(0)
        top = float(std.max()) if std.size else 0.0
        self.std = np.where(std > 1e-6 * top, std, top if top > 0 else 1.0).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of (B, d) views; other rows are the negatives."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = z1 @ z2.T / temperature
    target = torch.arange(len(z1), device=z1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def resolve_task(y: np.ndarray, task: str = "auto") -> str:
    """``classification`` for non-numeric/bool/few-integer targets, else ``regression``."""
    if task in ("classification", "regression"):
        return task
    if task != "auto":
        raise ValueError(f"task must be auto, classification or regression, got {task!r}")
    if y.dtype.kind in "OUSb":
        return "classification"
    finite = y[np.isfinite(y.astype(float))]
    if np.all(finite == np.round(finite)) and len(np.unique(finite)) <= 10:
        return "classification"
    return "regression"


class TorchAggregator(Aggregator):
    """Base of trainable aggregators: a torch module trained by the shared loop.

    Args:
        planes: planes to use (``None`` = all planes the bags share).
        objective: ``supervised`` (needs ``y``), ``contrastive`` (label-free) or ``auto``
            (supervised when ``y`` is given).
        task: ``classification``, ``regression`` or ``auto`` (from the labels' type).
        views: contrastive views, ``subsets`` (two disjoint halves of the slices) or ``planes``
            (two different planes of the subject).
        epochs, lr, weight_decay, batch_size: optimisation (AdamW, subjects per batch).
        dropout: dropout inside the module (regularises the tiny cohorts of MRI studies).
        temperature: InfoNCE temperature.
        seed: seeds initialisation, shuffling, dropout and views (global RNG state is restored).
        device: torch device for training and inference.
        progress: tqdm bar over epochs.
        num_threads: torch intra-op threads while fitting and embedding (restored afterwards); ``None``
            keeps the process setting. Default 1: these modules are small and batches are a few subjects,
            so more threads cost more in synchronisation than they gain (on the shared, loaded 2-core
            development machine a 15-epoch MIL fit on 38 subjects took 0.8-1.1 s with 1 thread and
            23-33 s with 2, measured interleaved in one process).
    """

    requires_fit = True
    #: the module reads patch tokens when every bag has them
    wants_tokens = False
    #: the module accepts a batch holding any subset of the fitted planes (for views="planes")
    plane_subsets_ok = True

    def __init__(
        self,
        planes: Sequence[str] | None = None,
        objective: str = "auto",
        task: str = "auto",
        views: str = "subsets",
        epochs: int = 60,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 16,
        dropout: float = 0.25,
        temperature: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = False,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(planes)
        self.objective = objective
        self.task = task
        self.views = views
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.dropout = dropout
        self.temperature = temperature
        self.seed = seed
        self.device = device
        self.progress = progress
        self.num_threads = num_threads

    # -- batching ------------------------------------------------------------------------------
    def _collate(self, bags: Sequence[Bag], planes: Sequence[str],
                 select: Sequence[Mapping[str, np.ndarray]] | None = None) -> Batch:
        """Pads bags into a batch; ``select[i][plane]`` optionally picks a subset of slices."""
        device = torch.device(self.device)
        batch: Batch = {}
        for plane in planes:
            feats, coords, toks = [], [], []
            for i, bag in enumerate(bags):
                pb = bag[plane]
                idx = None if select is None else select[i].get(plane)
                f = self.scaler_(pb.features)
                c = slice_coordinates(pb, plane)
                t = self.token_scaler_(pb.tokens) if self.uses_tokens_ else None
                if idx is not None:
                    f, c = f[idx], c[idx]
                    t = None if t is None else t[idx]
                feats.append(f), coords.append(c), toks.append(t)
            length = max(len(f) for f in feats)
            n, dim = len(bags), feats[0].shape[1]
            fb = np.zeros((n, length, dim), np.float32)
            cb = np.zeros((n, length), np.float32)
            mb = np.zeros((n, length), bool)
            for i, (f, c) in enumerate(zip(feats, coords)):
                fb[i, : len(f)], cb[i, : len(c)], mb[i, : len(f)] = f, c, True
            tokens = grid = None
            if self.uses_tokens_:
                t0 = toks[0]
                tb = np.zeros((n, length) + t0.shape[1:], np.float32)
                for i, t in enumerate(toks):
                    tb[i, : len(t)] = t
                tokens = torch.from_numpy(tb).to(device)
                grid = bags[0][plane].token_grid
            batch[plane] = PaddedPlane(torch.from_numpy(fb).to(device), torch.from_numpy(mb).to(device),
                                       torch.from_numpy(cb).to(device), tokens, grid)
        return batch

    def _chunks(self, n: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        return np.array_split(order, max(1, math.ceil(n / max(1, self.batch_size))))

    # -- fit -----------------------------------------------------------------------------------
    def _threads(self):
        """Context manager: ``num_threads`` torch threads inside, the previous setting restored after."""
        from slice2vol.runtime import torch_threads

        return torch_threads(self.num_threads)

    #: parameters that are sizes or counts (>= the bound), and the optimiser's (see _check_params)
    _AT_LEAST = {"hidden": 1, "attn_dim": 1, "d_model": 1, "heads": 1, "layers": 1, "channels": 1, "depth": 0,
                 "epochs": 1, "batch_size": 1}

    def _check_params(self) -> None:
        """Refuses parameters that cannot train (checked at ``fit``, as scikit-learn does): a zero-wide
        layer used to train and fail only when its empty embeddings were written; epochs=0 wrote an
        untrained random projection; a negative lr was torch's 'Invalid learning rate'."""
        params = self.get_params()
        for name, low in self._AT_LEAST.items():
            value = params.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < low):
                raise ValueError(f"{type(self).__name__}: {name} must be a whole number >= {low}, got {value!r}")
        checks = {"lr": lambda v: v > 0, "weight_decay": lambda v: v >= 0, "dropout": lambda v: 0 <= v < 1,
                  "temperature": lambda v: v > 0}
        wanted = {"lr": "> 0", "weight_decay": ">= 0", "dropout": "in [0, 1)", "temperature": "> 0"}
        for name, ok in checks.items():
            value = params.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"{type(self).__name__}: {name} must be a number {wanted[name]}, got {value!r}")

    def fit(self, bags: Sequence[Mapping[str, Any]], y: Any = None) -> "TorchAggregator":
        self._check_params()
        with self._threads():
            return self._fit(bags, y)

    def _fit(self, bags: Sequence[Mapping[str, Any]], y: Any = None) -> "TorchAggregator":
        """Trains the module on these (training) bags.

        Args:
            bags: N training bags.
            y: (N,) labels for the supervised objective, or ``None`` for the label-free one.
        """
        norm, planes, dim = check_bags(bags, self.planes)
        objective = self.objective
        if objective == "auto":
            objective = "contrastive" if y is None else "supervised"
        if objective not in ("supervised", "contrastive"):
            raise ValueError(f"objective must be auto, supervised or contrastive, got {objective!r}")
        self.objective_ = objective
        self.planes_, self.in_dim_ = planes, dim
        n_out = 0
        if objective == "supervised":
            if y is None:
                raise ValueError("objective='supervised' needs labels y")
            y = np.asarray(y)
            if y.shape != (len(norm),):
                raise ValueError(f"y must have shape ({len(norm)},), got {y.shape}")
            self.task_ = resolve_task(y, self.task)
            if self.task_ == "classification":
                if y.dtype.kind == "f" and not np.isfinite(y).all():
                    raise ValueError("y has missing (NaN) labels; drop those subjects first")
                self.classes_, target = np.unique(y, return_inverse=True)
                if len(self.classes_) < 2:
                    raise ValueError(f"classification needs >= 2 classes, got {self.classes_.tolist()}")
                target_t = torch.as_tensor(target, dtype=torch.long)
                n_out = len(self.classes_)
            else:
                yf = y.astype(np.float64)
                if not np.isfinite(yf).all():
                    raise ValueError("y has missing (NaN) labels; drop those subjects first")
                self.y_mean_, self.y_std_ = float(yf.mean()), float(yf.std() or 1.0)
                target_t = torch.as_tensor((yf - self.y_mean_) / self.y_std_, dtype=torch.float32)
                n_out = 1
        else:
            self.task_ = None
            if len(norm) < 2:
                raise ValueError("the contrastive objective needs >= 2 training subjects")
            if self.views not in ("subsets", "planes"):
                raise ValueError(f"views must be subsets or planes, got {self.views!r}")
            if self.views == "planes" and (len(planes) < 2 or not self.plane_subsets_ok):
                raise ValueError(f"views='planes' needs >= 2 planes and an aggregator that accepts "
                                 f"single planes ({type(self).__name__} with planes {planes})")

        self.scaler_ = Standardizer(np.concatenate([b[p].features for b in norm for p in planes]))
        self.uses_tokens_ = self.wants_tokens and all(b[p].tokens is not None for b in norm for p in planes)
        token_dim = None
        self.token_scaler_ = None
        if self.uses_tokens_:
            grids = {b[p].token_grid for b in norm for p in planes}
            if len(grids) != 1:
                raise BagError(f"token grids differ between bags/planes: {sorted(grids)}")
            sample = np.concatenate([b[p].tokens.reshape(-1, b[p].tokens.shape[-1])
                                     for b in norm[:64] for p in planes])
            self.token_scaler_ = Standardizer(sample)
            token_dim = sample.shape[1]

        device = torch.device(self.device)
        rng = np.random.default_rng(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.module_ = self._build_module(dim, planes, token_dim).to(device)
            out_dim = self.module_.out_dim
            if objective == "supervised":
                self.head_ = nn.Linear(out_dim, n_out).to(device)
            else:
                self.head_ = nn.Sequential(nn.Linear(out_dim, out_dim), nn.ReLU(),
                                           nn.Linear(out_dim, min(out_dim, 64))).to(device)
            params = list(self.module_.parameters()) + list(self.head_.parameters())
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            self.history_ = []
            epochs = range(self.epochs)
            if self.progress:
                from tqdm.auto import tqdm

                epochs = tqdm(epochs, desc=f"fit {type(self).__name__}")
            self.module_.train(), self.head_.train()
            for _ in epochs:
                losses = []
                for chunk in self._chunks(len(norm), rng):
                    sub = [norm[i] for i in chunk]
                    if objective == "supervised":
                        z, _ = self.module_(self._collate(sub, planes))
                        out = self.head_(z)
                        tgt = target_t[chunk].to(device)
                        if self.task_ == "classification":
                            loss = F.cross_entropy(out, tgt)
                        else:
                            loss = F.mse_loss(out[:, 0], tgt)
                    else:
                        if len(sub) < 2:
                            continue
                        v1, v2 = self._views(sub, planes, rng)
                        loss = info_nce(self.head_(self.module_(v1)[0]), self.head_(self.module_(v2)[0]),
                                        self.temperature)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                self.history_.append(float(np.mean(losses)) if losses else float("nan"))
            self.module_.eval(), self.head_.eval()
        self.out_dim_ = out_dim
        return self

    def _views(self, bags: Sequence[Bag], planes: Sequence[str], rng: np.random.Generator):
        if self.views == "planes":
            a, b = rng.choice(len(planes), 2, replace=False)
            return self._collate(bags, [planes[a]]), self._collate(bags, [planes[b]])
        first, second = [], []
        for bag in bags:
            s1, s2 = {}, {}
            for p in planes:
                perm = rng.permutation(len(bag[p]))
                half = max(1, len(perm) // 2)
                s1[p] = np.sort(perm[:half])
                s2[p] = np.sort(perm[half:]) if len(perm) > 1 else perm
            first.append(s1), second.append(s2)
        return self._collate(bags, planes, first), self._collate(bags, planes, second)

    # -- inference -----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(bags, y) on the training subjects")

    @torch.no_grad()
    def _run(self, bags: Sequence[Mapping[str, Any]]):
        self._check_fitted()
        norm, planes, _ = self._resolve_planes(bags)
        out = []
        with self._threads():
            for chunk in self._chunks(len(norm), None):
                sub = [norm[i] for i in chunk]
                z, attn = self.module_(self._collate(sub, planes))
                out.append((sub, z, attn))
        return out

    def transform(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Returns the (N, D') volume embeddings (the module output, before the head)."""
        return np.concatenate([z.cpu().numpy() for _, z, _ in self._run(bags)]).astype(np.float32)

    @torch.no_grad()
    def decision_function(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Head outputs: (N, n_classes) logits, or (N,) predictions for regression."""
        self._check_fitted()
        if self.objective_ != "supervised":
            raise RuntimeError("the aggregator was trained without labels; it has no prediction head")
        out = np.concatenate([self.head_(z).cpu().numpy() for _, z, _ in self._run(bags)])
        if self.task_ == "regression":
            return out[:, 0] * self.y_std_ + self.y_mean_
        return out

    def predict_proba(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if self.task_ != "classification":
            raise RuntimeError("predict_proba is only defined for classification")
        logits = self.decision_function(bags)
        logits = logits - logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def predict(self, bags: Sequence[Mapping[str, Any]]) -> np.ndarray:
        out = self.decision_function(bags)
        return self.classes_[out.argmax(1)] if self.task_ == "classification" else out

    def attention(self, bags: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Per subject, ``plane -> (S,)`` slice weights (and ``"planes" -> (P,)`` for fusion)."""
        if not self.has_attention:
            return super().attention(bags)
        out = []
        for sub, _, attn in self._run(bags):
            for i, bag in enumerate(sub):
                row = {}
                for key, w in attn.items():
                    w = w[i].cpu().numpy()
                    row[key] = w[: len(bag[key])] if key in bag else w
                out.append(row)
        return out
