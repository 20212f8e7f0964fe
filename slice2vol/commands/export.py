"""``slice2vol export``: one set of volume embeddings out of a feature store, as CSV, Parquet or npz.

The file holds one row per subject: ``subject_id``, optionally the store's labels (``--labels``),
then ``e0 .. e{D-1}``. The set's provenance (what made it: aggregator or 3D encoder, weights and their
sha256, versions) travels with it: inside the npz (``provenance``, a JSON string) and the Parquet
schema metadata (key ``slice2vol.provenance``), and always in a sidecar ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slice2vol.commands._common import add_out, add_store

HELP = "write one set of volume embeddings of a store to CSV, Parquet or npz"
DESCRIPTION = __doc__
FORMATS = ("csv", "parquet", "npz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store(parser, help="HDF5 feature store holding the volume embeddings")
    parser.add_argument("--embeddings", metavar="NAME",
                        help="the volume-embedding set (e.g. mean, 3d/deepbet); omitted: list the sets")
    parser.add_argument("--to", choices=FORMATS, default=None, help="format (default: from the --out suffix)")
    add_out(parser, help="file to write")
    parser.add_argument("--labels", action="store_true", help="add the store's label columns after subject_id")


def _format_of(out: Path, to: str | None) -> str:
    if to:
        return to
    suffix = out.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise ValueError(f"{out}: cannot tell the format from the suffix; pass --to csv|parquet|npz")


def export_embeddings(store_path: str | Path, name: str, out: str | Path, fmt: str | None = None, *,
                      labels: bool = False) -> Path:
    """Writes the set ``name`` of ``store_path`` to ``out`` and returns the path.

    Args:
        store_path: the feature store.
        name: volume-embedding set name.
        out: target file (its folder is created).
        fmt: ``csv``, ``parquet`` or ``npz`` (default: the suffix of ``out``).
        labels: add the store's label columns.

    Raises:
        FileNotFoundError: no such store. KeyError: no such set (the message lists the sets).
        ImportError: Parquet without pyarrow (the message says what to install).
    """
    import numpy as np

    from slice2vol.cache import FeatureStore

    store_path, out = Path(store_path), Path(out)
    if not store_path.exists() and not store_path.with_name(store_path.name + ".parts").exists():
        raise FileNotFoundError(f"{store_path}: feature store not found")
    fmt = _format_of(out, fmt)
    store = FeatureStore(store_path)
    ids, X, provenance = store.volume_embeddings(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"store": str(store_path), "embeddings": name, "n": len(ids), "dim": int(X.shape[1]),
            "provenance": provenance}
    table = None
    if fmt in ("csv", "parquet"):
        import pandas as pd

        columns = {"subject_id": list(ids)}
        if labels:
            frame = store.labels().reindex(list(ids))
            columns.update({c: frame[c].to_numpy() for c in frame.columns})
        width = len(str(X.shape[1] - 1))
        columns.update({f"e{j:0{width}d}": X[:, j] for j in range(X.shape[1])})
        table = pd.DataFrame(columns)
    if fmt == "csv":
        table.to_csv(out, index=False, float_format="%.8g")
    elif fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("Parquet export needs pyarrow: pip install pyarrow (or pip install "
                              "'slice2vol[export]'); CSV and npz need nothing more") from None
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                               b"slice2vol.provenance": json.dumps(meta, default=str).encode()})
        pq.write_table(arrow, out)
    else:
        extra = {}
        if labels:
            frame = store.labels().reindex(list(ids))
            extra = {f"label_{c}": frame[c].to_numpy().astype(str if frame[c].dtype == object else float)
                     for c in frame.columns}
        if out.suffix != ".npz":  # numpy would append it anyway
            out = out.with_name(out.name + ".npz")
        # plain arrays only (np.load(..., allow_pickle=False) reads it): IDs as unicode, provenance as JSON
        np.savez(out, ids=np.asarray(ids, dtype=str), X=X.astype(np.float32),
                 provenance=np.asarray(json.dumps(meta, default=str)), **extra)
    out.with_name(out.name + ".provenance.json").write_text(json.dumps(meta, indent=1, default=str))
    return out


def run(args: argparse.Namespace) -> int:
    from slice2vol.cache import FeatureStore

    if not args.embeddings:
        store = Path(args.store)
        if not store.exists() and not store.with_name(store.name + ".parts").exists():
            raise FileNotFoundError(f"{store}: feature store not found")
        names = FeatureStore(store).volume_embedding_names()
        print("\n".join(names) if names else f"{store}: no volume embeddings (run slice2vol aggregate or embed)")
        return 0
    if not args.out:
        raise ValueError("--out FILE is required with --embeddings")
    path = export_embeddings(args.store, args.embeddings, args.out, args.to, labels=args.labels)
    print(f"wrote {path}")
    return 0
