"""``slice2vol export``: one set of volume embeddings out of a feature store, as CSV, Parquet or npz.

The file holds one row per subject: ``subject_id``, optionally the store's labels (``--labels``),
then ``e0 .. e{D-1}`` (zero-padded to one width: ``e0000 .. e1279``). The set's provenance (what
made it: aggregator or 3D encoder, weights and their sha256, versions) travels with it: inside the
npz (``provenance``, a JSON string) and the Parquet schema metadata (key ``slice2vol.provenance``),
and always in a sidecar ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that is not an earlier export (never an HDF5 file)")


class MissingDependency(ImportError):
    """An optional package a format needs is not installed (the message says what to install)."""


def _refuse_to_clobber(out: Path, store_path: Path, overwrite: bool = False) -> None:
    """Refuses an ``out`` that is the store itself or another HDF5 file (a feature store, most likely):
    an export is a copy of part of a store and must never replace one. Any other existing file is
    replaced only when it is an earlier export (its ``.provenance.json`` sidecar beside it) or
    ``overwrite`` is set: ``--out cohort.csv`` replaced the manifest itself with embeddings."""
    if out.exists() and out.resolve() == store_path.resolve():
        raise ValueError(f"{out}: --out is the store being exported; write the export to another file")
    if out.is_dir():
        raise ValueError(f"{out}: --out is a folder; give a file name such as {out / 'embeddings.csv'}")
    if out.is_file():
        import h5py

        if h5py.is_hdf5(out):  # HDF5's own signature check (it also finds a signature after a user block)
            raise ValueError(f"{out}: is an HDF5 file (a feature store?); refusing to overwrite it with an "
                             "export: choose another --out or remove it first")
        if not overwrite and not _sidecar(out).is_file():
            raise ValueError(f"{out}: already exists and is no earlier export (no {_sidecar(out).name} beside it); "
                             "choose another --out, or pass --overwrite to replace it")


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".provenance.json")


def _label_columns(frame, taken: set[str], prefix: str = "", arrays: bool = False) -> dict:
    """The store's labels as columns, as they are (``arrays``: as plain arrays for npz, numeric labels
    as float and the others, M/F or site names, as text).

    A label whose column name is already taken (``subject_id``, an embedding column ``e0000``) is
    written as ``label_<name>`` instead of silently replacing that column.
    """
    import logging

    import pandas as pd

    columns = {}
    for c in frame.columns:
        values = frame[c]
        # pandas >= 3 gives text columns a string dtype, not object: test for numbers, not for object
        if not arrays:
            array = values.to_numpy()
        elif pd.api.types.is_numeric_dtype(values):
            array = values.to_numpy(dtype=float, na_value=np.nan)
        else:
            array = values.astype(str).to_numpy(dtype=str)
        name = f"{prefix}{c}"
        if name in taken:
            logging.getLogger(__name__).warning("label %r is also the name of another column; written as label_%s",
                                                c, c)
            name = f"label_{c}"
        columns[name] = array
    return columns


def _format_of(out: Path, to: str | None) -> str:
    suffix = out.suffix.lower().lstrip(".")
    if to:
        if suffix in FORMATS and suffix != to:  # '--out a.parquet --to npz' wrote a zip named .parquet
            raise ValueError(f"{out}: the suffix says {suffix} but --to is {to}; name the file .{to} or drop --to")
        return to
    if suffix in FORMATS:
        return suffix
    raise ValueError(f"{out}: cannot tell the format from the suffix; pass --to csv|parquet|npz")


def export_embeddings(store_path: str | Path, name: str, out: str | Path, fmt: str | None = None, *,
                      labels: bool = False, overwrite: bool = False) -> Path:
    """Writes the set ``name`` of ``store_path`` to ``out`` and returns the path.

    Args:
        store_path: the feature store.
        name: volume-embedding set name.
        out: target file (its folder is created).
        fmt: ``csv``, ``parquet`` or ``npz`` (default: the suffix of ``out``).
        labels: add the store's label columns.
        overwrite: replace an existing ``out`` that is not an earlier export (never an HDF5 file).

    Raises:
        FileNotFoundError: no such store. KeyError: no such set (the message lists the sets).
        MissingDependency: Parquet without pyarrow (the message says what to install).
        ValueError: ``out`` is the store itself, a folder, another HDF5 file, or an existing file
            that is not an earlier export (without ``overwrite``).
    """
    from slice2vol.cache import FeatureStore

    if str(out).endswith(("/", os.sep)):  # Path() drops the separator: 'x/dir/' wrote a file named 'x/dir'
        raise ValueError(f"{out}: --out ends in a folder separator; give a file name such as "
                         f"{Path(out) / 'embeddings.csv'}")
    store_path, out = Path(store_path), Path(out)
    if not store_path.exists() and not store_path.with_name(store_path.name + ".parts").exists():
        raise FileNotFoundError(f"{store_path}: feature store not found")
    fmt = _format_of(out, fmt)
    _refuse_to_clobber(out, store_path, overwrite)
    store = FeatureStore(store_path)
    ids, X, provenance = store.volume_embeddings(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"store": str(store_path), "embeddings": name, "n": len(ids), "dim": int(X.shape[1]),
            "provenance": provenance}
    table = None
    if fmt in ("csv", "parquet"):
        import pandas as pd

        width = len(str(X.shape[1] - 1))
        embedding = {f"e{j:0{width}d}": X[:, j] for j in range(X.shape[1])}
        columns = {"subject_id": list(ids)}
        if labels:
            columns.update(_label_columns(store.labels().reindex(list(ids)), {"subject_id", *embedding}))
        table = pd.DataFrame({**columns, **embedding})
    # written under a temporary name and renamed: an interrupted export leaves no half-written file
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "csv":
            table.to_csv(tmp, index=False, float_format="%.9g")  # 9 significant digits round-trip every float32
        elif fmt == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise MissingDependency("Parquet export needs pyarrow: pip install pyarrow (or pip install "
                                        "'slice2vol[export]'); CSV and npz need nothing more") from None
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                                   b"slice2vol.provenance": json.dumps(meta, default=str).encode()})
            pq.write_table(arrow, tmp)
        else:
            extra = _label_columns(store.labels().reindex(list(ids)), set(), prefix="label_", arrays=True) if labels else {}
            # plain arrays only (np.load(..., allow_pickle=False) reads it): IDs as unicode, provenance as JSON
            with open(tmp, "wb") as fh:  # a file object: numpy appends no .npz (the file is named as asked)
                np.savez(fh, ids=np.asarray(ids, dtype=str), X=X.astype(np.float32),
                         provenance=np.asarray(json.dumps(meta, default=str)), **extra)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar(out).write_text(json.dumps(meta, indent=1, default=str))
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
    path = export_embeddings(args.store, args.embeddings, args.out, args.to, labels=args.labels,
                             overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
