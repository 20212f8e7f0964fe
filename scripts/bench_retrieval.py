#!/usr/bin/env python
"""The shipped retrieval ``Index`` with its own parameters: build time, query time and recall@k on new queries.

Each approximate kind is built exactly as ``slice2vol index build --kind ivf|hnsw`` builds it
(``Index.build`` with ``IndexConfig`` defaults unless a flag overrides one): the search knob
(nprobe / efSearch) is tuned on vectors held out of the index, and that tuned recall is what the
index promises (``meta.json``). Then the recall is measured on *new* evaluation queries: fresh
draws of the same vector model, never indexed, as a new scan would be. Both are printed.

Vectors are shaped like real embeddings, never isotropic noise (on which no approximate index
reaches useful recall): with ``--store`` a PCA + Gaussian-mixture model is fitted to the store's
volume embeddings and sampled; otherwise a seeded clustered low-rank mixture
(:func:`slice2vol.retrieval.synthetic.clustered_embeddings`).

Query time is measured two ways, exact and approximate search interleaved (A B A B, best of
``--repeats``): per query over a batch of ``--timing-queries``, and one query at a time (the
latency of a single new scan's search, median).

Examples:
    python scripts/bench_retrieval.py --sizes 10000 100000 --dims 384 768 1280
    python scripts/bench_retrieval.py --sizes 300000 --dims 384          # the acceptance case
    python scripts/bench_retrieval.py --sizes 1000000 --dims 384         # the 1M target
    python scripts/bench_retrieval.py --store ixi.h5 --embeddings mean --sizes 100000
    python scripts/bench_retrieval.py --sizes 0 --index ixi-index --nifti new_T1.nii.gz
    python scripts/bench_retrieval.py --sizes 0 --index ixi-index --neighbours 5   # label agreement
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slice2vol.retrieval import Index, IndexConfig, recall_at_k  # noqa: E402
from slice2vol.retrieval.synthetic import FittedMixture, clustered_embeddings  # noqa: E402
from slice2vol.runtime import faiss_blas_for  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def make_vectors(n: int, dim: int, n_queries: int, args, model: FittedMixture | None):
    """(indexed (n, dim), new queries (n_queries, dim)): one draw, split, so queries are never indexed."""
    total = n + n_queries
    if model is not None:
        x = model.sample(total, seed=args.seed)
    else:
        x = clustered_embeddings(total, dim, n_clusters=args.clusters, rank=args.rank, seed=args.seed)
    return x[:n], x[n:]


def interleaved_ms(exact, index: Index, queries: np.ndarray, k: int, repeats: int, singles: int
                   ) -> dict[str, float]:
    """ms/query of exact and approximate search, A B A B: batched (best of repeats) and one at a time (median)."""
    out: dict[str, list[float]] = {"flat_batch": [], "index_batch": [], "flat_single": [], "index_single": []}
    one = queries[:singles]
    for _ in range(repeats):
        with faiss_blas_for(len(queries)):  # exact search at its best: one matrix product for the batch
            out["flat_batch"].append(1000 * timed(exact.search, queries, k)[1] / len(queries))
        out["index_batch"].append(1000 * timed(index.search_arrays, queries, k)[1] / len(queries))
        for q in one:
            out["flat_single"].append(1000 * timed(exact.search, q[None], k)[1])
            out["index_single"].append(1000 * timed(index.search_arrays, q[None], k)[1])
    return {"flat_batch_ms": min(out["flat_batch"]), "index_batch_ms": min(out["index_batch"]),
            "flat_single_ms": statistics.median(out["flat_single"]),
            "index_single_ms": statistics.median(out["index_single"])}


def index_config(kind: str, args) -> IndexConfig:
    """The shipped defaults, except the options given on the command line."""
    overrides = {"nlist": args.nlist, "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
                 "train_size": args.train_size, "recall_queries": args.recall_queries,
                 "target_recall": args.target_recall}
    return IndexConfig(kind=kind, recall_k=args.k, seed=args.seed,
                       **{key: value for key, value in overrides.items() if value is not None})


def bench_case(n: int, dim: int, args, model=None) -> list[dict]:
    import faiss

    base, queries = make_vectors(n, dim, args.queries, args, model)
    ids = [str(i) for i in range(n)]
    k = args.k
    rows = []
    exact = faiss.IndexFlatIP(dim)
    _, build_s = timed(exact.add, base)
    with faiss_blas_for(len(queries)):
        (_, truth), exact_s = timed(exact.search, queries, k)
    rows.append(dict(n=n, dim=dim, kind="flat", param="-", value=0, build_s=build_s, tune_s=0.0,
                     query_ms=1000 * exact_s / len(queries), recall=1.0, promised=1.0))
    print(f"  flat  build {build_s:7.2f} s  query {rows[-1]['query_ms']:8.4f} ms/query "
          f"({len(queries)} queries in one batch)", flush=True)
    timing_q = queries[:args.timing_queries]
    for kind in args.kinds:
        if kind == "hnsw" and n > args.max_hnsw:
            print(f"  hnsw  skipped (n > --max-hnsw {args.max_hnsw})")
            continue
        cfg = index_config(kind, args)
        index = Index.build(base, ids, config=cfg)
        tuning = index.stats["tuning"]
        _, found = index.search_arrays(queries, k)
        found = np.asarray([[int(index.ids[p]) if p >= 0 else -1 for p in row] for row in found])
        rec = recall_at_k(found, truth, k)
        times = interleaved_ms(exact, index, timing_q, k, args.repeats, args.single_queries)
        params = {key: index.stats[key] for key in ("nlist", "train_size", "hnsw_m", "ef_construction")
                  if key in index.stats}
        rows.append(dict(n=n, dim=dim, kind=kind, param=f"{tuning['param']}={tuning['value']}",
                         value=tuning["value"], build_s=index.stats["build_s"], tune_s=index.stats["tune_s"],
                         promised=tuning["recall"], tuning_queries=tuning["queries"], recall=rec,
                         query_ms=times["index_batch_ms"], **times,
                         speedup=times["flat_batch_ms"] / times["index_batch_ms"],
                         single_speedup=times["flat_single_ms"] / times["index_single_ms"],
                         index_params=params, sweep=tuning["sweep"]))
        r = rows[-1]
        print(f"  {kind:5s} build {r['build_s']:7.1f} s (+ tuning {r['tune_s']:.1f} s)  {r['param']:<13s} "
              f"recall@{k} promised {r['promised']:.3f} on {r['tuning_queries']} held-out, new queries "
              f"{rec:.3f}  batch {r['index_batch_ms']:.4f} ms/query ({r['speedup']:.1f}x flat), single "
              f"{r['index_single_ms']:.3f} ms ({r['single_speedup']:.1f}x flat)  {params}", flush=True)
        del index
    return rows


def format_table(rows: list[dict], k: int) -> str:
    """Markdown table: exact and approximate search timed interleaved on the same queries."""
    lines = [f"| n | dim | index | tuned param | build s | recall@{k} promised | recall@{k} new queries | "
             f"ms/query, batch | flat, batch | speed-up | ms, one query | flat, one query | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "flat":
            lines.append(f"| {r['n']:,} | {r['dim']} | flat | - | {r['build_s']:.2f} | 1 | 1 | "
                         f"{r['query_ms']:.4f} | - | 1x | - | - | 1x |")
        else:
            lines.append(f"| {r['n']:,} | {r['dim']} | {r['kind']} | {r['param']} | {r['build_s']:.1f} | "
                         f"{r['promised']:.3f} | {r['recall']:.3f} | {r['index_batch_ms']:.4f} | "
                         f"{r['flat_batch_ms']:.4f} | {r['speedup']:.1f}x | {r['index_single_ms']:.3f} | "
                         f"{r['flat_single_ms']:.3f} | {r['single_speedup']:.1f}x |")
    return "\n".join(lines)


def nifti_latency(index_dir: str, nifti: str, k: int, weights: str | None, repeats: int) -> dict:
    """End-to-end latency of one new scan: load index, rebuild pipeline, embed, search."""
    import torch

    from slice2vol.retrieval import Index
    from slice2vol.retrieval.embed import VolumeEmbedder

    times: dict[str, list[float]] = {}

    def note(name, t0):
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return time.perf_counter()

    for _ in range(repeats):
        t0 = t_all = time.perf_counter()
        index = Index.load(index_dir)
        t0 = note("load index", t0)
        embedder = VolumeEmbedder.from_provenance(index.provenance, weights=weights)
        t0 = note("rebuild encoder + sha256", t0)
        planes = embedder.load_slices(nifti)
        t0 = note("load + preprocess + slice volume", t0)
        bag = embedder.slice_features(planes)
        t0 = note(f"encode ({sum(len(b) for b in bag.values())} slices)", t0)
        vector = embedder.aggregator.transform([bag])[0]
        t0 = note("aggregate", t0)
        index.search(vector, k)
        note("search", t0)
        note("total", t_all)
    return {"threads": torch.get_num_threads(), **{name: float(np.median(v)) for name, v in times.items()}}


def neighbour_labels(index_dir: str, k: int) -> dict:
    """Leave-one-out over an index's subjects: do the k nearest share the query's labels?

    Continuous labels: mean |label - mean of the k neighbours' labels| against |label - mean of all
    other subjects| (what knowing nothing gives). Categorical: fraction of neighbours with the
    query's label against the chance that two distinct random subjects share it.
    """
    from slice2vol.retrieval import Index

    index = Index.load(index_dir)
    out = {"n": len(index), "k": k, "labels": {}}
    neighbours = {sid: index.search_subject(sid, k + 1) for sid in index.ids}
    for column in index.labels.columns:
        values = index.labels[column]
        kind = index.label_types.get(column) or ("continuous" if values.dtype.kind in "if" else "categorical")
        rows = []
        for sid, table in neighbours.items():
            own = values.get(sid)
            others = table[table["subject_id"] != sid].head(k)[column].dropna()
            if own is None or (isinstance(own, float) and np.isnan(own)) or not len(others):
                continue
            if kind == "continuous":
                rest = values.drop(sid).dropna().astype(float)
                rows.append((abs(float(own) - float(others.astype(float).mean())), abs(float(own) - rest.mean())))
            else:
                rows.append(((others == own).mean(), np.nan))
        if not rows:
            continue
        a = np.asarray(rows, dtype=float)
        if kind == "continuous":
            out["labels"][column] = {"kind": kind, "neighbours_abs_error": a[:, 0].mean(),
                                     "cohort_mean_abs_error": a[:, 1].mean()}
        else:
            counts = values.dropna().value_counts().to_numpy(dtype=float)
            total = counts.sum()
            chance = float((counts * (counts - 1)).sum() / (total * (total - 1)))
            out["labels"][column] = {"kind": kind, "neighbours_agree": a[:, 0].mean(), "chance": chance}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1280])
    parser.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"], choices=["ivf", "hnsw"])
    parser.add_argument("--queries", type=int, default=1000, help="new evaluation queries (never indexed)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="FAISS/torch threads (default: the cores available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", type=int, default=256, help="mixture components (synthetic)")
    parser.add_argument("--rank", type=int, default=64, help="subspace rank (synthetic)")
    shipped = parser.add_argument_group("index options (default: the shipped IndexConfig defaults)")
    shipped.add_argument("--target-recall", type=float, default=None)
    shipped.add_argument("--recall-queries", type=int, default=None, help="vectors held out for tuning")
    shipped.add_argument("--nlist", type=int, default=None, help="IVF cells")
    shipped.add_argument("--train-size", type=int, default=None, help="IVF k-means sample")
    shipped.add_argument("--hnsw-m", type=int, default=None)
    shipped.add_argument("--ef-construction", type=int, default=None)
    parser.add_argument("--max-hnsw", type=int, default=2_000_000, help="skip HNSW above this size")
    parser.add_argument("--store", help="fit the vector model to this store's volume embeddings")
    parser.add_argument("--embeddings", help="volume-embedding set of --store")
    parser.add_argument("--index", help="index folder, for the new-scan latency")
    parser.add_argument("--nifti", help="a NIfTI file, for the new-scan latency")
    parser.add_argument("--weights", help="local weights for the new-scan latency")
    parser.add_argument("--neighbours", type=int, default=0,
                        help="with --index: leave-one-out label agreement of this many nearest subjects")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds / NIfTI repeats")
    parser.add_argument("--timing-queries", type=int, default=200,
                        help="queries of the interleaved batched exact-vs-approximate timing")
    parser.add_argument("--single-queries", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--json", help="write all rows to this JSON file")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from slice2vol.runtime import configure_runtime

    runtime = configure_runtime(threads=args.threads)
    import faiss
    import torch

    faiss.omp_set_num_threads(runtime["threads"])
    torch.set_num_threads(runtime["threads"])
    model = None
    if args.store:
        from slice2vol.retrieval.index import _open_store

        ids, x, _ = _open_store(args.store).volume_embeddings(args.embeddings)
        model = FittedMixture.fit(x, seed=args.seed)
        args.dims = [x.shape[1]]
        print(f"vector model: PCA+GMM fitted to {len(ids)} x {x.shape[1]} embeddings {args.embeddings!r} of {args.store}")
    else:
        print(f"vector model: clustered low-rank mixture ({args.clusters} clusters, rank {args.rank}, seed {args.seed})")
    cfg = IndexConfig()
    print(f"faiss {faiss.__version__}, {runtime['threads']} thread(s), allocator {runtime['allocator']}, "
          f"{args.queries} new queries, recall@{args.k} vs exact; shipped IndexConfig: nlist 4*sqrt(N) "
          f"(<= N/39), train {cfg.train_size or '64 per cell'}, HNSW M={cfg.hnsw_m} efC={cfg.ef_construction}, "
          f"target {cfg.target_recall} on {cfg.recall_queries} held-out vectors", flush=True)
    rows = []
    for n in [s for s in args.sizes if s > 0]:
        for dim in args.dims:
            print(f"n={n:,} dim={dim}", flush=True)
            rows += bench_case(n, dim, args, model)
    if rows:
        print(format_table(rows, args.k))
    result = {"rows": rows, "runtime": runtime, "faiss": faiss.__version__, "args": vars(args)}
    if args.index and args.nifti:
        lat = nifti_latency(args.index, args.nifti, args.k, args.weights, args.repeats)
        result["nifti_latency_s"] = lat
        print(f"\nnew-scan query, median of {args.repeats} ({lat.pop('threads')} torch threads):")
        for name, seconds in lat.items():
            print(f"  {name:40s} {seconds:8.3f} s")
    if args.index and args.neighbours:
        check = neighbour_labels(args.index, args.neighbours)
        result["neighbour_labels"] = check
        print(f"\nleave-one-out over {check['n']} indexed subjects, {check['k']} nearest each:")
        for column, r in check["labels"].items():
            if r["kind"] == "continuous":
                print(f"  {column}: mean |query - neighbours' mean| {r['neighbours_abs_error']:.2f} "
                      f"(cohort mean: {r['cohort_mean_abs_error']:.2f})")
            else:
                print(f"  {column}: {100 * r['neighbours_agree']:.0f}% of neighbours share the query's value "
                      f"(chance {100 * r['chance']:.0f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
