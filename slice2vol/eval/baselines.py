"""Baseline and brought-in embedding sets: trivial features the project computes, chance, your own.

* ``head_volume``: volume of the head (foreground) mask, mL — (N, 1).
* ``brain_volume``: volume of the segmentation's non-zero labels (e.g. DLMUSE), mL — (N, 1); needs
  a ``seg`` column in the manifest.
* ``intensities``: the normalised volume average-pooled onto a ``grid^3`` lattice — (N, grid^3).
* ``chance``: no features; every probe task scores it with a stratified dummy (class drawn with the
  training fold's frequencies) or the training mean, on the same splits as every set.
* brought-in features (``features:`` entries): a CSV (one row per subject, an ID column, numeric
  columns) or an ``.npz`` (``ids`` (N,) and ``X`` (N, D)), e.g. FreeSurfer or DLMUSE region volumes.

A strong encoder should beat all of them; if brain volume alone predicts sex with AUC 0.76, an
encoder at 0.78 has learnt little more than head size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from slice2vol.config import to_dict
from slice2vol.data.io import file_sha256
from slice2vol.eval.experiment import BaselineConfig, FeaturesEntry
from slice2vol.eval.resultcache import ResultCache, content_key
from slice2vol.eval.sets import EmbeddingSet

log = logging.getLogger(__name__)

BASELINES = ("head_volume", "brain_volume", "intensities")



def read_features(entry: FeaturesEntry, path: Path, cohort_ids: list[str]) -> EmbeddingSet:
    """A brought-in feature table -> an :class:`EmbeddingSet` of the cohort subjects it covers.

    Raises:
        ValueError: unreadable file, missing ID column, non-numeric columns, a column with no finite
            value for any cohort subject, no subject of the cohort in the file (one line naming the
            file). Subjects with a missing value elsewhere are left out and listed in the provenance
            (``left_out_missing_values``, ``missing_columns``).
    """
    if not path.exists():
        raise ValueError(f"{path}: features file not found (features entry {entry.name!r})")
    if path.suffix == ".npz":
        import zipfile

        ids, X = None, None
        try:
            with np.load(path, allow_pickle=False) as data:
                if "ids" in data and "X" in data:
                    ids = [str(s) for s in data["ids"].tolist()]
                    X = np.asarray(data["X"], dtype=np.float64)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
            # a ValueError: e.g. IDs saved as an object array, which would need pickle (never used here)
            hint = ("; save ids as text (np.asarray(ids, dtype=str)) and X as numbers"
                    if isinstance(err, ValueError) else "")
            raise ValueError(f"{path}: cannot read the features .npz ({' '.join(str(err).split())[:120]}){hint}"
                             ) from None
        if X is None:
            raise ValueError(f"{path}: an .npz of features needs arrays 'ids' (N,) and 'X' (N, D)")
        if X.ndim != 2:
            raise ValueError(f"{path}: 'X' has shape {X.shape}; expected (subjects, features), e.g. X[:, None] "
                             "for one feature")
        columns = [f"f{i}" for i in range(X.shape[1])]
    else:
        import pandas as pd

        try:
            table = pd.read_csv(path, sep=None, engine="python")
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read the features CSV ({err})") from None
        if entry.id_column not in table.columns:
            raise ValueError(f"{path}: no ID column {entry.id_column!r} (columns: {list(table.columns)[:8]}...); "
                             "set id_column")
        ids = table[entry.id_column].astype(str).tolist()
        columns = entry.columns or [c for c in table.columns if c != entry.id_column and c not in entry.exclude]
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not found")
        values = table[columns].apply(pd.to_numeric, errors="coerce")
        bad = [c for c in columns if values[c].isna().any() and not table[c].isna().any()]
        if bad:
            raise ValueError(f"{path}: non-numeric values in column(s) {bad[:5]}")
        X = values.to_numpy(dtype=np.float64)
        columns = [str(c) for c in columns]
    if X.ndim != 2 or len(ids) != len(X):
        raise ValueError(f"{path}: expected one row of features per subject, got {X.shape} for {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: subject IDs repeat (one row per subject)")
    keep = [i for i, s in enumerate(ids) if s in set(cohort_ids)]
    if not keep:
        raise ValueError(f"{path}: none of its {len(ids)} IDs is a subject of the cohort (e.g. {ids[:3]})")
    X = X[keep]
    ids = [ids[i] for i in keep]
    ok = np.isfinite(X)
    empty = [c for c, any_ok in zip(columns, ok.any(0)) if not any_ok]
    if empty:
        # it used to leave every subject out, and with them every other set's comparison
        raise ValueError(f"{path}: column(s) {empty[:5]} hold no finite value for any of the {len(ids)} cohort "
                         f"subject(s) in the file (features entry {entry.name!r}); drop them (exclude: [...])")
    finite = ok.all(1)
    left_out = [s for s, f in zip(ids, finite) if not f]
    missing_columns = {s: [c for c, good in zip(columns, row) if not good][:5]
                       for s, row, f in zip(ids, ok, finite) if not f}
    if left_out:
        log.warning("%s: %d subject(s) with missing values are left out", path, len(left_out))
        X, ids = X[finite], [s for s, f in zip(ids, finite) if f]
    if len(X) > 1 and np.ptp(X, axis=0).max() == 0:
        raise ValueError(f"{path}: every subject has the same features (features entry {entry.name!r}); there is "
                         "nothing to compare")
    if entry.log:
        if (X < 0).any():
            raise ValueError(f"{path}: log=true needs non-negative values")
        X = np.log1p(X)
    prov = {"source": str(path), "source_sha256": file_sha256(path), "columns": columns[:50],
            "n_columns": len(columns), "id_column": entry.id_column, "log": entry.log,
            "left_out_missing_values": left_out, "missing_columns": missing_columns}
    if entry.fitted_on is not None:
        prov.update({"fitted_on": list(entry.fitted_on), "fitted_labels": list(entry.fitted_labels)})
    return EmbeddingSet(entry.name, ids, X.astype(np.float32), prov, "features", entry)


def compute_baselines(names: list[str], cohort, volume_cfg, cfg: BaselineConfig, cache: ResultCache | None,
                      progress: bool = True, timings: dict | None = None,
                      failures: list[str] | None = None) -> tuple[dict[str, EmbeddingSet], list[dict]]:
    """The computed baselines of every subject (cached by the content of the image files).

    Returns:
        (name -> set, skipped entries ``{name, reason, substitute}``).
    """
    import torch
    import torch.nn.functional as F

    from slice2vol.data.manifest import Failure, load_subject
    from slice2vol.progress import track

    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINES)}")
    skipped: list[dict] = []
    wanted = list(names)
    if "brain_volume" in wanted and not any(s.seg is not None for s in cohort.subjects):
        skipped.append({"name": "brain_volume", "reason": "the manifest has no seg column to measure the brain",
                        "substitute": "head_volume" if "head_volume" in wanted else None})
        wanted.remove("brain_volume")
    if not wanted:
        return {}, skipped
    t0 = time.time()
    files = [[_content_of(Path(p)) for p in _paths_of(s)] for s in cohort.subjects]
    key = content_key("baselines", sorted(wanted), to_dict(cfg), to_dict(volume_cfg), cohort.ids, files)
    hit = cache.get("baselines", key) if cache else None
    if hit is None:
        feats: dict[str, list] = {n: [] for n in wanted}
        ids: dict[str, list] = {n: [] for n in wanted}
        failed: list[str] = []
        g = cfg.intensity_grid
        for subject in track(cohort.subjects, desc="baselines", unit="vol", enabled=progress):
            try:
                vol = load_subject(subject, volume_cfg)
            except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
                # the subject is left out of these sets (as the encoders' caching jobs leave it out) and
                # reported; the run goes on with the others
                failed.append(str(Failure.of(subject, err)))
                log.warning("baselines: %s", failed[-1])
                continue
            voxel_ml = float(np.prod(vol.spacing)) / 1000.0
            if "head_volume" in wanted:
                feats["head_volume"].append([float(vol.mask.sum()) * voxel_ml])
                ids["head_volume"].append(subject.subject_id)
            if "brain_volume" in wanted and vol.seg is not None:
                feats["brain_volume"].append([float((vol.seg > 0).sum()) * voxel_ml])
                ids["brain_volume"].append(subject.subject_id)
            if "intensities" in wanted:
                x = torch.from_numpy(np.ascontiguousarray(vol.data[:1], dtype=np.float32))[None]
                feats["intensities"].append(F.adaptive_avg_pool3d(x, (g, g, g)).reshape(-1).numpy())
                ids["intensities"].append(subject.subject_id)
        # widths spelled out: with every subject failed, reshape(0, -1) was numpy's error for the whole run
        width = {"head_volume": 1, "brain_volume": 1, "intensities": g ** 3}
        hit = {n: {"ids": ids[n], "X": np.asarray(feats[n], dtype=np.float32).reshape(len(ids[n]), width[n])}
               for n in wanted}
        hit["failures"] = failed
        if cache:
            cache.put("baselines", key, hit)
    if failures is not None:
        failures += [f for f in hit.get("failures", []) if f not in failures]
    if timings is not None:
        timings["baselines"] = round(time.time() - t0, 2)
    what = {"head_volume": "head (foreground mask) volume, mL", "brain_volume": "segmentation > 0 volume, mL",
            "intensities": f"intensities average-pooled to {cfg.intensity_grid}^3"}
    sets = {n: EmbeddingSet(n, list(hit[n]["ids"]), np.asarray(hit[n]["X"]), {"baseline": what[n]}, "baseline")
            for n in wanted if len(hit[n]["ids"])}
    skipped += [{"name": n, "reason": "no subject could be loaded", "substitute": None} for n in wanted if n not in sets]
    return sets, skipped


def _content_of(path: Path) -> str:
    """The sha256 of a file for the cache key, or why it cannot be read (that subject then fails on
    loading, with the message of the loader, instead of the whole run on hashing)."""
    try:
        return file_sha256(path)
    except OSError as err:
        return f"unreadable: {type(err).__name__} {err.errno}"


def _paths_of(subject) -> list[str]:
    """The files a subject's baselines are computed from (images, then the segmentation)."""
    return [str(p) for p in [*subject.images.values(), *([subject.seg] if subject.seg is not None else [])]]


def chance_set(ids: list[str]) -> EmbeddingSet:
    """The ``chance`` row: one constant column (never used: probe tasks score it with a dummy)."""
    return EmbeddingSet("chance", list(ids), np.zeros((len(ids), 1), np.float32),
                        {"chance": "stratified dummy (classes) / training mean (continuous)"}, "chance")
