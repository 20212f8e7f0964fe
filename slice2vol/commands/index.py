"""``slice2vol index build|info``: a FAISS index over a store's volume embeddings.

Examples::

    slice2vol index build --store feats.h5 --embeddings mean --out runs/index --manifest cohort.csv
    slice2vol index build --store feats.h5 --embeddings mean --out runs/index-hnsw --kind hnsw
    slice2vol index info runs/index
    slice2vol index info runs/index --store feats.h5     # still the store's current embeddings?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slice2vol.commands._common import (
    HelpFormatter,
    add_manifest,
    add_out,
    add_progress,
    add_run_log,
    add_seed,
    add_store,
    command_line,
)

HELP = "build (or describe) a k-NN index of volume embeddings for 'slice2vol search'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")
    build = sub.add_parser("build", help="index a volume-embedding set of a feature store",
                           description="Index a volume-embedding set of a feature store. Approximate kinds "
                                       "are tuned on vectors held out of the index, so the recall they report "
                                       "is the recall of a new scan (docs/retrieval.md).",
                           formatter_class=HelpFormatter)
    add_store(build, help="HDF5 feature store (slice2vol cache, slice2vol aggregate)")
    build.add_argument("--embeddings", required=True, help="volume-embedding set name (slice2vol aggregate)")
    add_out(build, required=True, help="index folder to write (its log file goes there too)")
    add_manifest(build, help="cohort manifest: neighbours' images in galleries, and its labels in place of those "
                             "the store recorded when it was cached")
    build.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                       help="flat = exact cosine; ivf/hnsw = approximate, tuned to --target-recall")
    build.add_argument("--nlist", type=int, help="IVF cells (default 4*sqrt(N), at most N/39)")
    build.add_argument("--nprobe", type=int, help="IVF cells visited per query (default: tuned)")
    build.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    build.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam")
    build.add_argument("--ef-search", type=int, help="HNSW search beam (default: tuned)")
    build.add_argument("--target-recall", type=float, default=0.95,
                       help="recall@k on queries outside the index that the tuning aims for")
    build.add_argument("--recall-k", type=int, default=10, help="k of the measured recall")
    build.add_argument("--recall-queries", type=int, default=1000,
                       help="vectors held out of the index while it is tuned (then added)")
    build.add_argument("--threads", type=int,
                       help="FAISS threads (default: the cores this process may use; SLICE2VOL_THREADS)")
    add_seed(build)
    add_progress(build)
    info = sub.add_parser("info", help="describe an index folder", formatter_class=HelpFormatter)
    info.add_argument("index", help="index folder")
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    add_store(info, required=False, help="check that this store's embeddings of the indexed subjects are still the "
                                         "indexed ones (exit 2 naming those that changed)")


def run(args: argparse.Namespace) -> int:
    from slice2vol.retrieval import Index, IndexConfig

    if args.index_command == "build":
        import faiss

        # what can be checked in a moment is checked before the output folder (and its log) is made
        store = Path(args.store)
        if not store.exists() and not store.with_name(store.name + ".parts").exists():
            raise FileNotFoundError(f"{store}: feature store not found")
        if args.manifest and not Path(args.manifest).is_file():
            raise FileNotFoundError(f"{args.manifest}: manifest not found")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        # options of another kind of index were accepted and ignored
        other = [flag for flag, value, kind in (("--nlist", args.nlist, "ivf"), ("--nprobe", args.nprobe, "ivf"),
                                                ("--ef-search", args.ef_search, "hnsw")) if value is not None
                 and kind != args.kind]
        if other:
            raise ValueError(f"{', '.join(other)}: not an option of --kind {args.kind} (--nlist/--nprobe are for ivf, "
                             "--ef-search for hnsw)")
        if args.threads:
            from slice2vol.runtime import configure_runtime

            configure_runtime(threads=args.threads)  # faiss is loaded: its OpenMP pool is resized
        created = not Path(args.out).exists()
        log_path = add_run_log(args.out, "index.log")
        try:
            cfg = IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                              ef_construction=args.ef_construction, ef_search=args.ef_search,
                              target_recall=args.target_recall, recall_k=args.recall_k,
                              recall_queries=args.recall_queries, seed=args.seed)
            index = Index.from_store(args.store, args.embeddings, config=cfg, manifest=args.manifest)
            from slice2vol.runtime import runtime_record

            index.stats.update(command_line=getattr(args, "command_line", None) or command_line(),
                               runtime=runtime_record())
            out = index.save(args.out)
        except BaseException:
            if created:  # a refused build leaves no folder that looks like an index (it held only its log)
                _drop_run_folder(Path(args.out), log_path)
            raise
        tuning = index.stats["tuning"]
        print(f"{index.describe()}\nbuilt in {index.stats['build_s']:.2f} s with {faiss.omp_get_max_threads()} "
              f"thread(s); wrote {out} (log {log_path.name})")
        for row in tuning.get("sweep", []):
            print(f"  {tuning['param']}={row['value']:<5d} recall@{tuning['k']} {row['recall']:.3f} "
                  f"(+-{row.get('recall_se', 0):.3f}) {row['query_ms']:.3f} ms/query")
        return 0
    if args.index_command == "info":
        index = Index.load(args.index)
        unchanged = index.check_unchanged(args.store, always=True) if args.store else False
        if args.json:
            meta = json.loads((index.path / "meta.json").read_text())
            meta.pop("ids", None)
            (meta.get("provenance") or {}).pop("row_sha256", None)  # one digest a subject, like the ids
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
            if unchanged:
                print(f"{args.store}: the indexed subjects' embeddings "
                      f"{index.provenance.get('embeddings', {}).get('name')!r} are unchanged since the build")
        return 0
    raise ValueError("choose an action: slice2vol index build ... | slice2vol index info DIR")


def _drop_run_folder(folder: Path, log_path: Path) -> None:
    """Removes ``folder``, which this command created, and the log handler writing into it."""
    import logging
    import shutil

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == log_path:
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(folder, ignore_errors=True)
