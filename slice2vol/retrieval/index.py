"""The FAISS index of volume embeddings: build, tune, measure recall, save, load, search.

Similarity is the inner product of L2-normalised vectors (cosine). ``flat`` is exact; ``ivf``
(inverted lists over k-means cells) and ``hnsw`` (navigable small-world graph) are approximate and
are tuned at build time: the search-time knob (``nprobe`` / ``efSearch``) is raised until the
measured recall@k against exact search reaches ``target_recall``, and the whole sweep is stored in
the index metadata so a reader can see what the approximation costs.

Tuning queries are never in the index while it is tuned. A query that is itself indexed finds its
own graph node or cell, whose links lead straight to its neighbours: leave-one-out recall on
indexed vectors promised 0.965 for an HNSW index that reached 0.870 on new scans (issue 17). So the
build holds out ``recall_queries`` vectors (at most a quarter), indexes the rest (IVF k-means is
trained on the rest too), tunes on the held-out ones against exact search over the rest, and only
then adds them: the recall stored with the index is the recall of a scan it has never seen. Users
with their own held-out embeddings pass them as ``tune_queries``.

On disk an index is a folder::

    index.faiss   the FAISS index (vector i is subject ids[i])
    meta.json     ids, config, recall sweep, build time, provenance of the embeddings
    labels.csv    label columns of the indexed subjects (index subject_id)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

from slice2vol.config import from_dict, to_dict

log = logging.getLogger(__name__)
# faiss logs its CPU-feature probing at INFO; that is noise for users of the CLI
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

FORMAT_VERSION = 1
IndexKind = Literal["flat", "ivf", "hnsw"]
# search-time knob sweeps used when tuning (values above the possible maximum are dropped)
NPROBE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class ProvenanceError(ValueError):
    """Embeddings (or a query pipeline) that do not come from the same features as the index."""


@dataclass
class IndexConfig:
    """How the index is built.

    Attributes:
        kind: ``flat`` (exact), ``ivf`` or ``hnsw`` (approximate).
        nlist: IVF cells; ``None`` = ``4 * sqrt(N)``, at most ``N / 39`` (FAISS needs ~39
            training points per cell).
        nprobe: IVF cells visited per query; ``None`` = tuned to ``target_recall``.
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width; ``None`` = tuned to ``target_recall``.
        target_recall: recall@``recall_k`` the tuning aims for, on queries outside the index, with
            95% confidence (one-sided, from the per-query spread of recall).
        recall_k: k of the measured recall.
        recall_queries: how many vectors are held out of the index while it is tuned (at most a
            quarter of them; they are added afterwards).
        train_size: IVF k-means sample size, ``None`` = ``min(N, 64 * nlist)``.
        seed: sampling seed (queries, k-means).
    """

    kind: IndexKind = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None
    target_recall: float = 0.95
    recall_k: int = 10
    recall_queries: int = 1000
    train_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index kind must be flat, ivf or hnsw, got {self.kind!r}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        # FAISS asserts (aborting the process), loops or silently returns nothing on these
        for name, low in (("nlist", 1), ("nprobe", 1), ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1),
                          ("recall_k", 1), ("recall_queries", 1), ("train_size", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def normalize_rows(x: np.ndarray, ids: Sequence[str] | None = None, where: str = "") -> np.ndarray:
    """(N, D) -> float32 (N, D) with unit L2 rows; a zero row is an error (it has no direction).

    ``ids`` and ``where`` (e.g. ``"feats.h5: volume embeddings 'mean'"``) only make the errors name
    the subjects and their source.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    prefix = f"{where}: " if where else ""
    if x.ndim != 2:
        raise ValueError(f"{prefix}expected a (N, D) array of embeddings, got shape {x.shape}")

    def named(rows: np.ndarray) -> str:
        return f" (e.g. {', '.join(str(ids[i]) for i in np.flatnonzero(rows)[:3])})" if ids is not None else ""

    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"{prefix}{int(bad.sum())} embedding(s) contain NaN/Inf{named(bad)}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(f"{prefix}{int(zero.sum())} embedding(s) are all zeros{named(zero)}; cosine is undefined")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


#: k-means points per IVF cell below which FAISS warns (ClusteringParameters.min_points_per_centroid)
FAISS_MIN_POINTS = 39


def default_nlist(n: int) -> int:
    return int(max(1, min(round(4 * math.sqrt(n)), n // FAISS_MIN_POINTS)))


def recall_per_query(approx: np.ndarray, exact: np.ndarray, k: int) -> np.ndarray:
    """(Q,) fraction of each query's exact top-k found in its approximate top-k; rows of (Q, >=k) ids."""
    hits = [len(set(a[:k]) & set(e[:k])) for a, e in zip(approx.tolist(), exact.tolist())]
    return np.asarray(hits, dtype=np.float64) / k


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k, rows of (Q, >=k) ids."""
    return float(recall_per_query(approx, exact, k).mean())


def set_search_param(index: Any, kind: str, value: int | None) -> None:
    """Sets ``nprobe`` (IVF) or ``efSearch`` (HNSW) on a FAISS index; nothing for flat."""
    if value is None or kind == "flat":
        return
    if kind == "ivf":
        index.nprobe = int(value)
    else:
        index.hnsw.efSearch = int(value)


def holdout_split(n: int, cfg: IndexConfig) -> np.ndarray:
    """Sorted positions held out of the index while it is tuned (seeded): ``min(recall_queries, n // 4)``.

    Flat indexes need no tuning: nothing is held out.
    """
    m = 0 if cfg.kind == "flat" else min(cfg.recall_queries, n // 4)
    rng = np.random.default_rng(cfg.seed + 1)
    return np.sort(rng.choice(n, m, replace=False)) if m else np.empty(0, dtype=np.int64)


def move_to_end(x: np.ndarray, ids: list[str], held: np.ndarray) -> None:
    """Swaps the rows ``held`` of ``x`` (and their ``ids``) into the last ``len(held)`` places, in place.

    In place because at 10^6 x 384 a reordered copy is another 1.5 GB; ``x[:-m]`` is then the part
    indexed first and ``x[-m:]`` the held-out queries, both views.
    """
    n, m = len(x), len(held)
    held_set = set(held.tolist())
    front = [int(h) for h in held if h < n - m]             # held rows not yet at the end
    free = [t for t in range(n - m, n) if t not in held_set]  # end rows that are not held
    for h, t in zip(front, free):
        x[[h, t]] = x[[t, h]]
        ids[h], ids[t] = ids[t], ids[h]


def create_faiss(x: np.ndarray, cfg: IndexConfig) -> tuple[Any, dict]:
    """An empty FAISS inner-product index, trained on ``x`` where the kind needs training (IVF).

    Args:
        x: float32 (N, D) unit rows to train on (the vectors indexed first); the default ``nlist``
            follows N.
        cfg: index options.

    Returns:
        (index, dict of resolved build parameters and the training time).
    """
    import faiss

    n, dim = x.shape
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "ivf":
        nlist = cfg.nlist or default_nlist(n)
        if nlist > n:
            raise ValueError(f"nlist={nlist} is larger than the {n} vectors to train on")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.seed
        train_n = min(n, cfg.train_size or 64 * nlist)
        rng = np.random.default_rng(cfg.seed)
        sample = x if train_n == n else x[np.sort(rng.choice(n, train_n, replace=False))]
        index.cp.max_points_per_centroid = max(1, math.ceil(train_n / nlist))  # no silent resampling
        if train_n < FAISS_MIN_POINTS * nlist:
            # FAISS would print its own multi-line warning to stderr from C++; a default nlist only gets
            # here below 39 vectors (one cell: nothing to place), a chosen one is told in one line
            if cfg.nlist:
                log.warning("IVF nlist=%d trained on %d vectors (fewer than %d per cell, FAISS's minimum): the "
                            "cells are poorly placed; a smaller --nlist or --kind flat fits this size",
                            nlist, train_n, FAISS_MIN_POINTS)
            index.cp.min_points_per_centroid = max(1, train_n // nlist)
        index.train(sample)
        info.update(nlist=nlist, train_size=train_n)
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        info.update(hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction)
    info["train_s"] = time.perf_counter() - start
    return index, info


def build_faiss(x: np.ndarray, cfg: IndexConfig) -> tuple[Any, dict]:
    """Builds (and trains) a FAISS inner-product index on all of ``x``, untuned.

    Args:
        x: float32 (N, D), unit rows.
        cfg: index options.

    Returns:
        (index, dict of resolved build parameters and timings).
    """
    start = time.perf_counter()
    index, info = create_faiss(x, cfg)
    index.add(x)
    if cfg.kind == "ivf":
        index.make_direct_map()  # so vectors can be read back by position (query by subject ID)
    info["build_s"] = time.perf_counter() - start
    return index, info


def tune_search_param(index: Any, indexed: np.ndarray, queries: np.ndarray, cfg: IndexConfig) -> dict:
    """Sweeps the search knob and measures recall@k of ``queries`` against exact search over ``indexed``.

    ``queries`` must not be in the index (held-out or new vectors): that is what makes the recall
    the one a new scan gets. The knob is set to ``cfg.nprobe`` / ``cfg.ef_search`` when given,
    else to the smallest swept value whose recall reaches ``target_recall`` with 95% confidence
    (recall minus 1.645 standard errors of the per-query recall).

    Args:
        index: the FAISS index holding exactly ``indexed``, in order.
        indexed: float32 (N, D) unit rows in the index.
        queries: float32 (Q, D) unit rows not in the index.
        cfg: index options.

    Returns:
        ``dict(param, value, recall, recall_se, k, query_ms, queries, sweep=[{value, recall, recall_se,
        query_ms}])``; for ``flat`` recall is 1 by construction.
    """
    import faiss

    k = min(cfg.recall_k, len(indexed))
    if cfg.kind == "flat" or k < 1 or len(queries) == 0:
        return {"param": None, "value": None, "recall": 1.0 if cfg.kind == "flat" else None, "k": k,
                "queries": int(len(queries)), "sweep": []}
    _, truth = faiss.knn(queries, indexed, k, metric=faiss.METRIC_INNER_PRODUCT)  # exact, without a copy
    param = "nprobe" if cfg.kind == "ivf" else "ef_search"
    fixed = cfg.nprobe if cfg.kind == "ivf" else cfg.ef_search
    if fixed is not None:
        grid = [fixed]
    elif cfg.kind == "ivf":
        grid = [v for v in NPROBE_GRID if v < index.nlist] + [index.nlist]
    else:
        grid = [v for v in EF_SEARCH_GRID if v >= k]
    sweep = []
    chosen = None
    for value in grid:
        set_search_param(index, cfg.kind, value)
        start = time.perf_counter()
        _, found = index.search(queries, k)
        ms = 1000 * (time.perf_counter() - start) / len(queries)
        per_query = recall_per_query(found, truth, k)
        rec = float(per_query.mean())
        se = float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
        sweep.append({"value": int(value), "recall": rec, "recall_se": se, "query_ms": ms})
        if chosen is None and rec - 1.645 * se >= cfg.target_recall:
            chosen = sweep[-1]
            if fixed is None:
                break
    if chosen is None:
        chosen = sweep[-1]
        if fixed is None:
            log.warning("%s: recall@%d %.3f < target %.2f even at %s=%d", cfg.kind, k, chosen["recall"],
                        cfg.target_recall, param, chosen["value"])
    set_search_param(index, cfg.kind, chosen["value"])
    return {"param": param, "value": chosen["value"], "recall": chosen["recall"], "recall_se": chosen["recall_se"],
            "k": k, "query_ms": chosen["query_ms"], "queries": int(len(queries)), "sweep": sweep}


def array_sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


#: hex digits kept of each row's sha256: the digests are compared per subject ID, never searched for
#: a collision, so 64 bits are plenty and keep meta.json small (17 bytes a subject)
ROW_DIGEST_HEX = 16


def row_digests(x: np.ndarray) -> list[str]:
    """A short sha256 of each row's float32 bytes: what the index records of every subject's vector
    as the store held it, so that a store re-aggregated since can be recognised subject by subject."""
    rows = np.ascontiguousarray(x, dtype=np.float32)
    return [hashlib.sha256(row.tobytes()).hexdigest()[:ROW_DIGEST_HEX] for row in rows]


@dataclass
class Index:
    """Volume embeddings of a cohort in a FAISS index, with subject IDs, labels and provenance.

    Build from arrays with :meth:`build`, from a feature store with :meth:`from_store`, or read a
    saved one with :meth:`load`. Search with :meth:`search` (vectors), :meth:`search_subject` (an
    indexed ID) or :meth:`search_nifti` (a new scan, embedded like the indexed ones).

    Attributes:
        faiss_index: the FAISS index; vector i is ``ids[i]``.
        ids: subject IDs in index order.
        labels: DataFrame indexed by subject_id (may have no columns).
        label_types: label column -> ``categorical`` | ``continuous``.
        provenance: where the embeddings come from (store, feature set, encoder, aggregator).
        config: the :class:`IndexConfig` used.
        stats: build timings, dimension, tuned search parameter and measured recall.
    """

    faiss_index: Any
    ids: list[str]
    labels: pd.DataFrame
    label_types: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    config: IndexConfig = field(default_factory=IndexConfig)
    stats: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self._position = {sid: i for i, sid in enumerate(self.ids)}
        if len(self._position) != len(self.ids):
            dupes = sorted({s for s in self.ids if self.ids.count(s) > 1})
            raise ValueError(f"duplicate subject IDs in the index: {dupes[:5]}")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str],
        *,
        labels: pd.DataFrame | None = None,
        label_types: dict[str, str] | None = None,
        provenance: dict[str, Any] | None = None,
        config: IndexConfig | None = None,
        tune_queries: np.ndarray | None = None,
    ) -> "Index":
        """Indexes (N, D) embeddings of subjects ``ids`` (rows are L2-normalised first).

        Approximate kinds hold ``config.recall_queries`` vectors out while they are tuned (see the
        module docstring), so ``ids`` end up in index order, not input order (``index.ids``).

        Args:
            embeddings: (N, D) volume embeddings.
            ids: N subject IDs.
            labels: optional label table indexed by subject_id (rows are matched by ID).
            label_types: optional label column -> kind.
            provenance: how the embeddings were made (kept in the metadata, checked on queries).
            config: index kind and parameters.
            tune_queries: optional (Q, D) embeddings that are not among ``embeddings`` (e.g. another
                site's scans) to tune on instead of held-out vectors.
        """
        cfg = config or IndexConfig()
        ids = [str(i) for i in ids]
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} IDs for {len(embeddings)} embeddings")
        digest_of = dict(zip(ids, row_digests(embeddings)))  # of the vectors as given, before normalising
        where = ""  # errors name the store and set when the provenance says (Index.from_store)
        store_path = ((provenance or {}).get("store") or {}).get("path")
        set_name = ((provenance or {}).get("embeddings") or {}).get("name")
        if store_path and set_name:
            where = f"{Path(store_path).name}: volume embeddings {set_name!r}"
        if len(ids) == 0:
            raise ValueError(f"{where or 'index'}: no embeddings to index")
        x = normalize_rows(embeddings, ids, where)
        start = time.perf_counter()
        if tune_queries is not None:  # the caller's own fresh queries: index everything, then tune
            queries = normalize_rows(np.atleast_2d(tune_queries))
            if queries.shape[1] != x.shape[1]:
                raise ValueError(f"tune_queries have dimension {queries.shape[1]}, the embeddings {x.shape[1]}")
            index, build_info = build_faiss(x, cfg)
            tune_start = time.perf_counter()
            tuning = {**tune_search_param(index, x, queries, cfg), "method": "given queries"}
            tune_end = time.perf_counter()
        else:
            # held-out tuning: index all but the held-out vectors, tune on them, then add them
            held = holdout_split(len(ids), cfg)
            move_to_end(x, ids, held)  # x is our own normalised copy; ids now follow index order
            first, last = x[:len(ids) - len(held)], x[len(ids) - len(held):]
            index, build_info = create_faiss(first, cfg)
            index.add(first)
            tune_start = time.perf_counter()
            tuning = {**tune_search_param(index, first, last, cfg), "method": "held out of the index"}
            tune_end = time.perf_counter()
            index.add(last)
            if cfg.kind == "ivf":
                index.make_direct_map()  # so vectors can be read back by position (query by subject ID)
            build_info["build_s"] = time.perf_counter() - start - (tune_end - tune_start)
        build_info["total_s"] = time.perf_counter() - start
        build_info["tune_s"] = build_info["total_s"] - build_info["build_s"]
        if labels is None:
            table = pd.DataFrame(index=pd.Index(ids, name="subject_id"))
        else:
            table = labels.copy()
            table.index = table.index.astype(str)
            table = table.reindex(ids)
            table.index.name = "subject_id"
        prov = dict(provenance or {})
        prov.setdefault("vectors_sha256", array_sha256(embeddings))
        prov["row_sha256"] = [digest_of[i] for i in ids]  # index order, like meta.json's ids
        stats = {"n": len(ids), "dim": int(x.shape[1]), "metric": "cosine (inner product of unit vectors)",
                 **build_info, "tuning": tuning}
        log.info("built %s index of %d x %d in %.2f s (%s)", cfg.kind, len(ids), x.shape[1],
                 build_info["build_s"], _recall_text(tuning))
        return cls(index, ids, table, dict(label_types or {}), prov, cfg, stats)

    @classmethod
    def from_store(
        cls,
        store: Any,
        embeddings: str,
        *,
        config: IndexConfig | None = None,
        manifest: str | Path | None = None,
    ) -> "Index":
        """Indexes the volume-embedding set ``embeddings`` of a feature store.

        Args:
            store: a path to the HDF5 store or an open :class:`slice2vol.cache.FeatureStore`.
            embeddings: name of the volume-embedding set (``FeatureStore.volume_embedding_names()``).
            config: index options.
            manifest: optional cohort manifest; its image paths are remembered for galleries, and its
                labels replace the store's (those of the first caching: the manifest is what the user
                states now).

        Raises:
            StoreMismatch: the manifest names other input files for indexed subjects than the store
                cached (their fingerprints differ).
        """
        from slice2vol.retrieval.provenance import store_provenance

        store = _open_store(store)
        names = store.volume_embedding_names()
        if embeddings not in names:
            raise KeyError(f"{_store_name(store)}: no volume embeddings named {embeddings!r}; "
                           f"available: {', '.join(names) or 'none (run slice2vol aggregate first)'}")
        ids, x, _ = store.volume_embeddings(embeddings)
        labels = _store_labels(store)
        label_types = dict(getattr(store, "label_types", {}) or {})
        prov = store_provenance(store, embeddings)
        extent = _cohort_extent(store, ids)
        if extent:
            prov["cohort_extent_mm"] = extent
        if manifest is not None:
            from slice2vol.data.manifest import load_manifest

            from slice2vol.cache import StoreMismatch
            from slice2vol.eval.sets import changed_inputs

            cohort = load_manifest(manifest)
            # a manifest naming other files for the store's subjects would show, label and exclude (search
            # --exclude-self) by files the features were not made from: the query's own scan came first
            changed = changed_inputs(store, _store_name(store), cohort)
            if changed:
                raise StoreMismatch(
                    f"{manifest}: {len(changed)} indexed subject(s) have other input files than the store cached "
                    f"({'; '.join(list(changed.values())[:2]).replace(': cache it again', '')}"
                    f"{'; ...' if len(changed) > 2 else ''}): give the manifest the store was cached from, or "
                    "cache these subjects again")
            prov["images"] = _manifest_images(cohort)
            prov["manifest"] = str(Path(manifest).resolve())
            # the store's labels are those of its first caching; a corrected manifest must win (one that
            # names no label column only gives images and leaves the store's labels)
            if cohort.label_types:
                labels, label_types = cohort.labels(), dict(cohort.label_types)
            absent = [str(i) for i in ids if str(i) not in prov["images"]]
            if absent:  # another cohort's manifest, or rows it left out: one line naming them
                log.warning("%s: holds the images of %d of the %d indexed subjects; the others (%s) have no %simage "
                            "in search results and galleries", manifest, len(ids) - len(absent), len(ids),
                            _some(absent), "labels and no " if cohort.label_types else "")
        return cls.build(x, ids, labels=labels, label_types=label_types, provenance=prov, config=config)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Writes ``index.faiss``, ``meta.json`` and ``labels.csv`` into ``directory``."""
        import faiss

        from slice2vol.data.io import file_sha256

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(directory / "index.faiss"))
        self.labels.to_csv(directory / "labels.csv")
        meta = {
            "format_version": FORMAT_VERSION,
            "faiss_version": faiss.__version__,
            # load() compares: an index.faiss replaced or damaged after the build is refused, not searched
            "index_sha256": file_sha256(directory / "index.faiss"),
            "labels_sha256": file_sha256(directory / "labels.csv"),
            "dim": int(self.faiss_index.d),
            "config": to_dict(self.config),
            "stats": self.stats,
            "label_types": self.label_types,
            "provenance": self.provenance,
            "ids": self.ids,
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Index":
        """Reads an index folder written by :meth:`save`."""
        import faiss

        from slice2vol.data.io import file_sha256

        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not directory.exists():
            raise FileNotFoundError(f"{directory}: no such index folder; build one with 'slice2vol index build'")
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: not an index folder (no meta.json); "
                                    f"build one with 'slice2vol index build'")
        _check_regular(meta_path)
        try:
            meta = json.loads(meta_path.read_text())
            # an edited file may hold other JSON types: each is what `save` writes, or this is no index of ours
            expected = {"config": dict, "ids": list, "stats": dict, "provenance": dict, "labels_sha256": str,
                        "label_types": dict}
            if not isinstance(meta, dict):
                raise TypeError(f"a JSON {_json_kind(meta)}, not an object")
            wrong = [f"{key} is a JSON {_json_kind(meta[key])}" for key, kind in expected.items()
                     if key in meta and meta[key] is not None and not isinstance(meta[key], kind)]
            if wrong:
                raise TypeError(", ".join(wrong))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{directory}: index format {meta.get('format_version')} is not "
                                 f"{FORMAT_VERSION}; rebuild it with this version of slice2vol")
            meta["ids"], meta["stats"]  # noqa: B018 - present, or the folder is not one we wrote
            try:
                cfg = from_dict(IndexConfig, meta["config"])
            except ValueError as err:  # e.g. kind 'annoy': the file's fault, so the file is named
                raise TypeError(str(err)) from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: not a readable index description ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:100]}); rebuild the index") from None
        faiss_path = directory / "index.faiss"
        if not faiss_path.exists():
            raise FileNotFoundError(f"{faiss_path}: missing; rebuild the index with 'slice2vol index build'")
        _check_regular(faiss_path)
        if meta.get("index_sha256") and file_sha256(faiss_path) != meta["index_sha256"]:
            raise ValueError(f"{faiss_path}: not the file this index was built with (sha256 differs from "
                             f"meta.json): replaced or damaged; rebuild the index")
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as err:
            raise ValueError(f"{faiss_path}: unreadable FAISS index ({' '.join(str(err).split())[:120]}); "
                             "rebuild the index") from None
        if meta.get("dim") is not None and int(index.d) != int(meta["dim"]):
            raise ValueError(f"{faiss_path}: holds {index.d}-d vectors, meta.json says {meta['dim']}; rebuild the index")
        if index.ntotal != len(meta["ids"]):
            raise ValueError(f"{directory}: index.faiss holds {index.ntotal} vectors but meta.json "
                             f"lists {len(meta['ids'])} IDs")
        if cfg.kind == "ivf":
            index.make_direct_map()
        set_search_param(index, cfg.kind, (meta["stats"].get("tuning") or {}).get("value"))
        labels_path = directory / "labels.csv"
        if labels_path.exists():
            _check_regular(labels_path)
        if meta.get("labels_sha256") and labels_path.is_file() and file_sha256(labels_path) != meta["labels_sha256"]:
            # a cut or edited table would show neighbours with missing or wrong labels
            raise ValueError(f"{labels_path}: not the file this index was built with (sha256 differs from "
                             "meta.json: cut or edited?); rebuild the index")
        try:
            labels = pd.read_csv(directory / "labels.csv", dtype={"subject_id": str}, keep_default_na=True)
            labels = labels.set_index("subject_id")  # IDs stay strings ("007" must not become 7)
        except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise ValueError(f"{directory / 'labels.csv'}: unreadable ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:100]}); rebuild the index") from None
        return cls(index, [str(i) for i in meta["ids"]], labels, meta.get("label_types", {}),
                   meta.get("provenance", {}), cfg, meta.get("stats", {}), directory)

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._position

    def vector(self, subject_id: str) -> np.ndarray:
        """The stored unit vector (D,) of an indexed subject."""
        if subject_id not in self._position:
            close = [s for s in self.ids if str(subject_id).lower() in s.lower()][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"subject {subject_id!r} is not in the index ({len(self)} subjects){hint}")
        return self.faiss_index.reconstruct(self._position[subject_id])

    def search_arrays(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: (Q, D) queries -> (similarities (Q, k), positions (Q, k)), -1 where missing."""
        q = normalize_rows(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ProvenanceError(f"query embedding has dimension {q.shape[1]}, the index has {self.dim}")
        from slice2vol.runtime import faiss_blas_for

        with faiss_blas_for(len(q)):  # a batch of queries: one matrix product, not a loop per query
            return self.faiss_index.search(q, min(k, len(self)))

    def search(self, queries: np.ndarray, k: int = 10, *, query_ids: Sequence[str] | None = None,
               exclude_self: bool = False) -> pd.DataFrame:
        """Top-k neighbours of one (D,) or several (Q, D) query vectors.

        Args:
            queries: (D,) or (Q, D) embeddings made like the indexed ones.
            k: neighbours per query.
            query_ids: names of the queries for the ``query`` column (default ``q0``, ``q1``, ...).
            exclude_self: drop a neighbour whose ID equals the query ID.

        Returns:
            DataFrame with columns ``query, rank, subject_id, similarity`` and the label columns,
            ``rank`` starting at 1, sorted by query then rank.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (neighbours per query), got {k!r}")
        q = np.atleast_2d(queries)
        names = [f"q{i}" for i in range(len(q))] if query_ids is None else [str(s) for s in query_ids]
        sims, pos = self.search_arrays(q, k + int(exclude_self))
        rows = []
        for name, sim_row, pos_row in zip(names, sims, pos):
            rank = 0
            for sim, p in zip(sim_row, pos_row):
                if p < 0 or (exclude_self and self.ids[p] == name) or rank == k:
                    continue
                rank += 1
                rows.append({"query": name, "rank": rank, "subject_id": self.ids[p], "similarity": float(sim)})
        table = pd.DataFrame(rows, columns=["query", "rank", "subject_id", "similarity"])
        if len(self.labels.columns):
            table = table.join(self.labels, on="subject_id")
        return table

    def search_subject(self, subject_id: str, k: int = 10) -> pd.DataFrame:
        """Neighbours of an indexed subject (itself first, similarity 1)."""
        return self.search(self.vector(subject_id), k, query_ids=[subject_id])

    def search_nifti(self, path: str | Path | Sequence[str | Path] | dict, k: int = 10, *,
                     embedder: Any = None, **embedder_kwargs: Any) -> pd.DataFrame:
        """Neighbours of a new scan, embedded through the indexed set's own pipeline.

        Args:
            path: the NIfTI file (or modality -> file mapping for multi-channel cohorts).
            k: neighbours.
            embedder: a :class:`slice2vol.retrieval.embed.VolumeEmbedder`; by default one is built
                from the index provenance (``embedder_kwargs`` go to it: ``weights``, ``device``...).

        Raises:
            ProvenanceError: the pipeline cannot be rebuilt exactly (weights differ, unknown
                aggregator, ...).
        """
        from slice2vol.retrieval.embed import VolumeEmbedder

        embedder = embedder or VolumeEmbedder.from_provenance(self.provenance, **embedder_kwargs)
        embedder.check_against(self.provenance)
        name = Path(path).name if isinstance(path, (str, Path)) else "query"
        if hasattr(embedder, "embed_with_extent"):
            vector, extent = embedder.embed_with_extent(path)
            note = self.extent_note(extent)
            if note:
                log.warning("%s: %s", name, note)
        else:
            vector = embedder.embed(path)
        return self.search(vector, k, query_ids=[name])

    def extent_note(self, extent: dict[str, float]) -> str | None:
        """A note when a query's kept slices span far less or more than the indexed scans' (plane -> mm),
        or None: a half head, a cropped brain or a label map is embedded and ranked like a whole scan,
        and its neighbours say little. The cohort's range is recorded at build (``cohort_extent_mm``)."""
        cohort = self.provenance.get("cohort_extent_mm") or {}
        far = [(plane, mm, cohort[plane]) for plane, mm in extent.items() if plane in cohort
               and not EXTENT_RATIO[0] * cohort[plane][0] <= mm <= EXTENT_RATIO[1] * cohort[plane][1]]
        if not far:
            return None
        spans = ", ".join(f"{mm:.0f} mm {plane} (indexed scans: {lo:.0f}-{hi:.0f} mm)" for plane, mm, (lo, hi) in far)
        return (f"its slices with foreground span {spans}: a partial field of view or another kind of image? "
                "Its neighbours may mean little")

    def search_store(self, store: Any, subject_id: str, k: int = 10, embeddings: str | None = None) -> pd.DataFrame:
        """Neighbours of a subject whose embedding lives in another store of the same provenance.

        Raises:
            ProvenanceError: the store's features or aggregation differ from the index's.
        """
        from slice2vol.retrieval.provenance import check_compatible, store_provenance

        store = _open_store(store)
        name = embeddings or self.provenance.get("embeddings", {}).get("name")
        if name not in store.volume_embedding_names():
            raise ProvenanceError(f"{_store_name(store)}: no volume embeddings named {name!r} "
                                  f"(the index was built from {name!r})")
        check_compatible(self.provenance, store_provenance(store, name))
        ids, x, _ = store.volume_embeddings(name)
        self.check_unchanged(store, name, ids, x)
        if subject_id not in ids:
            raise KeyError(f"subject {subject_id!r} is not in {_store_name(store)}")
        return self.search(x[ids.index(subject_id)], k, query_ids=[subject_id])

    def changed_subjects(self, ids: Sequence[str], x: np.ndarray) -> tuple[list[str], list[str]] | None:
        """(indexed subjects whose vector in ``ids``/``x`` differs from the indexed one, indexed subjects
        absent from ``ids``), in index order; None for an index built without per-subject digests."""
        digests = self.provenance.get("row_sha256")
        if not isinstance(digests, list) or len(digests) != len(self.ids):
            # an older index: only the whole set's hash (in the store's row order) can say "unchanged"
            return ([], []) if self.provenance.get("vectors_sha256") == array_sha256(x) else None
        now = dict(zip((str(i) for i in ids), row_digests(x)))
        changed = [sid for sid, d in zip(self.ids, digests) if sid in now and now[sid] != d]
        return changed, [sid for sid in self.ids if sid not in now]

    def check_unchanged(self, store: Any, embeddings: str | None = None, ids: Sequence[str] | None = None,
                        x: np.ndarray | None = None, *, always: bool = False) -> bool:
        """Refuses a store whose embeddings of indexed subjects changed since the index was built.

        A subject cached again (its scan replaced) and the set aggregated again pass every provenance
        check: same encoder, features and aggregator. Searching then ranks the store's new vector
        against the index's old one (the subject finds its own stale entry at 0.9999). The index keeps
        a short sha256 of every vector it indexed (:func:`row_digests`); they are compared here.

        Only the store the index was built from is compared (the same file, or a copy of it: a store
        holding an indexed subject's vector bit for bit), unless ``always``: another cohort's store
        may reuse subject IDs (``sub-01``) for other scans. An index built before the digests were
        recorded gets one warning that this cannot be checked.

        Args:
            store: the store (path or open :class:`slice2vol.cache.FeatureStore`).
            embeddings: the set name (default: the indexed one).
            ids, x: the set as already read from ``store`` (read here when not given).
            always: compare whichever store this is (``slice2vol index info --store``).

        Returns:
            True when the indexed subjects' vectors were compared and are unchanged; False when nothing
            was compared (another store, or an older index without digests).

        Raises:
            ProvenanceError: ``"<store>: embeddings 'mean' changed since <index> was built (1 subject:
                IXI052-HH-1343); rebuild the index (slice2vol index build ...)"``.
        """
        store = _open_store(store)
        name = embeddings or self.provenance.get("embeddings", {}).get("name")
        if ids is None or x is None:
            ids, x, _ = store.volume_embeddings(name)
        where = self.path or "the index"
        found = self.changed_subjects(ids, x)
        same_file = _same_file(_store_name(store), ((self.provenance.get("store") or {}).get("path")))
        if found is None:
            if same_file or always:
                log.warning("%s: built without per-subject digests of its vectors (an older slice2vol): whether "
                            "%s's embeddings %r changed since cannot be checked; rebuild the index to have it "
                            "checked", where, _store_name(store), name)
            return False
        changed, gone = found
        if not (same_file or always):
            # another file: a copy of the indexed store shows itself by an unchanged indexed vector;
            # subjects it lacks are not news (a store of part of the cohort)
            copy = len(changed) < len(self.ids) - len(gone)
            if not copy:
                return False
            gone = []
        if not (changed or gone):
            return True
        parts = []
        if changed:
            parts.append(f"{len(changed)} subject{'s' if len(changed) > 1 else ''}: {_some(changed)}")
        if gone:
            parts.append(f"{len(gone)} no longer in the store: {_some(gone)}")
        raise ProvenanceError(f"{_store_name(store)}: embeddings {name!r} changed since {where} was built "
                              f"({'; '.join(parts)}); rebuild the index ({self._rebuild_command(store, name)})")

    def _rebuild_command(self, store: Any, embeddings: str) -> str:
        import shlex

        words = ["slice2vol", "index", "build", "--store", _store_name(store), "--embeddings", embeddings,
                 "--out", str(self.path or "INDEX")]
        if self.provenance.get("manifest"):
            words += ["--manifest", str(self.provenance["manifest"])]
        if self.config.kind != "flat":
            words += ["--kind", self.config.kind]
        return " ".join(shlex.quote(w) for w in words)

    def image_paths(self, subject_id: str) -> dict[str, str] | None:
        """Image file(s) of an indexed subject when known (for galleries), else None."""
        images = self.provenance.get("images") or {}
        return images.get(subject_id)

    def describe(self) -> str:
        tuning = self.stats.get("tuning", {})
        knob = f", {tuning['param']}={tuning['value']}" if tuning.get("param") else ""
        emb = self.provenance.get("embeddings", {})
        return (f"{self.config.kind} index of {len(self)} subjects x {self.dim} dims{knob}; "
                f"{_recall_text(tuning)}; embeddings "
                f"{emb.get('name', '?')!r} of {self.provenance.get('store', {}).get('path', '?')}")


# -- helpers ------------------------------------------------------------------------------------

def _recall_text(tuning: dict) -> str:
    if tuning.get("recall") is None:
        return "recall not measured (too few vectors to hold any out)"
    if tuning.get("param") is None:
        return f"recall@{tuning.get('k')} 1.000 (exact)"
    return (f"recall@{tuning.get('k')} {tuning['recall']:.3f} on {tuning.get('queries')} queries outside the "
            f"index")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


#: a query's extent outside (low * the cohort's smallest, high * its largest) gets a note
EXTENT_RATIO = (0.75, 1.33)
#: indexed subjects whose slice positions are read to record the cohort's extent (a seeded sample)
EXTENT_SAMPLE = 200


def _cohort_extent(store: Any, ids: Sequence[str]) -> dict[str, list[float]] | None:
    """plane -> [smallest, largest] mm spanned by the kept slices of (a sample of) the indexed subjects,
    from the store's slice positions; None when the store has none (embeddings from a 3D encoder)."""
    from slice2vol.retrieval.embed import slice_extent_mm

    rng = np.random.default_rng(0)
    sample = [ids[i] for i in np.sort(rng.choice(len(ids), min(len(ids), EXTENT_SAMPLE), replace=False))]
    extent: dict[str, list[float]] = {}
    try:
        for plane in getattr(store, "planes", None) or []:
            cached = set(store.subjects(plane))
            spans = [slice_extent_mm(store.slice_meta(sid, plane)["positions"]) for sid in sample if sid in cached]
            if spans:
                extent[plane] = [round(min(spans), 1), round(max(spans), 1)]
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as err:
        log.debug("no cohort extent recorded: %s", err)
        return None
    return extent or None


def _some(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def _same_file(a: str | Path | None, b: str | Path | None) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).samefile(b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _check_regular(path: Path) -> None:
    """ValueError naming ``path`` when it is not a regular file: reading a named pipe (or hashing it)
    would wait for a writer for ever, a device never end."""
    from slice2vol.data.io import file_problem

    problem = file_problem(path)
    if problem:
        raise ValueError(f"{path}: {'a directory, not a file' if path.is_dir() else problem}")


def _open_store(store: Any) -> Any:
    if isinstance(store, (str, Path)):
        from slice2vol.cache import FeatureStore

        if not Path(store).exists():
            raise FileNotFoundError(f"{store}: feature store not found")
        if not Path(store).is_dir():  # a store being written may be a folder of parts
            _check_regular(Path(store))
        return FeatureStore(store, mode="r")
    return store


def _store_name(store: Any) -> str:
    return str(getattr(store, "path", store))


def _store_labels(store: Any) -> pd.DataFrame | None:
    try:
        labels = store.labels()
    except (AttributeError, KeyError):
        return None
    return labels if isinstance(labels, pd.DataFrame) else None


def _manifest_images(cohort: Any) -> dict[str, dict[str, str]]:
    """subject -> modality -> resolved image path, of a loaded manifest's usable rows."""
    return {s.subject_id: {m: str(Path(p).resolve()) for m, p in s.images.items()} for s in cohort.subjects}


def _json_kind(value: Any) -> str:
    """JSON's own name of a parsed value's type (``null``, ``array``, ...), for messages about a file."""
    for kind, name in ((type(None), "null"), (bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"),
                       ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
