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
import re
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



def read_features(entry: FeaturesEntry, path: Path, cohort_ids: list[str], labels=None) -> EmbeddingSet:
    """A brought-in feature table -> an :class:`EmbeddingSet` of the cohort subjects it covers.

    Args:
        labels: the probed labels (DataFrame indexed by subject ID), if any: a feature column named
            like one of them, or holding its values, is a copy of the answer and gets a warning.

    Raises:
        ValueError: unreadable file, missing ID column, repeated column names, non-numeric or complex
            values, values beyond float32, a column with no finite value for any cohort subject, no
            subject of the cohort in the file (one line naming the file). Subjects with a missing value
            elsewhere, and cohort subjects without a row, are left out and listed in the provenance
            (``left_out_missing_values``, ``missing_columns``, ``left_out_no_row``).
    """
    if not path.exists():
        raise ValueError(f"{path}: features file not found (features entry {entry.name!r})")
    from slice2vol.inputs import special_file_problem

    special = special_file_problem(path)
    if special:  # a named pipe would block the reader, and its hash (provenance) could not be taken
        raise ValueError(f"{path}: {special}, not a regular file (features entry {entry.name!r})")
    if path.suffix == ".npz":
        ids, X = _read_npz(path)
        columns = [f"f{i}" for i in range(X.shape[1])]
    else:
        ids, X, columns = _read_csv(entry, path)
    if X.ndim != 2 or len(ids) != len(X):
        raise ValueError(f"{path}: expected one row of features per subject, got {X.shape} for {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: subject IDs repeat (one row per subject)")
    in_cohort = set(cohort_ids)
    keep = [i for i, s in enumerate(ids) if s in in_cohort]
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
    if labels is not None:
        _warn_label_copies(entry, path, columns, ids, X, labels)
    finite = ok.all(1)
    left_out = [s for s, f in zip(ids, finite) if not f]
    missing_columns = {s: [c for c, good in zip(columns, row) if not good][:5]
                       for s, row, f in zip(ids, ok, finite) if not f}
    if left_out:
        log.warning("%s: %d subject(s) with missing values are left out", path, len(left_out))
        X, ids = X[finite], [s for s, f in zip(ids, finite) if f]
    # a table covering part of the cohort shrinks every set's comparison as much as missing values do
    found = set(ids) | set(left_out)
    no_row = [s for s in cohort_ids if s not in found]
    if no_row:
        log.warning("%s: %d cohort subject(s) have no row and are left out", path, len(no_row))
    if entry.log:
        if (X < 0).any():
            raise ValueError(f"{path}: log=true needs non-negative values")
        X = np.log1p(X)
    huge = np.abs(X) > np.finfo(np.float32).max
    if huge.any():
        # the set is float32: they would become inf there, then NaN in every probe
        wide = [c for c, h in zip(columns, huge.any(0)) if h]
        raise ValueError(f"{path}: column(s) {wide[:5]} hold values beyond float32 (up to {np.abs(X).max():.0e}); "
                         f"rescale them (features entry {entry.name!r})")
    if len(X) > 1 and np.ptp(X, axis=0).max() == 0:
        raise ValueError(f"{path}: every subject has the same features (features entry {entry.name!r}); there is "
                         "nothing to compare")
    prov = {"source": str(path), "source_sha256": file_sha256(path), "columns": columns[:50],
            "n_columns": len(columns), "id_column": entry.id_column, "log": entry.log,
            "left_out_missing_values": left_out, "missing_columns": missing_columns, "left_out_no_row": no_row}
    if entry.fitted_on is not None:
        prov.update({"fitted_on": list(entry.fitted_on), "fitted_labels": list(entry.fitted_labels)})
    return EmbeddingSet(entry.name, ids, X.astype(np.float32), prov, "features", entry)


def _read_npz(path: Path) -> tuple[list[str], np.ndarray]:
    """(IDs, X as float64) of an ``.npz`` of features; refuses what is not an ``ids`` + real ``X`` pair."""
    import zipfile

    ids, X = None, None
    try:
        with np.load(path, allow_pickle=False) as data:
            if "ids" in data and "X" in data:
                ids = [(s.decode() if isinstance(s, bytes) else str(s)).strip() for s in data["ids"].tolist()]
                X = data["X"]
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        # a ValueError: e.g. IDs saved as an object array, which would need pickle (never used here)
        hint = ("; save ids as text (np.asarray(ids, dtype=str)) and X as numbers"
                if isinstance(err, ValueError) else "")
        raise ValueError(f"{path}: cannot read the features .npz ({' '.join(str(err).split())[:120]}){hint}"
                         ) from None
    if X is None:
        raise ValueError(f"{path}: an .npz of features needs arrays 'ids' (N,) and 'X' (N, D)")
    if np.iscomplexobj(X):
        # the cast to float would keep the real part only (with a ComplexWarning on stderr)
        raise ValueError(f"{path}: 'X' holds complex numbers ({X.dtype}); save real features, e.g. the real and "
                         "imaginary parts (or the magnitude) as columns")
    try:
        X = np.asarray(X, dtype=np.float64)
    except ValueError as err:  # text in X
        raise ValueError(f"{path}: cannot read the features .npz ({' '.join(str(err).split())[:120]}); save ids as "
                         "text (np.asarray(ids, dtype=str)) and X as numbers") from None
    if X.ndim != 2:
        raise ValueError(f"{path}: 'X' has shape {X.shape}; expected (subjects, features), e.g. X[:, None] "
                         "for one feature")
    return ids, X


def _read_csv(entry: FeaturesEntry, path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(IDs, X as float64, column names) of a CSV of features, read as manifests are read: the
    delimiter sniffed, decimal commas of a ``;``-separated table, IDs and names without surrounding
    spaces, repeated column names refused (pandas would rename the second ``f1`` to ``f1.1``)."""
    import csv

    import pandas as pd

    from slice2vol.data.manifest import _read_decimal_commas, sniff_delimiter, text_encoding

    try:
        encoding = text_encoding(path)
        sep = sniff_delimiter(path, encoding)
        with open(path, newline="", encoding=encoding) as fh:
            header = [h.strip() for h in next(csv.reader(fh, delimiter=sep), [])]
        table = pd.read_csv(path, sep=sep, encoding=encoding, index_col=False, dtype={entry.id_column: str})
    except (OSError, ValueError, UnicodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read the features CSV ({' '.join(str(err).split())[:120]})") from None
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise ValueError(f"{path}: column name(s) {repeated} appear more than once in the header (spaces around "
                         "names are ignored); rename them")
    table.columns = [str(c).strip() for c in table.columns]
    # rows with every cell empty (a spreadsheet's ";;;" padding) are no subjects
    table = table[~table.map(lambda v: pd.isna(v) or (isinstance(v, str) and not v.strip())).all(axis=1)]
    if entry.id_column not in table.columns:
        raise ValueError(f"{path}: no ID column {entry.id_column!r} (columns: {list(table.columns)[:8]}...); "
                         "set id_column")
    if sep == ";":
        _read_decimal_commas(table, skip=entry.id_column)
    ids = ["" if pd.isna(v) else str(v).strip() for v in table[entry.id_column]]
    columns = entry.columns or [c for c in table.columns if c != entry.id_column and c not in entry.exclude]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found")
    text = table[columns].apply(lambda col: col if pd.api.types.is_numeric_dtype(col)
                                else col.map(lambda v: v.strip() if isinstance(v, str) else v))
    values = text.apply(pd.to_numeric, errors="coerce")
    # a text cell that is not a number, not an empty cell (a missing value: that subject is left out)
    wrong = values.isna() & text.notna() & (text != "")
    bad = [c for c in columns if wrong[c].any()]
    if bad:
        cells = list(dict.fromkeys(str(v) for c in bad[:5] for v in text[c][wrong[c]]))
        hint = ""
        if any(re.search(r"\d,\d", v) for v in cells):
            hint = ("; decimal commas are read only in a column where every cell is a number like 1,5" if sep == ";"
                    else "; decimal commas? write 1.5, or separate the cells with ';' as spreadsheets then do")
        raise ValueError(f"{path}: non-numeric values in column(s) {bad[:5]} (e.g. {cells[:3]}){hint}")
    return ids, values.to_numpy(dtype=np.float64), [str(c) for c in columns]


def _warn_label_copies(entry: FeaturesEntry, path: Path, columns: list[str], ids: list[str], X: np.ndarray,
                       labels) -> None:
    """One warning line per feature column that is a probed label under another name: named like it
    (``Age`` for ``age``), or holding its values (a categorical label recoded one-to-one, a continuous
    one up to scale and offset). Such a column scores its set near-perfectly on that label (tables of
    region volumes often carry the demographics)."""
    rows = labels.reindex(ids)
    for j, column in enumerate(columns):
        for label in map(str, labels.columns):
            name = column.lower()
            if path.suffix != ".npz" and (name == label.lower() or label.lower() in re.split(r"[^a-z0-9]+", name)):
                why = "is named like"
            else:
                y = rows[label]
                both = np.isfinite(X[:, j]) & y.notna().to_numpy()
                if both.sum() < 3 or not _same_information(X[both, j], y[both]):
                    continue
                why = "holds the values of"
            drop = (f"remove it from columns of features entry {entry.name!r}" if entry.columns else
                    f"leave column {j} out of X" if path.suffix == ".npz" else
                    f"exclude it (features entry {entry.name!r}: exclude: [{column}])")
            log.warning("%s: column %r %s the label %r being probed (a copy of the answer); %s", path, column, why,
                        label, drop)


def _same_information(x: np.ndarray, y) -> bool:
    """Whether feature values ``x`` are the label values ``y`` (a Series) in other units or codes:
    a one-to-one recoding of classes that repeat, or (numbers) a line with correlation 1."""
    import pandas as pd

    classes = y.astype(str)
    k = classes.nunique()
    if 1 < k < len(y) and len(set(zip(x.tolist(), classes.tolist()))) == k == len(set(x.tolist())):
        return True
    if not pd.api.types.is_numeric_dtype(y):
        return False
    yv = y.to_numpy(dtype=np.float64)
    with np.errstate(all="ignore"):  # values beyond float32 (refused later) overflow here; they are no label
        if np.ptp(x) == 0 or np.ptp(yv) == 0:
            return False
        r = np.corrcoef(x, yv)[0, 1]
    return bool(abs(r) > 1 - 1e-9)


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
