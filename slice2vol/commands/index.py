"""``slice2vol index build|info``: a FAISS index over a store's volume embeddings."""

from __future__ import annotations

import argparse
import json

HELP = "build (or describe) a k-NN index of volume embeddings for 'slice2vol search'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")
    build = sub.add_parser("build", help="index a volume-embedding set of a feature store")
    build.add_argument("--store", required=True, help="HDF5 feature store (slice2vol cache)")
    build.add_argument("--embeddings", required=True, help="volume-embedding set name (slice2vol aggregate)")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                       help="flat = exact cosine (default); ivf/hnsw = approximate, tuned to --target-recall")
    build.add_argument("--manifest", help="cohort manifest, to show neighbours' images in galleries")
    build.add_argument("--nlist", type=int, help="IVF cells (default 4*sqrt(N))")
    build.add_argument("--nprobe", type=int, help="IVF cells visited per query (default: tuned)")
    build.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    build.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam")
    build.add_argument("--ef-search", type=int, help="HNSW search beam (default: tuned)")
    build.add_argument("--target-recall", type=float, default=0.95, help="recall@k the tuning aims for")
    build.add_argument("--recall-k", type=int, default=10, help="k of the measured recall")
    build.add_argument("--threads", type=int, help="FAISS threads")
    info = sub.add_parser("info", help="describe an index folder")
    info.add_argument("index", help="index folder")
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")


def run(args: argparse.Namespace) -> int:
    from slice2vol.retrieval import Index, IndexConfig

    if args.index_command == "build":
        if args.threads:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        cfg = IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                          ef_construction=args.ef_construction, ef_search=args.ef_search,
                          target_recall=args.target_recall, recall_k=args.recall_k)
        index = Index.from_store(args.store, args.embeddings, config=cfg, manifest=args.manifest)
        out = index.save(args.out)
        tuning = index.stats["tuning"]
        print(f"{index.describe()}\nbuilt in {index.stats['build_s']:.2f} s; wrote {out}")
        for row in tuning.get("sweep", []):
            print(f"  {tuning['param']}={row['value']:<5d} recall@{tuning['k']} {row['recall']:.3f} "
                  f"{row['query_ms']:.3f} ms/query")
        return 0
    if args.index_command == "info":
        index = Index.load(args.index)
        if args.json:
            meta = json.loads((index.path / "meta.json").read_text())
            meta.pop("ids", None)
            print(json.dumps(meta, indent=1))
        else:
            print(index.describe())
            pipe = index.provenance.get("pipeline") or {}
            if pipe:
                agg = pipe.get("aggregator") or {}
                print(f"encoder {pipe.get('encoder')} weights {pipe.get('weights')} "
                      f"sha256 {str(pipe.get('weights_sha256'))[:16]}...; aggregator {agg.get('method')} "
                      f"{agg.get('params') or ''}; feature set {index.provenance['store'].get('feature_set')}")
            print(f"labels: {', '.join(index.labels.columns) or 'none'}")
        return 0
    raise ValueError("choose an action: slice2vol index build ... | slice2vol index info DIR")
