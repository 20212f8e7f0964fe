"""The HDF5 feature store: slice features per subject and plane, volume embeddings, labels, provenance.

A store is one HDF5 file ``STORE.h5`` (the *main segment*) plus, while a job runs or after it was
killed, committed *part segments* in ``STORE.h5.parts/``. Every segment has the same layout (see
``docs/cache.md``)::

    /                       attrs: format, format_version, feature_set, provenance (JSON), history (JSON)
    /planes/<plane>/ids       (n,) str      subjects of this plane, in row order
    /planes/<plane>/offsets   (n + 1,) int64 rows of subject i are offsets[i]:offsets[i + 1]
    /planes/<plane>/features  (N, D) float16 (or float32), one contiguous dataset for all subjects
    /planes/<plane>/indices   (N,) int32    slice index along the plane's RAS axis
    /planes/<plane>/positions (N, 3) float32 slice centre in world mm (RAS)
    /planes/<plane>/tokens    (N, T, Dt)    optional patch tokens, attrs grid = (gh, gw)
    /labels                   JSON records {subject_id: {column: value}}, attrs label_types (JSON)
    /volumes/<name>/ids       (N,) str;  /volumes/<name>/X (N, D) float32; attrs provenance (JSON), name
                              ('/' in a set name is stored as %2F)

Segments are written once, completely, to a temporary name, flushed, fsync'ed and renamed into place
(``os.replace`` is atomic on POSIX), so a SIGKILL at any moment leaves only whole segments and
garbage ``*.tmp`` files. Readers see the union of the main file and the committed parts (the first
segment holding a subject wins; for volume-embedding sets and labels the newest wins). Compaction
merges everything into a fresh main file, renamed over the old one, then deletes the parts.

``feature_set`` is a hash of the *identity* of the features (encoder, weights sha256, model state
sha256, volume and slice configs, dtype, tokens); appending features made under another identity is
refused with :class:`StoreMismatch`, naming the keys that differ.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from slice2vol import __version__

log = logging.getLogger(__name__)

FORMAT = "slice2vol.features"
FORMAT_VERSION = 1
# Keys of the provenance that do not change the features: they may differ between shards and runs.
VOLATILE_KEYS = ("created", "host", "versions", "package_version", "weights_path", "argv")
_STR = h5py.string_dtype("utf-8")
_COPY_ROWS = 1 << 16  # rows copied at a time when compacting / merging


class StoreMismatch(ValueError):
    """Features, stores or shards whose provenance does not agree (the message names the keys)."""


# -- provenance helpers --------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    """Versions of the libraries that can change features, without importing them."""
    from importlib import metadata
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "open_clip_torch", "transformers", "segment_anything",
                 "monai", "numpy", "nibabel", "h5py"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_context() -> dict[str, Any]:
    """Volatile provenance: date, host, package and library versions."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "package_version": __version__,
        "versions": library_versions(),
    }


def identity_of(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a provenance dict that determines the features (everything not volatile)."""
    return {k: v for k, v in provenance.items() if k not in VOLATILE_KEYS and k != "feature_set"}


def diff_dicts(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested JSON-like values differ, as ``key: a -> b`` lines."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a:
                out.append(f"{where}: (absent) -> {b[key]!r}")
            elif key not in b:
                out.append(f"{where}: {a[key]!r} -> (absent)")
            else:
                out.extend(diff_dicts(a[key], b[key], where))
        return out
    if _jsonable(a) != _jsonable(b):
        return [f"{prefix or '(value)'}: {_jsonable(a)!r} -> {_jsonable(b)!r}"]
    return []


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_h5(path: Path) -> "_AtomicH5":
    return _AtomicH5(path)


class _AtomicH5:
    """Context manager: an HDF5 file written to ``<path>.<uuid>.tmp``, fsync'ed and renamed to path."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")

    def __enter__(self) -> h5py.File:
        self.file = h5py.File(self.tmp, "w", libver="latest")
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.flush()
            self.file.close()
            if exc_type is None:
                with open(self.tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(self.tmp, self.path)
                _fsync_dir(self.path.parent)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


# -- in-memory pieces written by jobs --------------------------------------------------------------
@dataclass
class PlaneFeatures:
    """One subject's features in one plane, as written by a caching job.

    Attributes:
        features: (S, D) float array.
        indices: (S,) slice indices along the plane axis.
        positions: (S, 3) slice centres in world mm.
        tokens: optional (S, T, Dt) patch tokens.
        grid: (gh, gw) of the tokens.
    """

    features: np.ndarray
    indices: np.ndarray
    positions: np.ndarray
    tokens: np.ndarray | None = None
    grid: tuple[int, int] | None = None


@dataclass
class SubjectFeatures:
    """Everything a job writes for one subject: plane -> :class:`PlaneFeatures`, plus manifest labels."""

    subject_id: str
    planes: dict[str, PlaneFeatures]
    labels: dict[str, Any] | None = None


# -- one segment (an HDF5 file of the store) ------------------------------------------------------
class _Segment:
    """Read side of one HDF5 file of the store; the handle is opened lazily and per process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._index: dict[str, tuple[list[str], np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork must not be used: HDF5 state is per process.
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            if self._file.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path}: not a slice2vol feature store (format attribute missing)")
            version = int(self._file.attrs.get("format_version", 0))
            if version > FORMAT_VERSION:
                raise ValueError(f"{self.path}: store format {version} is newer than this slice2vol "
                                 f"({FORMAT_VERSION}); upgrade slice2vol")
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._file.close()
        self._file = None

    @property
    def provenance(self) -> dict:
        return json.loads(self.file.attrs.get("provenance", "{}"))

    @property
    def history(self) -> list:
        return json.loads(self.file.attrs.get("history", "[]"))

    @property
    def feature_set(self) -> str:
        return str(self.file.attrs.get("feature_set", ""))

    def index(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """plane -> (subject ids, offsets (n + 1,))."""
        if self._index is None:
            out = {}
            for plane, group in self.file.get("planes", {}).items():
                ids = [s.decode() if isinstance(s, bytes) else str(s) for s in group["ids"][()]]
                out[plane] = (ids, group["offsets"][()].astype(np.int64))
            self._index = out
        return self._index

    def labels(self) -> tuple[dict[str, dict], dict[str, str]]:
        if "labels" not in self.file:
            return {}, {}
        ds = self.file["labels"]
        raw = ds[()]
        records = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return records, json.loads(ds.attrs.get("label_types", "{}"))

    def volume_names(self) -> list[str]:
        return [_vol_name(k) for k in self.file.get("volumes", {}).keys()]

    def volume_group(self, name: str) -> h5py.Group | None:
        return self.file.get("volumes", {}).get(_vol_key(name))


# -- the store ------------------------------------------------------------------------------------
class FeatureStore:
    """Slice features, volume embeddings and labels of one cohort under one feature set.

    Opening is lazy (nothing is read until first use) and safe in DataLoader workers: HDF5 handles are
    reopened in each process, and pickling drops them.

    Args:
        path: ``STORE.h5``; committed parts in ``STORE.h5.parts/`` are read too.
        mode: ``r`` to read; ``a`` also allows ``write_volume_embeddings`` and ``write_labels``.

    Example:
        >>> store = FeatureStore("ixi.h5")
        >>> X = store.slice_features("IXI039-HH-1261", "axial")   # (S, D) float32
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._segments: list[_Segment] | None = None
        self._pid: int | None = None
        self._lookup: dict[str, dict[str, tuple[int, int, int]]] | None = None

    # -- opening ---------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".parts")

    def segment_paths(self) -> list[Path]:
        """The main file (if any) then committed parts in commit order."""
        paths = [self.path] if self.path.exists() else []
        if self.parts_dir.is_dir():
            paths += sorted(p for p in self.parts_dir.glob("part-*.h5"))
        return paths

    def exists(self) -> bool:
        return bool(self.segment_paths())

    @property
    def segments(self) -> list[_Segment]:
        if self._segments is None or self._pid != os.getpid():
            paths = self.segment_paths()
            if not paths and self.mode == "r":
                raise FileNotFoundError(f"{self.path}: feature store not found")
            self._segments = [_Segment(p) for p in paths]
            self._pid = os.getpid()
            self._lookup = None
            self._check_consistent()
        return self._segments

    def _check_consistent(self) -> None:
        sets = {}
        for seg in self._segments or []:
            try:
                fs = seg.feature_set
            except OSError as err:
                raise OSError(f"{seg.path}: cannot open store segment ({err})") from None
            if fs:
                sets.setdefault(fs, seg.path)
        if len(sets) > 1:
            (a, pa), (b, pb) = list(sets.items())[:2]
            raise StoreMismatch(f"{self.path}: segments hold different feature sets: {a} ({pa}) and {b} ({pb})")

    def refresh(self) -> None:
        """Forgets cached handles and indices (after another process committed or compacted)."""
        self.close()
        self._segments, self._lookup = None, None

    def close(self) -> None:
        for seg in self._segments or []:
            seg.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_segments"], state["_pid"] = None, None
        return state

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, mode={self.mode!r})"

    # -- metadata --------------------------------------------------------------------------------
    def _slice_segment(self) -> _Segment | None:
        return next((s for s in self.segments if s.feature_set), None)

    @property
    def provenance(self) -> dict:
        """Provenance of the slice features (encoder, weights, configs, versions, date, host)."""
        seg = self._slice_segment()
        return seg.provenance if seg else {}

    @property
    def feature_set(self) -> str:
        """Hash naming the slice-feature set (empty for a store with volume embeddings only)."""
        seg = self._slice_segment()
        return seg.feature_set if seg else ""

    @property
    def history(self) -> list[dict]:
        """Jobs, compactions and merges that wrote this store, oldest first."""
        out: list[dict] = []
        for seg in self.segments:
            out.extend(e for e in seg.history if e not in out)
        return out

    def _build_lookup(self) -> dict[str, dict[str, tuple[int, int, int]]]:
        if self._lookup is None or self._pid != os.getpid():
            lookup: dict[str, dict[str, tuple[int, int, int]]] = {}
            for k, seg in enumerate(self.segments):
                for plane, (ids, offsets) in seg.index().items():
                    table = lookup.setdefault(plane, {})
                    for i, sid in enumerate(ids):
                        # first segment wins: after a kill between compaction and part deletion the
                        # same subject sits in the main file and in a part, with identical data
                        table.setdefault(sid, (k, int(offsets[i]), int(offsets[i + 1])))
            self._lookup = lookup
        return self._lookup

    @property
    def planes(self) -> list[str]:
        """Planes with slice features, in the order axial, coronal, sagittal."""
        order = ("axial", "coronal", "sagittal")
        have = set(self._build_lookup())
        return [p for p in order if p in have] + sorted(have - set(order))

    def subjects(self, plane: str | None = None) -> list[str]:
        """Subjects with complete features in ``plane``, or in every plane of the store (default)."""
        lookup = self._build_lookup()
        if plane is not None:
            return list(lookup.get(plane, {}))
        planes = self.planes
        if not planes:
            return []
        first = lookup[planes[0]]
        return [s for s in first if all(s in lookup[p] for p in planes[1:])]

    def has(self, subject: str, plane: str) -> bool:
        return subject in self._build_lookup().get(plane, {})

    def __len__(self) -> int:
        return len(self.subjects())

    def _where(self, subject: str, plane: str) -> tuple[h5py.Group, int, int]:
        lookup = self._build_lookup()
        if plane not in lookup:
            raise KeyError(f"{self.path}: no plane {plane!r} (planes: {self.planes})")
        try:
            k, start, stop = lookup[plane][subject]
        except KeyError:
            raise KeyError(f"{self.path}: subject {subject!r} has no {plane} features") from None
        return self.segments[k].file["planes"][plane], start, stop

    # -- slice features --------------------------------------------------------------------------
    def slice_features(self, subject: str, plane: str) -> np.ndarray:
        """Features of one subject's slices, float32 array of shape (S, D)."""
        group, start, stop = self._where(subject, plane)
        return _as_float32(group["features"][start:stop])

    def slice_meta(self, subject: str, plane: str) -> dict[str, np.ndarray]:
        """``indices`` (S,) int slice indices and ``positions`` (S, 3) world mm of one subject's slices."""
        group, start, stop = self._where(subject, plane)
        return {"indices": group["indices"][start:stop].astype(np.int64),
                "positions": group["positions"][start:stop].astype(np.float32)}

    def slice_tokens(self, subject: str, plane: str) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch tokens (S, T, Dt) float32 and their grid (gh, gw).

        Raises:
            KeyError: tokens were not cached (run the job with ``--tokens``).
        """
        group, start, stop = self._where(subject, plane)
        if "tokens" not in group:
            raise KeyError(f"{self.path}: no patch tokens cached (cache with --tokens / save_tokens=True)")
        grid = tuple(int(g) for g in group["tokens"].attrs["grid"])
        return group["tokens"][start:stop].astype(np.float32), grid  # type: ignore[return-value]

    @property
    def has_tokens(self) -> bool:
        return bool(self.provenance.get("tokens"))

    @property
    def embed_dim(self) -> int:
        for seg in self.segments:
            for group in seg.file.get("planes", {}).values():
                return int(group["features"].shape[1])
        raise ValueError(f"{self.path}: no slice features")

    def load_packed(self, subjects: Sequence[str], plane: str, *, meta: bool = False,
                    dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """All slices of many subjects in one array: the fast bulk path.

        Reads whole runs of consecutive rows in one HDF5 call, and a segment's whole dataset when most
        of it is wanted, so reading 10,000 subjects costs about one sequential pass over the file.

        Args:
            subjects: subject ids (each must have features in ``plane``).
            plane: the plane.
            meta: also return ``indices`` (N,) and ``positions`` (N, 3).
            dtype: ``np.float32`` (default) or ``None`` to keep the stored dtype (float16 halves the
                memory and skips the conversion, which dominates reading 10,000 subjects on a CPU).

        Returns:
            features (N, D) float32 with subject i in rows offsets[i]:offsets[i + 1], offsets (n + 1,),
            and with ``meta`` a dict of indices / positions in the same row order.
        """
        lookup = self._build_lookup()
        if plane not in lookup:
            raise KeyError(f"{self.path}: no plane {plane!r} (planes: {self.planes})")
        table = lookup[plane]
        missing = [s for s in subjects if s not in table]
        if missing:
            raise KeyError(f"{self.path}: {len(missing)} subject(s) have no {plane} features, "
                           f"e.g. {missing[:3]}")
        where = np.array([table[s] for s in subjects], dtype=np.int64).reshape(-1, 3)  # (seg, start, stop)
        counts = where[:, 2] - where[:, 1]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        names = ("features",) + (("indices", "positions") if meta else ())
        gathered: dict[str, np.ndarray] = {}
        for name in names:
            parts = []
            for k in np.unique(where[:, 0]):
                ds = self.segments[int(k)].file["planes"][plane][name]
                if not len(parts):
                    gathered[name] = np.empty((int(offsets[-1]), *ds.shape[1:]), dtype=ds.dtype)
                dst = gathered[name]
                sel = np.flatnonzero(where[:, 0] == k)
                starts, stops, ats = where[sel, 1], where[sel, 2], offsets[sel]
                wanted = int((stops - starts).sum())
                if wanted >= 0.25 * ds.shape[0]:
                    # one sequential read, then a vectorised gather (row r of subject j -> ats[j] + r)
                    block = ds[()]
                    n_rows = stops - starts
                    src = np.repeat(starts - np.cumsum(np.r_[0, n_rows[:-1]]), n_rows) + np.arange(wanted)
                    dst_rows = np.repeat(ats - np.cumsum(np.r_[0, n_rows[:-1]]), n_rows) + np.arange(wanted)
                    if wanted and src[-1] - src[0] + 1 == wanted and np.all(np.diff(src) == 1) \
                            and dst_rows[-1] - dst_rows[0] + 1 == wanted:
                        dst[dst_rows[0]:dst_rows[0] + wanted] = block[src[0]:src[0] + wanted]  # stored order
                    else:
                        _gather_rows(dst, dst_rows, block, src)
                    del block
                else:
                    for start, stop, at in _runs(zip(starts.tolist(), stops.tolist(), ats.tolist())):
                        dst[at:at + stop - start] = ds[start:stop]
                parts.append(k)
            if name not in gathered:  # no subjects asked for
                ds = self.segments[0].file["planes"][plane][name] if self.segments else None
                gathered[name] = np.empty((0, *(ds.shape[1:] if ds is not None else ())), np.float32)
        X = gathered["features"] if dtype is None else (
            _as_float32(gathered["features"]) if np.dtype(dtype) == np.float32
            else gathered["features"].astype(dtype))
        if meta:
            return X, offsets, {"indices": gathered["indices"].astype(np.int64),
                                "positions": gathered["positions"].astype(np.float32)}
        return X, offsets

    def load_slices(self, subjects: Sequence[str] | None = None, planes: Sequence[str] | None = None
                    ) -> dict[str, list[np.ndarray]]:
        """Features of many subjects and planes: plane -> list (aligned with ``subjects``) of (S_i, D).

        Args:
            subjects: default: :meth:`subjects` (complete in every plane).
            planes: default: every plane of the store.
        """
        subjects = list(self.subjects() if subjects is None else subjects)
        out = {}
        for plane in planes or self.planes:
            X, offsets = self.load_packed(subjects, plane)  # type: ignore[misc]
            out[plane] = [X[offsets[i]:offsets[i + 1]] for i in range(len(subjects))]
        return out

    # -- labels ----------------------------------------------------------------------------------
    def _labels_merged(self) -> tuple[dict[str, dict], dict[str, str]]:
        records: dict[str, dict] = {}
        types: dict[str, str] = {}
        for seg in self.segments:  # newest segment wins
            r, t = seg.labels()
            records.update(r)
            types.update(t)
        return records, types

    @property
    def label_types(self) -> dict[str, str]:
        """Label column -> ``categorical`` | ``continuous``, as in the manifest at caching time."""
        return self._labels_merged()[1]

    def labels(self):
        """Manifest labels stored at caching time: pandas DataFrame indexed by subject_id."""
        import pandas as pd

        records, types = self._labels_merged()
        frame = pd.DataFrame.from_dict(records, orient="index", columns=list(types))
        frame.index.name = "subject_id"
        for col, kind in types.items():
            if kind == "continuous":
                frame[col] = pd.to_numeric(frame[col], errors="coerce")
        return frame

    # -- volume embeddings -----------------------------------------------------------------------
    def volume_embedding_names(self) -> list[str]:
        names: list[str] = []
        for seg in self.segments:
            names += [n for n in seg.volume_names() if n not in names]
        return names

    def volume_embeddings(self, name: str) -> tuple[list[str], np.ndarray, dict]:
        """One set of volume embeddings: (ids, X (N, D) float32, provenance)."""
        for seg in reversed(self.segments):  # newest wins
            group = seg.volume_group(name)
            if group is not None:
                ids = [s.decode() if isinstance(s, bytes) else str(s) for s in group["ids"][()]]
                return ids, group["X"][()].astype(np.float32), json.loads(group.attrs.get("provenance", "{}"))
        raise KeyError(f"{self.path}: no volume embeddings {name!r} (have: {self.volume_embedding_names()})")

    def write_volume_embeddings(self, name: str, ids: Sequence[str], X: np.ndarray,
                                provenance: Mapping[str, Any] | None = None) -> None:
        """Stores a set of volume embeddings (replacing a set of the same name).

        Written as a new part segment (atomic; the main file is not rewritten). ``provenance``
        should say what made them (aggregator and parameters, or the 3D encoder and its weights);
        the date, host and versions are added, and the slice feature set they came from if any.

        Args:
            name: e.g. ``mean`` or ``ssl/simclr3d``.
            ids: N subject ids.
            X: (N, D) embeddings.
        """
        self._require_writable()
        X = np.asarray(X, dtype=np.float32)
        ids = [str(i) for i in ids]
        if X.ndim != 2 or X.shape[0] != len(ids):
            raise ValueError(f"volume embeddings {name!r}: X has shape {X.shape}, expected ({len(ids)}, D)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"volume embeddings {name!r}: duplicate subject ids")
        if not np.isfinite(X).all():
            raise ValueError(f"volume embeddings {name!r}: {int((~np.isfinite(X)).sum())} NaN/Inf values")
        prov = {**run_context(), **dict(provenance or {})}
        if self.exists() and self.feature_set:
            prov.setdefault("slice_feature_set", self.feature_set)
        with self.writer_lock():
            self._commit_part(volumes={name: (ids, X, prov)})
            self._fold_parts()
        self.refresh()

    def write_labels(self, labels: Mapping[str, Mapping[str, Any]], label_types: Mapping[str, str]) -> None:
        """Stores label rows {subject_id: {column: value}} (e.g. for a store written by a 3D encoder)."""
        self._require_writable()
        with self.writer_lock():
            self._commit_part(labels=(dict(labels), dict(label_types)))
            self._fold_parts()
        self.refresh()

    # -- writing (jobs) --------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path}: store opened read-only; use FeatureStore(path, mode='a')")

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Exclusive lock for writers of this store (two jobs must not write the same file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{self.path}: another process is writing this store "
                                   f"(lock {lock_path}); give each job its own --out or --shard") from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def check_identity(self, provenance: Mapping[str, Any]) -> None:
        """Refuses to add features of another feature set to this store.

        Raises:
            StoreMismatch: naming the provenance keys that differ.
        """
        if not self.exists() or not self.feature_set:
            return
        want = config_hash_of(provenance)
        if want == self.feature_set:
            return
        diffs = diff_dicts(identity_of(self.provenance), identity_of(provenance))
        raise StoreMismatch(
            f"{self.path} holds feature set {self.feature_set} "
            f"({self.provenance.get('encoder')}); these features would be feature set {want}, which "
            f"differs in: {'; '.join(diffs[:6]) or '(format)'}. Write them to another store (--out) "
            f"or use the same settings."
        )

    def clean_tmp(self) -> int:
        """Deletes ``*.tmp`` files left by a killed writer (call under :meth:`writer_lock`)."""
        n = 0
        for folder in (self.path.parent, self.parts_dir):
            if folder.is_dir():
                for tmp in folder.glob(f"{self.path.name if folder == self.path.parent else 'part-'}*.tmp"):
                    tmp.unlink(missing_ok=True)
                    n += 1
        return n

    def _commit_part(self, *, provenance: Mapping[str, Any] | None = None,
                     subjects: Sequence[SubjectFeatures] = (), dtype: str = "float16",
                     label_types: Mapping[str, str] | None = None,
                     volumes: Mapping[str, tuple[list[str], np.ndarray, dict]] | None = None,
                     labels: tuple[dict, dict] | None = None, history: Sequence[dict] = ()) -> Path:
        """Writes one part segment atomically and returns its path."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.parts_dir / f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.h5"
        if labels is None and subjects:
            labels = ({s.subject_id: s.labels for s in subjects if s.labels is not None},
                      dict(label_types or {}))
        with _atomic_h5(path) as f:
            _init_segment(f, provenance or {}, history)
            if subjects:
                _write_planes(f, subjects, dtype)
            if labels is not None and (labels[0] or labels[1]):
                _write_labels(f, *labels)
            for name, (ids, X, prov) in (volumes or {}).items():
                _write_volume(f, name, ids, X, prov)
        _fsync_dir(self.parts_dir)
        self._segments, self._lookup = None, None
        return path

    def commit_subjects(self, subjects: Sequence[SubjectFeatures], provenance: Mapping[str, Any], *,
                        dtype: str = "float16", label_types: Mapping[str, str] | None = None) -> Path:
        """Writes completed subjects as one atomic part segment (call under :meth:`writer_lock`)."""
        self._require_writable()
        return self._commit_part(provenance=provenance, subjects=subjects, dtype=dtype,
                                 label_types=label_types)

    def _fold_parts(self, max_parts: int = 8) -> None:
        """Merges many small parts into one part, leaving the (large) main file untouched.

        Keeps reads cheap after many ``write_volume_embeddings`` calls without rewriting the slice
        features. The merged part is named after the parts it replaces, so the order is kept.
        """
        self.refresh()
        parts = [p for p in self.segment_paths() if p != self.path]
        if len(parts) <= max_parts:
            return
        segments = [_Segment(p) for p in parts]
        _merge_segments(segments, parts[-1].with_name(parts[-1].stem + "-folded.h5"))
        for seg in segments:
            seg.close()
        for p in parts:
            p.unlink(missing_ok=True)
        self.refresh()

    def compact(self, history: Sequence[dict] = (), provenance: Mapping[str, Any] | None = None) -> None:
        """Merges the main file and all parts into a fresh main file, then deletes the parts.

        Crash-safe: the new file is complete and fsync'ed before it replaces the old one; parts are
        deleted afterwards, and a part whose subjects are already in the main file is ignored.
        """
        self._require_writable()
        if history:  # a job's record travels in its own tiny part, like any other write
            self._commit_part(provenance=provenance or self.provenance, history=history)
        parts = [p for p in self.segment_paths() if p != self.path]
        if not parts:
            return
        self.refresh()
        segments = list(self.segments)
        _merge_segments(segments, self.path)
        for seg in segments:
            seg.close()
        for p in parts:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.parts_dir.rmdir()
        self.refresh()

    def summary(self) -> str:
        """A few lines describing the store (``slice2vol cache info``)."""
        prov = self.provenance
        lines = [f"{self.path}: feature set {self.feature_set or '(none)'}"]
        if prov:
            sc = prov.get("slice_config", {})
            dim = self.embed_dim if self.planes else "-"
            lines.append(f"  encoder {prov.get('encoder')} weights {prov.get('weights')} "
                         f"sha256 {str(prov.get('weights_sha256'))[:12] or '-'} dim {dim} "
                         f"dtype {prov.get('dtype')} tokens {prov.get('tokens')}")
            lines.append(f"  slices: size {sc.get('size')} stride {sc.get('stride')} context "
                         f"{sc.get('context')} min_foreground {sc.get('min_foreground')}")
            lines.append(f"  made {prov.get('created')} on {prov.get('host')} with slice2vol "
                         f"{prov.get('package_version')}, torch {prov.get('versions', {}).get('torch')}")
        for plane in self.planes:
            lines.append(f"  {plane}: {len(self.subjects(plane))} subjects")
        lines.append(f"  complete subjects: {len(self.subjects())}; labels: {self.label_types}")
        names = self.volume_embedding_names()
        if names:
            lines.append(f"  volume embeddings: {', '.join(names)}")
        parts = len(self.segment_paths()) - int(self.path.exists())
        if parts:
            lines.append(f"  {parts} uncompacted part(s) in {self.parts_dir}")
        failed = [f for e in self.history for f in e.get("failures", [])]
        if failed:
            lines.append(f"  {len(failed)} failure(s) recorded by jobs (retried by the next run)")
        return "\n".join(lines)


def _gather_rows(dst: np.ndarray, dst_rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray) -> None:
    """dst[dst_rows] = src[src_rows], with torch's multithreaded indexing (numpy's is single-threaded)."""
    import torch

    if dst.dtype == np.float16 or src.dtype == np.float16 or dst.dtype == src.dtype:
        torch.from_numpy(dst)[torch.from_numpy(dst_rows)] = torch.from_numpy(src)[torch.from_numpy(src_rows)]
    else:
        dst[dst_rows] = src[src_rows]


def _as_float32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch (vectorised F16C; numpy's conversion is ~10x slower)."""
    if a.dtype == np.float16 and a.size:
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()
    return a.astype(np.float32, copy=False)


def config_hash_of(provenance: Mapping[str, Any]) -> str:
    """The feature-set name: a hash of the identity part of a provenance dict."""
    from slice2vol.config import config_hash

    return config_hash(_jsonable(identity_of(provenance)))


def _vol_key(name: str) -> str:
    """Set names may contain '/' (``ssl/simclr3d``); HDF5 would make that a nested group."""
    return name.replace("%", "%25").replace("/", "%2F")


def _vol_name(key: str) -> str:
    return key.replace("%2F", "/").replace("%25", "%")


def _runs(items: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Joins (start, stop, at) row ranges that are consecutive in source and destination."""
    runs: list[list[int]] = []
    for start, stop, at in items:
        if runs and runs[-1][1] == start and runs[-1][2] + (runs[-1][1] - runs[-1][0]) == at:
            runs[-1][1] = stop
        else:
            runs.append([start, stop, at])
    return [tuple(r) for r in runs]  # type: ignore[misc]


# -- segment writers --------------------------------------------------------------------------------
def _init_segment(f: h5py.File, provenance: Mapping[str, Any], history: Sequence[dict]) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["feature_set"] = config_hash_of(provenance) if provenance else ""
    f.attrs["provenance"] = _dumps(provenance or {})
    f.attrs["history"] = _dumps(list(history))


def _write_planes(f: h5py.File, subjects: Sequence[SubjectFeatures], dtype: str) -> None:
    planes = sorted({p for s in subjects for p in s.planes})
    for plane in planes:
        have = [s for s in subjects if plane in s.planes]
        items = [s.planes[plane] for s in have]
        counts = [len(it.features) for it in items]
        group = f.create_group(f"planes/{plane}")
        group.create_dataset("ids", data=np.array([s.subject_id for s in have], dtype=object), dtype=_STR)
        group.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        dim = max(it.features.shape[1] if it.features.ndim == 2 else 0 for it in items)
        group.create_dataset("features", data=np.concatenate(
            [it.features.reshape(-1, dim) for it in items]).astype(dtype))
        group.create_dataset("indices", data=np.concatenate([it.indices for it in items]).astype(np.int32))
        group.create_dataset("positions", data=np.concatenate(
            [it.positions.reshape(-1, 3) for it in items]).astype(np.float32))
        with_tokens = [it for it in items if it.tokens is not None]
        if with_tokens:
            ref = max(with_tokens, key=lambda it: it.tokens.size)  # type: ignore[union-attr]
            shape = ref.tokens.shape[1:]  # type: ignore[union-attr]
            ds = group.create_dataset("tokens", data=np.concatenate(
                [np.zeros((0, *shape)) if it.tokens is None else it.tokens.reshape(-1, *shape)
                 for it in items]).astype(dtype))
            ds.attrs["grid"] = np.array(ref.grid or (0, 0), dtype=np.int64)


def _write_labels(f: h5py.File, records: Mapping[str, Any], types: Mapping[str, str]) -> None:
    ds = f.create_dataset("labels", data=_dumps(records), dtype=_STR)
    ds.attrs["label_types"] = _dumps(dict(types))


def _write_volume(f: h5py.File, name: str, ids: Sequence[str], X: np.ndarray, prov: Mapping) -> None:
    group = f.create_group(f"volumes/{_vol_key(name)}")
    group.attrs["name"] = name
    group.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=_STR)
    group.create_dataset("X", data=np.asarray(X, dtype=np.float32))
    group.attrs["provenance"] = _dumps(dict(prov))


def _merge_segments(segments: Sequence[_Segment], out: Path, *, extra_history: Sequence[dict] = (),
                    provenance: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Streams segments into one new segment at ``out`` (atomic). The first copy of a subject wins.

    Returns:
        plane -> number of duplicate subjects left out.
    """
    if provenance is None:
        provenance = next((s.provenance for s in segments if s.feature_set), {})
    history: list[dict] = []
    for seg in segments:
        history.extend(e for e in seg.history if e not in history)
    history.extend(extra_history)
    duplicates: dict[str, int] = {}
    with _atomic_h5(Path(out)) as f:
        _init_segment(f, provenance, history)
        planes = sorted({p for seg in segments for p in seg.index()})
        for plane in planes:
            entries: list[tuple[int, str, int, int]] = []
            seen: set[str] = set()
            for k, seg in enumerate(segments):
                ids, offsets = seg.index().get(plane, ([], np.zeros(1, np.int64)))
                for i, sid in enumerate(ids):
                    if sid in seen:
                        duplicates[plane] = duplicates.get(plane, 0) + 1
                        continue
                    seen.add(sid)
                    entries.append((k, sid, int(offsets[i]), int(offsets[i + 1])))
            counts = np.array([b - a for _, _, a, b in entries], dtype=np.int64)
            offsets_out = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            total = int(offsets_out[-1])
            group = f.create_group(f"planes/{plane}")
            group.create_dataset("ids", data=np.array([e[1] for e in entries], dtype=object), dtype=_STR)
            group.create_dataset("offsets", data=offsets_out)
            src_groups = {k: seg.file["planes"][plane] for k, seg in enumerate(segments)
                          if plane in seg.index()}
            rows_from = {k: sum(b - a for kk, _, a, b in entries if kk == k) for k in src_groups}
            for name in ("features", "indices", "positions", "tokens"):
                having = [g for g in src_groups.values() if name in g]
                if not having:
                    continue
                # a part holding only zero-slice subjects has no tokens dataset: nothing to copy from it
                if any(name not in g and rows_from[k] for k, g in src_groups.items()):
                    raise StoreMismatch(f"{out}: some segments have {plane} {name}, others do not")
                first = max(having, key=lambda g: g[name].shape[-1] if g[name].ndim > 1 else 0)
                src = first[name]
                dst = group.create_dataset(name, shape=(total, *src.shape[1:]), dtype=src.dtype)
                for attr, value in src.attrs.items():
                    dst.attrs[attr] = value
                by_k: dict[int, list[tuple[int, int, int]]] = {}
                for (k, _, a, b), at in zip(entries, offsets_out[:-1]):
                    by_k.setdefault(k, []).append((a, b, int(at)))
                for k, items in by_k.items():
                    if name not in src_groups[k]:
                        continue  # zero rows from this segment (checked above)
                    ds = src_groups[k][name]
                    for a, b, at in _runs(items):
                        for lo in range(a, b, _COPY_ROWS):
                            hi = min(b, lo + _COPY_ROWS)
                            dst[at + lo - a:at + hi - a] = ds[lo:hi]
        records: dict[str, dict] = {}
        types: dict[str, str] = {}
        for seg in segments:
            r, t = seg.labels()
            records.update(r)
            types.update(t)
        if records or types:
            _write_labels(f, records, types)
        volumes: dict[str, _Segment] = {}
        for seg in segments:
            for name in seg.volume_names():
                volumes[name] = seg  # newest wins
        for name, seg in volumes.items():
            f.copy(seg.volume_group(name), f.require_group("volumes"), name=_vol_key(name))
    return duplicates


def merge_stores(out: str | Path, inputs: Sequence[str | Path], *, allow_version_mismatch: bool = False
                 ) -> dict[str, Any]:
    """Joins shard stores into one file, after checking that their provenance agrees.

    Args:
        out: the merged store (must not be one of the inputs).
        inputs: shard stores (their uncompacted parts are included).
        allow_version_mismatch: accept shards made with different library versions.

    Returns:
        counts: ``subjects`` per plane and ``duplicates`` left out (first input wins).

    Raises:
        StoreMismatch: feature sets, label types or library versions differ (the message names the key).
    """
    out = Path(out)
    stores = [FeatureStore(p) for p in inputs]
    if not stores:
        raise ValueError("merge: no input store given")
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise ValueError(f"merge: output {out} is also an input")
    ref = next((s for s in stores if s.feature_set), stores[0])
    ref_prov = ref.provenance
    for store in stores:
        if store.feature_set and store.feature_set != ref.feature_set:
            diffs = diff_dicts(identity_of(ref_prov), identity_of(store.provenance))
            raise StoreMismatch(
                f"merge: {store.path} (feature set {store.feature_set}) and {ref.path} (feature set "
                f"{ref.feature_set}) were made differently: {'; '.join(diffs[:6])}")
        if store.feature_set and not allow_version_mismatch:
            diffs = diff_dicts(ref_prov.get("versions", {}), store.provenance.get("versions", {}), "versions")
            if diffs:
                raise StoreMismatch(f"merge: {store.path} and {ref.path} were made with different library "
                                    f"versions: {'; '.join(diffs[:6])} (allow with --allow-version-mismatch)")
        types = store.label_types
        ref_types = ref.label_types
        for col in set(types) & set(ref_types):
            if types[col] != ref_types[col]:
                raise StoreMismatch(f"merge: label {col!r} is {types[col]} in {store.path} "
                                    f"but {ref_types[col]} in {ref.path}")
    segments = [seg for store in stores for seg in store.segments]
    event = {**run_context(), "event": "merge", "inputs": [str(p) for p in inputs]}
    event.pop("versions")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FeatureStore(out, mode="a").writer_lock():
        duplicates = _merge_segments(segments, out, extra_history=[event], provenance=ref_prov)
    for store in stores:
        store.close()
    merged = FeatureStore(out)
    counts = {"subjects": {p: len(merged.subjects(p)) for p in merged.planes}, "duplicates": duplicates}
    merged.close()
    if any(duplicates.values()):
        log.warning("merge: %s subject(s) appeared in several inputs; kept the first copy", duplicates)
    return counts


# -- reading as a torch Dataset ---------------------------------------------------------------------
class SliceBagDataset:
    """Per-subject bags of cached slice features, as a map-style torch Dataset.

    Each item is a dict: ``subject_id``; ``features`` plane -> float32 Tensor (S, D); ``positions``
    plane -> Tensor (S, 3); ``indices`` plane -> Tensor (S,); ``label`` (if ``label`` given).
    Safe with DataLoader workers (the store reopens per process). With ``preload=True`` everything is
    read once with :meth:`FeatureStore.load_packed` (fast; RAM = N x D x 4 bytes).

    Args:
        store: a :class:`FeatureStore` or its path.
        subjects: default: subjects complete in ``planes``.
        planes: default: every plane of the store.
        label: a label column of :meth:`FeatureStore.labels` to return with each bag.
    """

    def __init__(self, store: FeatureStore | str | Path, subjects: Sequence[str] | None = None,
                 planes: Sequence[str] | None = None, label: str | None = None, preload: bool = False) -> None:
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.planes = list(planes or self.store.planes)
        if subjects is None:
            have = [set(self.store.subjects(p)) for p in self.planes]
            subjects = [s for s in self.store.subjects(self.planes[0]) if all(s in h for h in have)]
        self.subjects = list(subjects)
        self.label = label
        self._labels = self.store.labels()[label].to_dict() if label else None
        self._packed = None
        if preload:
            self._packed = {p: self.store.load_packed(self.subjects, p, meta=True) for p in self.planes}

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        sid = self.subjects[i]
        item: dict[str, Any] = {"subject_id": sid, "features": {}, "positions": {}, "indices": {}}
        for plane in self.planes:
            if self._packed is not None:
                X, offsets, meta = self._packed[plane]
                a, b = offsets[i], offsets[i + 1]
                feats, pos, idx = X[a:b], meta["positions"][a:b], meta["indices"][a:b]
            else:
                feats = self.store.slice_features(sid, plane)
                m = self.store.slice_meta(sid, plane)
                pos, idx = m["positions"], m["indices"]
            item["features"][plane] = torch.from_numpy(np.ascontiguousarray(feats))
            item["positions"][plane] = torch.from_numpy(np.ascontiguousarray(pos))
            item["indices"][plane] = torch.from_numpy(np.ascontiguousarray(idx))
        if self._labels is not None:
            item["label"] = self._labels.get(sid)
        return item


def pad_bags(items: Sequence[dict[str, Any]], plane: str):
    """Collates bags of one plane: features (B, S_max, D) zero-padded and mask (B, S_max) bool."""
    import torch

    feats = [it["features"][plane] for it in items]
    s_max = max(1, max(len(f) for f in feats))
    dim = feats[0].shape[1] if feats[0].ndim == 2 else 0
    out = torch.zeros(len(feats), s_max, dim)
    mask = torch.zeros(len(feats), s_max, dtype=torch.bool)
    for i, f in enumerate(feats):
        out[i, :len(f)] = f
        mask[i, :len(f)] = True
    return out, mask
