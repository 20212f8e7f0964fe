"""Nested evaluation: embeddings that are themselves fitted, refitted on each training fold.

A trainable aggregator (attention-MIL, slice transformer, fusion with a trainable base or plane
attention, 3D head) or a fine-tuned encoder must never see the subjects it is scored on. A
:class:`FoldFittedSet` is an embedding set without one fixed matrix: for every fold of every label
it fits its model on that fold's training subjects only (supervised on that label, or label-free),
embeds the training and the test subjects with it, and hands both to the probe tasks through
:meth:`~slice2vol.eval.sets.EmbeddingSet.fold_features`. Everything downstream (tables, paired
tests, plots) treats it like any other set. Fitted embeddings are cached per fold by content.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from slice2vol.eval.resultcache import ResultCache, content_key
from slice2vol.eval.sets import EmbeddingSet

log = logging.getLogger(__name__)

TASK_OF_KIND = {"categorical": "classification", "continuous": "regression"}


class FoldFittedSet(EmbeddingSet):
    """Base of sets fitted per training fold; subclasses implement :meth:`fit_embed`.

    Attributes:
        fitted: the disclosure of ``results["sets"][name]["fitted"]`` (labels seen so far are added
            as folds are fitted).
    """

    def __init__(self, name: str, ids: list[str], *, kind: str = "2d", entry: Any = None, provenance: dict | None = None,
                 cache: ResultCache | None = None, supervised: bool = True, what: str = "") -> None:
        super().__init__(name, list(ids), None, dict(provenance or {}), kind, entry)
        self.cache = cache
        self.supervised = supervised
        self.fitted = {"what": what, "labels": [], "scope": "inside folds"}
        self._memo: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._dim: int | None = None
        self.fit_seconds = 0.0

    @property
    def dim(self) -> int:
        return int(self._dim or 0)

    def identity_parts(self) -> dict:
        """What determines the fitted embeddings besides the fold and its labels (no paths)."""
        raise NotImplementedError

    def identity(self, frame=None) -> Any:
        return {"fold_fitted": self.identity_parts(), "supervised": self.supervised,
                "label": frame.label if (frame is not None and self.supervised) else None}

    def fit_embed(self, train_ids: list[str], y_train: np.ndarray | None, test_ids: list[str], kind: str | None,
                  seed: int, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Fits on the training subjects (with their ``label`` values ``y_train`` when supervised) -> (X_train, X_test)."""
        raise NotImplementedError

    def fold_features(self, frame, fold) -> tuple[np.ndarray, np.ndarray]:
        pos = {s: i for i, s in enumerate(frame.ids)}
        y_train = frame.y[[pos[s] for s in fold.train]] if self.supervised else None
        memo_key = (frame.label if self.supervised else None, tuple(fold.train), tuple(fold.test))
        if memo_key in self._memo:
            return self._memo[memo_key]
        key = content_key("fold-fitted", self.identity(frame), fold.train, fold.test,
                          None if y_train is None else y_train.tolist(), fold.repeat)
        hit = self.cache.get("fold-fitted", key) if self.cache else None
        if hit is not None:
            x_train, x_test = np.asarray(hit["train"]), np.asarray(hit["test"])
        else:
            t0 = time.time()
            x_train, x_test = self.fit_embed(list(fold.train), y_train, list(fold.test),
                                             frame.kind if self.supervised else None, fold.repeat,
                                             label=frame.label if self.supervised else None)
            self.fit_seconds += time.time() - t0
            if self.cache:
                self.cache.put("fold-fitted", key, {"train": x_train, "test": x_test})
        if self.supervised and frame.label not in self.fitted["labels"]:
            self.fitted["labels"].append(frame.label)
        self._note_collapse(frame, fold, x_train, x_test)
        self._dim = int(x_train.shape[1])
        self._memo[memo_key] = (x_train, x_test)
        return x_train, x_test


    def inputs_vary(self, ids: list[str]) -> bool:
        """Whether the inputs of these subjects differ (subclasses that can tell cheaply say so)."""
        return True

    def _note_collapse(self, frame, fold, x_train: np.ndarray, x_test: np.ndarray) -> None:
        """Records a fold whose fitted model gave every subject the same embedding.

        Such a fold still scores (at chance: the probe sees one point), which is the honest result of
        the method on that fold; the disclosure and a warning say so, so that a chance-level row is
        not read as "the features know nothing" when the fit collapsed.
        """
        x = np.concatenate([np.asarray(x_train), np.asarray(x_test)])
        if len(x) < 2 or float(np.abs(x - x[0]).max()) != 0.0:
            return
        where = f"{frame.label if self.supervised else 'label-free'} repeat {fold.repeat} fold {fold.fold}"
        if where in self.fitted.get("collapsed_folds", ()) or not self.inputs_vary(list(fold.train) + list(fold.test)):
            return  # already noted, or the inputs are the same too (the encoder's doing, refused elsewhere)
        self.fitted.setdefault("collapsed_folds", []).append(where)
        log.warning("%s: the model fitted on %s gave all %d subjects the same embedding although their inputs "
                    "differ (it collapsed); that fold scores at chance", self.name, where, len(x))


class FoldFittedAggregator(FoldFittedSet):
    """A trainable ``slice2vol.aggregate`` method fitted on each training fold of a feature store."""

    def __init__(self, name: str, store_path: Path, method: str, params: dict, *, ids: list[str] | None = None,
                 entry: Any = None, cache: ResultCache | None = None, provenance: dict | None = None) -> None:
        from slice2vol.aggregate import build_aggregator
        from slice2vol.cache import FeatureStore

        store = FeatureStore(store_path, mode="r")
        self.store_path, self.method, self.params = Path(store_path), method, dict(params)
        self.feature_set = store.feature_set
        probe = build_aggregator(method, **self.params)
        supervised = getattr(probe, "objective", "auto") != "contrastive"
        objective = "supervised on the evaluated label" if supervised else "label-free (contrastive)"
        super().__init__(name, list(ids if ids is not None else store.subjects()), entry=entry, cache=cache, supervised=supervised,
                         what=f"{method} aggregator, {objective}",
                         provenance={**(provenance or {}), "aggregator": method, "params": self.params,
                                     "source_feature_set": self.feature_set})
        self._bags: dict[str, Any] | None = None

    def identity_parts(self) -> dict:
        return {"feature_set": self.feature_set, "method": self.method, "params": self.params}

    def _load(self, ids: list[str]) -> list:
        from slice2vol.aggregate import AGGREGATORS, load_bags

        if self._bags is None:
            cls = AGGREGATORS.get(self.method)
            tokens = bool(getattr(cls, "wants_tokens", False)) or (
                self.method == "fusion" and bool(getattr(AGGREGATORS.get(self.params.get("base", "mean")),
                                                         "wants_tokens", False)))
            all_ids, bags = load_bags(self.store_path, self.ids, tokens=tokens)
            self._bags = dict(zip(all_ids, bags))
        return [self._bags[s] for s in ids]

    def inputs_vary(self, ids: list[str]) -> bool:
        bags = self._load(ids)
        first = bags[0] if bags else None
        return any(not _same_bag(first, b) for b in bags[1:])

    def fit_embed(self, train_ids, y_train, test_ids, kind, seed, label=None):
        from slice2vol.aggregate import build_aggregator

        params = dict(self.params)
        agg = build_aggregator(self.method, **params)
        names = agg.get_params()
        if kind is not None and "task" in names and names["task"] == "auto":
            agg.set_params(task=TASK_OF_KIND[kind])
        train_bags, test_bags = self._load(train_ids), self._load(test_ids)
        agg.fit(train_bags, y_train)
        return agg.transform(train_bags).astype(np.float32), agg.transform(test_bags).astype(np.float32)


def _same_bag(a: Any, b: Any) -> bool:
    """Two bags (plane -> PlaneBag) hold the same slice features."""
    return a.keys() == b.keys() and all(
        a[k].features.shape == b[k].features.shape and bool(np.array_equal(a[k].features, b[k].features))
        for k in a)


def is_trainable(method: str, params: dict) -> bool:
    """Whether an aggregator with these parameters learns anything (then it must be fitted per fold)."""
    from slice2vol.aggregate import build_aggregator

    clean = {k: v for k, v in params.items() if k not in ("train_ids", "label")}
    return bool(build_aggregator(method, **clean).requires_fit)
