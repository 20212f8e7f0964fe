"""``slice2vol search``: nearest subjects of an indexed subject or of a new NIfTI scan."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "find the subjects most similar to an indexed subject or to a new NIfTI scan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder (slice2vol index build)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--subject", help="an indexed subject ID (or one of --store)")
    query.add_argument("--nifti", nargs="+", help="a new scan (one file per modality, manifest order)")
    parser.add_argument("--store", help="look --subject up in this store (same provenance as the index)")
    parser.add_argument("-k", type=int, default=10, help="number of neighbours")
    parser.add_argument("--exclude-self", action="store_true", help="leave the query subject out")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gallery", help="write a gallery of the query and neighbours (.html or .png)")
    parser.add_argument("--weights", help="local copy of the indexed encoder's weights (sha256 is checked)")
    parser.add_argument("--device", default="cpu", help="device for embedding a new scan")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per encoder call")


def run(args: argparse.Namespace) -> int:
    import time

    from slice2vol.retrieval import Index

    index = Index.load(args.index)
    start = time.perf_counter()
    query_images = None
    query_labels = None
    if args.nifti:
        images = args.nifti[0] if len(args.nifti) == 1 else args.nifti
        table = index.search_nifti(images, args.k, weights=args.weights, device=args.device,
                                   batch_size=args.batch_size)
        query_images = images
        query_name = table["query"].iloc[0] if len(table) else str(images)
    elif args.store:
        table = index.search_store(args.store, args.subject, args.k + int(args.exclude_self))
        query_name = args.subject
    else:
        table = index.search_subject(args.subject, args.k + int(args.exclude_self))
        query_name = args.subject
        query_images = index.image_paths(args.subject)
        if args.subject in index.labels.index:
            query_labels = index.labels.loc[args.subject].to_dict()
    if args.exclude_self:
        table = table[table["subject_id"] != query_name].head(args.k).copy()
        table["rank"] = range(1, len(table) + 1)
    elapsed = time.perf_counter() - start
    if args.json:
        payload = {"query": query_name, "index": str(index.path), "k": args.k, "seconds": round(elapsed, 4),
                   "neighbours": json.loads(table.drop(columns="query").to_json(orient="records"))}
        print(json.dumps(payload, indent=1))
    else:
        print(f"# {len(table)} nearest of {query_name} in {index.describe()} ({elapsed:.2f} s)")
        print(table.drop(columns="query").to_string(index=False, formatters={"similarity": "{:.4f}".format}))
    if args.gallery:
        from slice2vol.retrieval.gallery import write_gallery

        out = write_gallery(index, table, args.gallery, query_name=query_name, query_images=query_images,
                            query_labels=query_labels)
        print(f"gallery: {out}", file=sys.stderr)
    return 0
