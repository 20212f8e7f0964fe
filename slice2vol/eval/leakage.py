"""Leakage guard and disclosure: who fitted what in every embedding set.

Every set says which subjects, and which labels, fitted anything in it:

* ``fitted``: a model trained with labels (or label-free) *for* this set — a trainable aggregator,
  a fine-tuned encoder. Inside folds (:mod:`slice2vol.eval.nested`) it is fine; fitted with labels
  on subjects that are test subjects of the benchmark's splits it is a leak, and
  :func:`check_leakage` refuses the run in one line naming the set and the overlap.
* ``pretraining``: label-free pretraining (3D SSL, contrastive aggregators, SimCLR fine-tuning) on
  some subjects. Allowed on test subjects (no labels are seen) but disclosed per set: "pretrained on
  N subjects, M of them in test folds, no labels".
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


class LeakageError(ValueError):
    """A set fitted with labels on subjects it is then tested on."""


def tested_subjects(frames: Mapping) -> set[str]:
    """Every subject that is in some test fold of some label's splits."""
    out: set[str] = set()
    for frame in frames.values():
        for fold in frame.splits.folds:
            out.update(fold.test)
    return out


def disclosure_from_provenance(prov: Mapping) -> tuple[dict | None, dict | None, list[str]]:
    """(fitted, pretraining, fit subjects) of a set read from the provenance its writer recorded.

    Understands :func:`slice2vol.aggregate.aggregate_store` (``trainable``, ``label``, ``train_ids``),
    fine-tuning records (``trained_subjects``, ``objective``, ``label``) and explicit ``fitted_on`` /
    ``fitted_labels`` keys of brought-in features.
    """
    if prov.get("trainable") and prov.get("train_ids") is not None:
        ids = [str(s) for s in prov["train_ids"]]
        label = prov.get("label")
        what = f"{prov.get('aggregator', 'aggregator')} aggregator"
        if label:
            return {"what": what, "labels": [label], "scope": "all subjects", "n_subjects": len(ids)}, None, ids
        return None, {"what": what, "n_subjects": len(ids), "labels": False}, ids
    if prov.get("trained_subjects") is not None:
        ids = [str(s) for s in prov["trained_subjects"]]
        if prov.get("objective") == "supervised" and prov.get("label"):
            return ({"what": "fine-tuned encoder", "labels": [prov["label"]], "scope": "all subjects",
                     "n_subjects": len(ids)}, None, ids)
        return None, {"what": f"fine-tuned encoder ({prov.get('objective')})", "n_subjects": len(ids),
                      "labels": False}, ids
    if prov.get("fitted_on") is not None:
        ids = [str(s) for s in prov["fitted_on"]]
        labels = list(prov.get("fitted_labels") or [])
        if labels:
            return {"what": "brought-in features", "labels": labels, "scope": "all subjects",
                    "n_subjects": len(ids)}, None, ids
        return None, {"what": "brought-in features", "n_subjects": len(ids), "labels": False}, ids
    return None, None, []


def check_leakage(sets: Mapping, frames: Mapping) -> None:
    """Refuses any set fitted with labels on test subjects of the splits (one-line :class:`LeakageError`).

    Sets fitted inside folds (``fitted["scope"] == "inside folds"``) pass by construction.
    """
    tested = tested_subjects(frames)
    for name, es in sets.items():
        fitted = getattr(es, "fitted", None)
        if not fitted or fitted.get("scope") == "inside folds" or not fitted.get("labels"):
            continue
        subjects = set(getattr(es, "fit_subjects", None) or [])
        overlap = subjects & tested
        if overlap:
            raise LeakageError(
                f"set {name!r} was fitted with labels {fitted['labels']} on {len(subjects)} subjects, "
                f"{len(overlap)} of them test subjects of the splits: list it so it is fitted inside the folds "
                "(no train_ids in aggregator_params), or fit it on subjects outside this cohort")


def pretraining_disclosure(fit_subjects: Iterable[str], tested: set[str], source: str) -> dict:
    """``{n_subjects, n_in_test_folds, labels: False, source}`` of a label-free pretraining."""
    ids = set(fit_subjects)
    return {"n_subjects": len(ids), "n_in_test_folds": len(ids & tested), "labels": False, "source": source}


def describe(name: str, entry: Mapping) -> str:
    """One sentence of a set's disclosure for the report notes."""
    parts = []
    fitted = entry.get("fitted")
    if fitted:
        labels = fitted.get("labels") or []
        scope = fitted.get("scope")
        where = "fitted inside each training fold" if scope == "inside folds" else f"fitted on {scope}"
        seen = f"labels seen: {', '.join(labels)}" if labels else "no labels seen"
        parts.append(f"{fitted.get('what', 'fitted')}; {where} ({seen})")
    pre = entry.get("pretraining")
    if pre:
        parts.append(f"pretrained on {pre['n_subjects']} subjects, {pre['n_in_test_folds']} of them in test folds, "
                     f"{'with' if pre.get('labels') else 'no'} labels ({pre.get('source')})")
    return f"{name}: " + "; ".join(parts) if parts else ""


def same_scans(sets: Mapping, *, kinds: tuple[str, ...] = ("2d", "3d"), tol: float = 1e-3
               ) -> tuple[list[list[str]], list[str]]:
    """Subjects whose embeddings coincide in every image set: one scan under two IDs.

    A byte-identical copy is caught when the manifest is read; a scan saved twice (``.nii`` and
    ``.nii.gz``, or gzip with another time stamp in its header) is not, yet it gives the same voxels,
    so every encoder maps it to the same vector up to float rounding (batch composition changes
    the kernels, so not always bit for bit). Two rows count as one scan when their distance is below
    ``tol`` x the set's median nearest-neighbour distance (distinct scans lie far above that; rounding
    far below) in every set of ``kinds`` that holds both. A set whose median nearest-neighbour
    distance is below 1e-6 x its median norm maps most subjects to one vector (a collapsed encoder):
    it decides nothing and is named in the notes.

    Args:
        sets: name -> :class:`~slice2vol.eval.sets.EmbeddingSet` (``ids`` (N,), ``X`` (N, D), ``kind``).
        kinds: set kinds made from the images (brought-in tables or baselines may repeat rows).
        tol: the distance below which two rows are one scan, as a fraction of the median
            nearest-neighbour distance.

    Returns:
        (groups of subject IDs, each sorted, the groups sorted; notes on the sets left out of the check).
    """
    from sklearn.neighbors import NearestNeighbors

    close: dict[frozenset, int] = {}  # pair -> number of sets where it is one scan
    deciding: list[set[str]] = []  # the subjects of each set that decides
    notes: list[str] = []
    for name, es in sets.items():
        if getattr(es, "kind", None) not in kinds or getattr(es, "X", None) is None or len(es.ids) < 3:
            continue  # no X: a set fitted inside each fold (trainable aggregators) has no one matrix
        X = np.asarray(es.X, dtype=np.float64)
        finite = np.isfinite(X).all(axis=1)
        ids = [s for s, ok in zip(es.ids, finite) if ok]
        X = X[finite]
        if len(ids) < 3:
            continue
        nn = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(X)
        dist, _ = nn.kneighbors(X)
        scale = float(np.median(dist[:, 1]))
        if scale <= 1e-6 * float(np.median(np.linalg.norm(X, axis=1))):
            notes.append(f"set {name!r}: most subjects share one vector (median nearest-neighbour distance "
                         f"{scale:.3g}); not used to find one scan under two IDs")
            continue
        deciding.append(set(ids))
        hits = nn.radius_neighbors(X, radius=tol * scale, return_distance=False)
        for i, row in enumerate(hits):
            for j in row:
                if j > i:
                    pair = frozenset((ids[i], ids[j]))
                    close[pair] = close.get(pair, 0) + 1
    parent: dict[str, str] = {}

    def root(s: str) -> str:
        while parent.setdefault(s, s) != s:
            s = parent[s]
        return s

    for pair, n in close.items():
        if n == sum(pair <= members for members in deciding):  # one scan in every set that holds both
            a, b = sorted(pair)
            parent[root(b)] = root(a)
    groups: dict[str, list[str]] = {}
    for s in parent:
        groups.setdefault(root(s), []).append(s)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1), notes
