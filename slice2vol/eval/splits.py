"""Subject-level cross-validation splits, saved to JSON and reused by every encoder.

The classic error in slice-based MRI studies is a split made over slices: neighbouring slices of
one subject land in train and test and accuracy is inflated by tens of points. Here a split is a
property of *subject IDs only*: :func:`make_splits` refuses repeated IDs, a :class:`Fold` holds
ID lists, and :meth:`SubjectSplits.positions` maps them onto the rows of a feature matrix whose
rows must themselves be unique subjects. There is no way to ask for a split of slice rows.

Stratification: by class for categorical targets, by quantile bins for continuous ones; an optional
group column (site, or subject for longitudinal rows) keeps related rows in one fold.
"""

from __future__ import annotations

import json
import logging
import numbers
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


#: the largest seed numpy's and scikit-learn's random states take
MAX_SEED = 2**32 - 1


class SplitError(ValueError):
    """A split request that would leak (repeated IDs) or cannot be made (too few subjects)."""


class DegenerateGroupsError(SplitError):
    """Grouped folds of a label that no probe can be fitted or scored on (a group holding nearly
    every subject): the label is skipped, where a leaking or tampered split stops the run."""


@dataclass
class SplitConfig:
    """How subject-level folds are drawn.

    Attributes:
        n_folds: K of the K-fold.
        n_repeats: number of repetitions, each with its own shuffling seed (``seed + repeat``).
        seed: base seed.
        n_bins: quantile bins used to stratify a continuous target.
        group: optional label column whose equal values must stay in one fold.
    """

    n_folds: int = 5
    n_repeats: int = 1
    seed: int = 0
    n_bins: int = 4
    group: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("n_folds", 2), ("n_repeats", 1), ("n_bins", 1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"splits.{name} must be a whole number >= {low}, got {value!r}")
        # repeat r shuffles with seed + r, which numpy and scikit-learn take as a 32-bit unsigned number
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"splits.seed must be a whole number from 0 to 2**32 - 1, got {self.seed!r}")
        if self.seed + self.n_repeats - 1 > MAX_SEED:
            raise ValueError(f"splits.seed + splits.n_repeats - 1 must be <= 2**32 - 1 (repeat r shuffles with "
                             f"seed + r), got seed={self.seed}, n_repeats={self.n_repeats}")


@dataclass
class Fold:
    """One train/test partition of subject IDs."""

    repeat: int
    fold: int
    train: list[str]
    test: list[str]


@dataclass
class SubjectSplits:
    """Repeated K-fold over subject IDs.

    Attributes:
        subject_ids: the subjects covered, each exactly once per repeat in some test fold.
        folds: all folds of all repeats.
        meta: how they were made (config, target, stratification).
    """

    subject_ids: list[str]
    folds: list[Fold]
    meta: dict = field(default_factory=dict)

    @property
    def n_repeats(self) -> int:
        return 1 + max(f.repeat for f in self.folds)

    def repeat(self, r: int) -> list[Fold]:
        return [f for f in self.folds if f.repeat == r]

    def positions(self, row_ids: Sequence[str], fold: Fold) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of ``fold``'s train and test subjects in a table whose rows are ``row_ids``.

        Raises:
            SplitError: ``row_ids`` repeats an ID (slice-level rows) or lacks a split subject.
        """
        index = _unique_index(row_ids, "feature rows")
        missing = [s for s in fold.train + fold.test if s not in index]
        if missing:
            raise SplitError(f"{len(missing)} split subject(s) have no feature row, e.g. {missing[:3]}")
        return (np.array([index[s] for s in fold.train], dtype=np.int64),
                np.array([index[s] for s in fold.test], dtype=np.int64))

    def validate(self) -> None:
        """Checks that no subject straddles train/test and each repeat tests every subject once."""
        universe = set(self.subject_ids)
        for r in range(self.n_repeats):
            seen: list[str] = []
            for f in self.repeat(r):
                overlap = set(f.train) & set(f.test)
                if overlap:
                    raise SplitError(f"repeat {r} fold {f.fold}: subject(s) in train and test: {sorted(overlap)[:3]}")
                covered = set(f.train) | set(f.test)
                if covered != universe:
                    raise SplitError(f"repeat {r} fold {f.fold}: does not cover the subjects (missing: "
                                     f"{sorted(universe - covered)[:3]}, unknown: {sorted(covered - universe)[:3]})")
                seen += f.test
            if sorted(seen) != sorted(universe):
                untested = sorted(universe - set(seen))
                twice = sorted(s for s, c in Counter(seen).items() if c > 1)
                raise SplitError(f"repeat {r}: test folds do not partition the subjects (never tested: "
                                 f"{untested[:3]}, tested more than once: {twice[:3]})")

    def to_dict(self) -> dict:
        return {"subject_ids": list(self.subject_ids), "meta": self.meta,
                "folds": [{"repeat": f.repeat, "fold": f.fold, "train": f.train, "test": f.test}
                          for f in self.folds]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SubjectSplits":
        data = json.loads(Path(path).read_text())
        splits = cls(list(data["subject_ids"]), [Fold(**f) for f in data["folds"]], data.get("meta", {}))
        splits.validate()
        return splits


def _unique_index(ids: Sequence[str], what: str) -> dict[str, int]:
    ids = [str(i) for i in ids]
    index = {s: i for i, s in enumerate(ids)}
    if len(index) != len(ids):
        seen: set[str] = set()
        dup = next(s for s in ids if s in seen or seen.add(s))  # type: ignore[func-returns-value]
        raise SplitError(
            f"{what}: subject ID {dup!r} appears more than once; splits are made over subjects, not "
            "slices (aggregate slice features to one row per subject first)")
    return index


def stratification_labels(y: Sequence, kind: str, n_bins: int) -> np.ndarray:
    """Integer strata: classes for ``categorical``, quantile bins for ``continuous``."""
    y = np.asarray(y)
    if kind == "categorical":
        _, codes = np.unique(y.astype(str), return_inverse=True)
        return codes
    values = y.astype(float)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


def make_splits(
    subject_ids: Sequence[str],
    y: Sequence | None = None,
    kind: str = "categorical",
    *,
    groups: Sequence | None = None,
    cfg: SplitConfig | None = None,
    label: str | None = None,
) -> SubjectSplits:
    """Draws repeated (stratified, grouped) K-fold splits over unique subject IDs.

    Args:
        subject_ids: (N,) unique IDs; a repeated ID (e.g. one row per slice) raises.
        y: (N,) target used for stratification, or None for plain K-fold.
        kind: ``categorical`` or ``continuous`` (binned into ``cfg.n_bins`` quantiles).
        groups: (N,) group value per subject; equal values never straddle folds.
        cfg: folds, repeats, seed.
        label: the label being split (named in errors only).

    Returns:
        validated :class:`SubjectSplits`.

    Raises:
        SplitError: grouped folds with a training part of fewer than 2 subjects or an empty test part
            (one group holding nearly every subject); the caller may skip the label.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    cfg = cfg or SplitConfig()
    ids = [str(s) for s in subject_ids]
    _unique_index(ids, "make_splits")
    n = len(ids)
    if n < cfg.n_folds:
        raise SplitError(f"{n} subjects cannot make {cfg.n_folds} folds")
    strata = None
    if y is not None:
        strata = stratification_labels(y, kind, cfg.n_bins)
        counts = np.bincount(strata)
        if counts[counts > 0].min() < cfg.n_folds:
            # too few members in a stratum: merge rare strata with their neighbour for continuous
            # targets, fall back to plain K-fold for categorical ones
            if kind == "continuous":
                strata = stratification_labels(y, kind, max(1, n // (2 * cfg.n_folds)))
            else:
                values, sizes = np.unique(np.asarray(y).astype(str), return_counts=True)
                small = ", ".join(f"{v!s} ({c})" for v, c in zip(values, sizes) if c < cfg.n_folds)
                where = f"label {label!r}: " if label is not None else ""
                if counts[counts > 0].min() < 2:
                    log.warning("%sclass(es) %s have fewer than 2 subjects; splitting without stratification",
                                where, small)
                    strata = None
                else:  # sklearn says so with a raw UserWarning (silenced below)
                    log.warning("%sclass(es) %s have fewer subjects than the %d folds; some test folds lack them",
                                where, small, cfg.n_folds)
    folds: list[Fold] = []
    for r in range(cfg.n_repeats):
        seed = cfg.seed + r
        if groups is not None:
            g = np.asarray([str(v) for v in groups])
            if len(np.unique(g)) < cfg.n_folds:
                raise ValueError(f"splits.group={cfg.group!r}: {len(np.unique(g))} group(s) "
                                 f"({', '.join(map(str, np.unique(g)[:5]))}) cannot fill splits.n_folds="
                                 f"{cfg.n_folds} folds without splitting a group; use fewer folds or no group")
            if strata is not None:
                splitter = StratifiedGroupKFold(cfg.n_folds, shuffle=True, random_state=seed)
                parts = splitter.split(np.zeros(n), strata, g)
            else:
                parts = GroupKFold(cfg.n_folds).split(np.zeros(n), groups=shuffled_group_codes(g, seed))
        elif strata is not None:
            parts = StratifiedKFold(cfg.n_folds, shuffle=True, random_state=seed).split(np.zeros(n), strata)
        else:
            parts = KFold(cfg.n_folds, shuffle=True, random_state=seed).split(np.zeros(n))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            parts = list(parts)
        for k, (tr, te) in enumerate(parts):
            folds.append(Fold(r, k, [ids[i] for i in tr], [ids[i] for i in te]))
    if groups is not None:
        _check_grouped_folds(folds, groups, cfg, label)
    meta = {"n_folds": cfg.n_folds, "n_repeats": cfg.n_repeats, "seed": cfg.seed, "n_bins": cfg.n_bins,
            "group": cfg.group, "kind": kind, "stratified": strata is not None}
    splits = SubjectSplits(ids, folds, meta)
    splits.validate()
    same = _repeated_partitions(splits)
    if same:
        # few subjects leave few ways to split them: such a repeat re-scores the same folds, so the
        # fold-mean estimates and intervals count it as new evidence it is not
        log.warning("repeat(s) %s split the subjects exactly like an earlier repeat (%s): with %d subjects the "
                    "repeats add no new folds; fewer splits.n_repeats, or more subjects",
                    ", ".join(map(str, same)), ", ".join(f"{r} = {q}" for r, q in same.items()), n)
    return splits


def shuffled_group_codes(groups: Sequence, seed: int) -> list[int]:
    """(N,) group values -> (N,) integer codes in a seeded random order of the groups.

    GroupKFold has no shuffle in old sklearn and places equal-sized groups in code order: shuffling the
    codes is what makes its folds depend on the seed.
    """
    g = np.asarray([str(v) for v in groups])
    uniq = np.random.default_rng(seed).permutation(np.unique(g))
    remap = {v: i for i, v in enumerate(uniq)}
    return [remap[v] for v in g]


def _check_grouped_folds(folds: Sequence[Fold], groups: Sequence, cfg: SplitConfig, label: str | None) -> None:
    """Refuses grouped folds that no probe can be fitted or scored on.

    One group holding nearly every subject (a site with 15 of 16 subjects) leaves the fold that tests
    it a training part of one subject: the probes' inner splits then failed with scikit-learn's
    "n_splits=2 greater than the number of samples", naming neither label nor group.
    """
    for fold in folds:
        if len(fold.train) >= 2 and fold.test:
            continue
        values, counts = np.unique([str(v) for v in groups], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        sizes = ", ".join(f"{values[i]}: {counts[i]}" for i in order[:8]) + (", ..." if len(order) > 8 else "")
        where = f" (label {label!r})" if label is not None else ""
        problem = (f"a training part of {len(fold.train)} subject(s)" if len(fold.train) < 2
                   else "an empty test part")
        raise DegenerateGroupsError(
            f"splits.group={cfg.group!r}{where}: repeat {fold.repeat} fold {fold.fold} has {problem} (subjects per "
            f"group: {sizes}); every fold needs >= 2 training subjects and >= 1 test subject: use more, smaller "
            "groups or no group")


def _repeated_partitions(splits: "SubjectSplits") -> dict[int, int]:
    """repeat -> the earlier repeat whose test folds are the same sets of subjects (in any order)."""
    seen: dict[frozenset, int] = {}
    same: dict[int, int] = {}
    for r in range(splits.n_repeats):
        partition = frozenset(frozenset(f.test) for f in splits.repeat(r))
        if partition in seen:
            same[r] = seen[partition]
        else:
            seen[partition] = r
    return same


def split_definition(subject_ids: Sequence[str], y: Sequence | None, kind: str, groups: Sequence | None,
                     cfg: SplitConfig, label: str | None = None) -> dict:
    """Everything that defines a split: the settings, the label, its values, the groups, the subjects.

    Two requests with the same definition get the same folds; any difference (another ``group``
    column, other ``n_bins``, another label or corrected label values) is another split.
    """
    import hashlib

    ids = [str(s) for s in subject_ids]
    order = np.argsort(ids, kind="stable")

    def digest(values) -> str | None:
        if values is None:
            return None
        arr = np.asarray(values)
        text = "\x1f".join(str(arr[i]) for i in order)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {"label": label, "kind": kind, "n_folds": cfg.n_folds, "n_repeats": cfg.n_repeats, "seed": cfg.seed,
            "n_bins": cfg.n_bins, "group": cfg.group, "subjects": digest(ids), "target": digest(y),
            "groups": digest(groups)}


def definition_hash(definition: dict) -> str:
    """Short hash of a :func:`split_definition` (used in split file names)."""
    import hashlib

    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:10]


def load_or_make_splits(path: str | Path, subject_ids: Sequence[str], y: Sequence | None, kind: str,
                        *, groups: Sequence | None = None, cfg: SplitConfig | None = None,
                        label: str | None = None) -> SubjectSplits:
    """Reuses the splits saved at ``path`` only when their full definition matches; else makes and saves.

    The definition (:func:`split_definition`: settings, label, label values, groups, subjects) is
    stored in the file's ``meta["definition"]``; a file without it or with another one is never
    reused (it is replaced, with a warning). Every encoder of a comparison goes through the same
    file, so their scores are paired. Callers that keep old splits name the file after
    :func:`definition_hash`, so a changed definition gets a new file.

    Raises:
        SplitError: as :func:`make_splits` (e.g. grouped folds with a training part of one subject).
    """
    path = Path(path)
    cfg = cfg or SplitConfig()
    definition = split_definition(subject_ids, y, kind, groups, cfg, label)
    if path.exists():
        saved = SubjectSplits.load(path)
        if saved.meta.get("definition") == definition:
            if groups is not None:  # a file saved before grouped folds were checked
                _check_grouped_folds(saved.folds, groups, cfg, label)
            return saved
        changed = sorted(k for k in definition if (saved.meta.get("definition") or {}).get(k) != definition[k])
        log.warning("%s: saved splits were made with another definition (%s differ); drawing new ones", path,
                    ", ".join(changed))
    splits = make_splits(subject_ids, y, kind, groups=groups, cfg=cfg, label=label)
    splits.meta["definition"] = definition
    splits.save(path)
    return splits
