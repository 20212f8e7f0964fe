"""``slice2vol search``: nearest subjects of an indexed subject or of a new NIfTI scan.

Examples::

    slice2vol search --index runs/index --subject IXI039-HH-1261 -k 10
    slice2vol search --index runs/index --nifti new_T1.nii.gz -k 5 --out neighbours.html
    slice2vol search --index runs/index --store other.h5 --subject SUB-7 --out neighbours.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slice2vol.commands._common import add_device, add_out, add_progress, add_store, resolve_device, weights_arg

HELP = "find the subjects most similar to an indexed subject or to a new NIfTI scan"
TABLE_SUFFIXES = (".json", ".csv")
GALLERY_SUFFIXES = (".html", ".htm", ".png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder (slice2vol index build)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--subject", help="an indexed subject ID (or one of --store)")
    query.add_argument("--nifti", nargs="+", help="a new scan (one file per modality, manifest order)")
    add_store(parser, required=False, help="look --subject up in this store (same provenance as the index)")
    parser.add_argument("-k", type=int, default=10, help="number of neighbours")
    parser.add_argument("--exclude-self", action="store_true",
                        help="leave the query subject out; with --nifti, the indexed subjects whose image is that "
                             "same file (an index built with --manifest records them)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_out(parser, help="write the neighbours to this file: .json or .csv (the table), .html or .png (a gallery "
                         "of the query and its neighbours)")
    parser.add_argument("--gallery", help="also write a gallery (.html or .png)")
    parser.add_argument("--weights", type=weights_arg, help="local copy of the indexed encoder's weights (sha256 is checked)")
    add_device(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="slices per encoder call (new scans)")
    add_progress(parser)


def run(args: argparse.Namespace) -> int:
    import time

    from slice2vol.retrieval import Index

    outputs = [p for p in (args.out, args.gallery) if p]
    for path in outputs:
        if Path(path).suffix.lower() not in TABLE_SUFFIXES + GALLERY_SUFFIXES:
            raise ValueError(f"{path}: --out/--gallery must end in .json, .csv, .html or .png")
    if args.gallery and Path(args.gallery).suffix.lower() not in GALLERY_SUFFIXES:
        raise ValueError(f"{args.gallery}: a gallery is .html or .png")
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (slices per encoder call), got {args.batch_size}")
    index = Index.load(args.index)
    start = time.perf_counter()
    query_images = None
    query_labels = None
    same: list[str] = []
    if args.nifti:
        images = args.nifti[0] if len(args.nifti) == 1 else args.nifti
        # a scan is no indexed subject: "self" is the subjects indexed from that very file
        same = same_file_subjects(index, args.nifti) if args.exclude_self else []
        table = index.search_nifti(images, args.k + len(same), weights=args.weights,
                                   device=resolve_device(args.device), batch_size=args.batch_size)
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
        drop = set(same) if args.nifti else {query_name}
        table = table[~table["subject_id"].isin(drop)].head(args.k).copy()
        table["rank"] = range(1, len(table) + 1)
    elapsed = time.perf_counter() - start
    payload = {"query": query_name, "index": str(index.path), "k": args.k, "seconds": round(elapsed, 4),
               "neighbours": json.loads(table.drop(columns="query").to_json(orient="records"))}
    if args.json:
        print(json.dumps(payload, indent=1))
    else:
        print(f"# {len(table)} nearest of {query_name} in {index.describe()} ({elapsed:.2f} s)")
        if len(table):
            print(table.drop(columns="query").to_string(index=False, formatters={"similarity": "{:.4f}".format}))
        else:  # pandas would print 'Empty DataFrame / Columns: [...] / Index: []'
            print("# no neighbour: the index holds no other subject")
    for path in outputs:
        suffix = Path(path).suffix.lower()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".json":
            Path(path).write_text(json.dumps(payload, indent=1))
        elif suffix == ".csv":
            table.to_csv(path, index=False)
        else:
            from slice2vol.retrieval.gallery import write_gallery

            path = write_gallery(index, table, path, query_name=query_name, query_images=query_images,
                                 query_labels=query_labels)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def same_file_subjects(index, files) -> list[str]:
    """Indexed subjects one of whose recorded images is one of ``files`` (the same resolved path).

    Raises:
        ValueError: the index records no image files (built without ``--manifest``): which indexed
            subject is this scan cannot be told, and a flag that did nothing would go unnoticed.
    """
    recorded = index.provenance.get("images") or {}
    if not recorded:
        raise ValueError(f"{index.path}: --exclude-self with --nifti needs the indexed subjects' image files, and "
                         "this index records none (built without --manifest): use --subject ID --exclude-self, or "
                         "rebuild the index with --manifest")
    query = {str(Path(f).resolve()) for f in files}
    return [sid for sid, images in recorded.items()
            if sid in index and any(str(p) in query for p in (images or {}).values())]
