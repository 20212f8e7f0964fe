#!/usr/bin/env python
"""Build time, query time and recall@k of IVF and HNSW against exact search, and new-scan latency.

Vectors are shaped like real embeddings, never isotropic noise (on which no approximate index
reaches useful recall): with ``--store`` a PCA + Gaussian-mixture model is fitted to the store's
volume embeddings and sampled; otherwise a seeded clustered low-rank mixture
(:func:`slice2vol.retrieval.synthetic.clustered_embeddings`). Queries are drawn from the same
model but are not in the index; the search knob (nprobe / efSearch) is tuned on a separate set of
tuning queries, then recall and speed are measured on the evaluation queries.

Examples:
    python scripts/bench_retrieval.py --sizes 10000 100000 --dims 384 768 1280 --threads 2
    python scripts/bench_retrieval.py --sizes 1000000 --dims 384 --threads 2   # the acceptance case
    python scripts/bench_retrieval.py --store ixi.h5 --embeddings mean --sizes 100000
    python scripts/bench_retrieval.py --sizes 0 --index ixi-index --nifti new_T1.nii.gz
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slice2vol.retrieval.index import EF_SEARCH_GRID, NPROBE_GRID, recall_at_k  # noqa: E402
from slice2vol.retrieval.synthetic import FittedMixture, clustered_embeddings  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def make_vectors(n: int, dim: int, n_queries: int, args, model: FittedMixture | None):
    total = n + 2 * n_queries
    if model is not None:
        x = model.sample(total, seed=args.seed)
    else:
        x = clustered_embeddings(total, dim, n_clusters=args.clusters, rank=args.rank, seed=args.seed)
    return x[:n], x[n:n + n_queries], x[n + n_queries:]


def tune(index, kind: str, tune_q: np.ndarray, tune_truth: np.ndarray, k: int, target: float, limit: int):
    grid = [v for v in NPROBE_GRID if v <= limit] if kind == "ivf" else [v for v in EF_SEARCH_GRID if v >= k]
    chosen = None
    sweep = []
    for value in grid:
        if kind == "ivf":
            index.nprobe = value
        else:
            index.hnsw.efSearch = value
        _, found = index.search(tune_q, k)
        rec = recall_at_k(found, tune_truth, k)
        sweep.append((value, rec))
        if rec >= target:
            chosen = value
            break
    return (chosen if chosen is not None else grid[-1]), sweep


def interleaved_ms(exact, index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, float]:
    """ms/query of exact and approximate search timed A B A B (the VM's speed drifts between runs)."""
    exact_s, approx_s = [], []
    for _ in range(repeats):
        exact_s.append(timed(exact.search, queries, k)[1])
        approx_s.append(timed(index.search, queries, k)[1])
    return 1000 * min(exact_s) / len(queries), 1000 * min(approx_s) / len(queries)


def bench_case(n: int, dim: int, args, model=None) -> list[dict]:
    import faiss

    base, tune_q, eval_q = make_vectors(n, dim, args.queries, args, model)
    k = args.k
    rows = []
    exact = faiss.IndexFlatIP(dim)
    _, build_s = timed(exact.add, base)
    (_, truth_all), exact_s = timed(exact.search, np.concatenate([eval_q, tune_q]), k)
    truth, tune_truth = truth_all[:len(eval_q)], truth_all[len(eval_q):]
    exact_ms = 1000 * exact_s / (2 * len(eval_q))
    rows.append(dict(n=n, dim=dim, kind="flat", param="-", value=0, build_s=build_s, query_ms=exact_ms,
                     recall=1.0, speedup=1.0))
    print(f"  flat  build {build_s:7.2f} s  query {exact_ms:8.4f} ms", flush=True)
    timing_q = eval_q[:args.timing_queries]
    for kind in args.kinds:
        if kind == "hnsw" and n > args.max_hnsw:
            print(f"  hnsw  skipped (n > --max-hnsw {args.max_hnsw})")
            continue
        if kind == "ivf":
            nlist = args.nlist or int(max(1, min(round(args.nlist_factor * math.sqrt(n)), n // 39)))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = args.seed
            index.cp.niter = args.kmeans_iter
            train_n = min(n, args.train_per_list * nlist)
            rng = np.random.default_rng(args.seed)
            sample = base[rng.choice(n, train_n, replace=False)] if train_n < n else base
            index.cp.max_points_per_centroid = math.ceil(train_n / nlist)
            start = time.perf_counter()
            index.train(sample)
            index.add(base)
            build_s = time.perf_counter() - start
            param, limit, extra = "nprobe", nlist, f"nlist={nlist}"
        else:
            index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = args.ef_construction
            _, build_s = timed(index.add, base)
            param, limit, extra = "efSearch", 0, f"M={args.hnsw_m} efC={args.ef_construction}"
        value, sweep = tune(index, kind, tune_q, tune_truth, k, args.target_recall, limit)
        if kind == "ivf":
            index.nprobe = value
        else:
            index.hnsw.efSearch = value
        _, found = index.search(eval_q, k)
        rec = recall_at_k(found, truth, k)
        flat_ms, query_ms = interleaved_ms(exact, index, timing_q, k, args.repeats)
        rows.append(dict(n=n, dim=dim, kind=kind, param=f"{param}={value}", value=value, build_s=build_s,
                         query_ms=query_ms, flat_ms=flat_ms, recall=rec, speedup=flat_ms / query_ms,
                         index_params=extra, sweep=sweep))
        print(f"  {kind:5s} build {build_s:7.2f} s  query {query_ms:8.4f} ms  {param}={value:<4d} "
              f"recall@{k} {rec:.3f}  speed-up {flat_ms / query_ms:6.1f}x vs flat {flat_ms:.4f} ms "
              f"(interleaved)  ({extra})", flush=True)
        del index
    return rows


def format_table(rows: list[dict], k: int) -> str:
    """Markdown table; speed-ups against exact search timed interleaved on the same query batch,
    and (conservative) against exact search's best per-query cost on the large batch."""
    lines = [f"| n | dim | index | search param | build s | query ms | recall@{k} | flat ms, same batch | "
             f"speed-up | speed-up vs flat's best |", "|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        if r["kind"] == "flat":
            best[(r["n"], r["dim"])] = r["query_ms"]
            lines.append(f"| {r['n']:,} | {r['dim']} | flat | - | {r['build_s']:.2f} | {r['query_ms']:.4f} | "
                         f"1.000 | - | 1x | 1x |")
        else:
            lines.append(f"| {r['n']:,} | {r['dim']} | {r['kind']} | {r['param']} | {r['build_s']:.1f} | "
                         f"{r['query_ms']:.4f} | {r['recall']:.3f} | {r['flat_ms']:.4f} | {r['speedup']:.1f}x | "
                         f"{best[(r['n'], r['dim'])] / r['query_ms']:.1f}x |")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1280])
    parser.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"], choices=["ivf", "hnsw"])
    parser.add_argument("--queries", type=int, default=1000, help="evaluation (and tuning) queries")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", type=int, default=256, help="mixture components (synthetic)")
    parser.add_argument("--rank", type=int, default=64, help="subspace rank (synthetic)")
    parser.add_argument("--nlist", type=int, help="IVF cells (default nlist-factor * sqrt(N))")
    parser.add_argument("--nlist-factor", type=float, default=4.0)
    parser.add_argument("--train-per-list", type=int, default=40, help="k-means points per IVF cell")
    parser.add_argument("--kmeans-iter", type=int, default=10)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--max-hnsw", type=int, default=2_000_000, help="skip HNSW above this size")
    parser.add_argument("--store", help="fit the vector model to this store's volume embeddings")
    parser.add_argument("--embeddings", help="volume-embedding set of --store")
    parser.add_argument("--index", help="index folder, for the new-scan latency")
    parser.add_argument("--nifti", help="a NIfTI file, for the new-scan latency")
    parser.add_argument("--weights", help="local weights for the new-scan latency")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds / NIfTI repeats")
    parser.add_argument("--timing-queries", type=int, default=200,
                        help="queries of the interleaved exact-vs-approximate timing")
    parser.add_argument("--json", help="write all rows to this JSON file")
    args = parser.parse_args(argv)

    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    model = None
    if args.store:
        from slice2vol.retrieval.index import _open_store

        ids, x, _ = _open_store(args.store).volume_embeddings(args.embeddings)
        model = FittedMixture.fit(x, seed=args.seed)
        args.dims = [x.shape[1]]
        print(f"vector model: PCA+GMM fitted to {len(ids)} x {x.shape[1]} embeddings {args.embeddings!r} of {args.store}")
    else:
        print(f"vector model: clustered low-rank mixture ({args.clusters} clusters, rank {args.rank}, seed {args.seed})")
    print(f"faiss {faiss.__version__}, {args.threads} thread(s), {args.queries} queries, recall@{args.k} "
          f"vs exact, target {args.target_recall}")
    rows = []
    for n in [s for s in args.sizes if s > 0]:
        for dim in args.dims:
            print(f"n={n:,} dim={dim}", flush=True)
            rows += bench_case(n, dim, args, model)
    if rows:
        print(format_table(rows, args.k))
    result = {"rows": rows}
    if args.index and args.nifti:
        lat = nifti_latency(args.index, args.nifti, args.k, args.weights, args.repeats)
        result["nifti_latency_s"] = lat
        print(f"\nnew-scan query, median of {args.repeats} ({lat.pop('threads')} torch threads):")
        for name, seconds in lat.items():
            print(f"  {name:40s} {seconds:8.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
