"""The HDF5 feature store: slice features per subject and plane, volume embeddings, labels, provenance.

A store is one HDF5 file ``STORE.h5`` (the *main segment*). While a caching job runs, or after it was
killed, completed subjects also sit in committed *part segments* in ``STORE.h5.parts/``; every job
ends by compacting them into ``STORE.h5``, and volume embeddings and labels are written into
``STORE.h5`` directly, so a finished store is one file that plain h5py reads (``docs/cache.md``
gives the recipe). Every segment has the same layout::

    /                       attrs: format, format_version, feature_set, provenance (JSON), history (JSON),
                            invalidated (JSON {subject: [planes]}, optional: older copies made void)
    /planes/<plane>/ids            (n,) str      subjects of this plane, in row order
    /planes/<plane>/offsets        (n + 1,) int64 rows of subject i are offsets[i]:offsets[i + 1]
    /planes/<plane>/features       (N, D) float16 (or float32), one contiguous dataset for all subjects
    /planes/<plane>/indices        (N,) int32    slice index along the plane's RAS axis
    /planes/<plane>/positions      (N, 3) float32 slice centre in world mm (RAS)
    /planes/<plane>/tokens         (N, T, Dt)    optional patch tokens, attrs grid = (gh, gw)
    /planes/<plane>/checksums      (n,) str      sha256 of subject i's features rows, as stored
    /planes/<plane>/meta_checksums (n,) str      sha256 of its indices rows then positions rows
    /planes/<plane>/token_checksums (n,) str     sha256 of its tokens rows (with tokens)
    /planes/<plane>/inputs         (n,) str      JSON: fingerprint of the input files, oblique handling
    /labels                   JSON records {subject_id: {column: value}}, attrs label_types (JSON)
    /volumes/<name>/ids       (N,) str;  /volumes/<name>/X (N, D) float32; attrs provenance (JSON), name,
                              checksum ('/' in a set name is stored as %2F)

Segments are written once, completely, to a temporary name, flushed, fsync'ed and renamed into place
(``os.replace`` is atomic on POSIX), so a SIGKILL at any moment leaves only whole segments and
garbage ``*.tmp`` files. Readers see the union of the main file and the committed parts; the
*newest* segment holding a (subject, plane) wins (a recomputed subject shadows its damaged or stale
copy), and likewise for volume-embedding sets and labels. A segment's ``invalidated`` makes the older
copies it names void (a subject whose input changed and whose recompute failed: its rows describe
the old input); a newer copy counts again. Compaction merges everything into a fresh main file,
renamed over the old one, then deletes the parts.

Every read checks the rows it returns against their checksum (:class:`StoreCorrupt` names the file,
subject and plane); :meth:`FeatureStore.verify` checks a whole store (``slice2vol cache verify``).

``feature_set`` is a hash of the *identity* of the features (encoder, weights sha256, model state
sha256, volume and slice configs, dtype, tokens); appending features made under another identity is
refused with :class:`StoreMismatch`, naming the keys that differ.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from slice2vol import __version__

log = logging.getLogger(__name__)

FORMAT = "slice2vol.features"
#: 2: per-subject checksums and input fingerprints; the newest copy of a subject wins.
FORMAT_VERSION = 2
# Keys of the provenance that do not change the features: they may differ between shards and runs.
# ``dtype_fallback`` records *why* a float16 job stored float32; the features are those of float32.
VOLATILE_KEYS = ("created", "host", "versions", "package_version", "weights_path", "argv", "dtype_fallback",
                 "inference")
CHECKSUM = "sha256"
_STR = h5py.string_dtype("utf-8")
_COPY_ROWS = 1 << 16  # rows copied / hashed at a time when compacting, merging, verifying
_PER_SUBJECT = ("checksums", "meta_checksums", "token_checksums", "inputs")
_SHARD_NAME = re.compile(r"^(?P<base>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)(?P<suffix>\.[^.]+)$")


class StoreError(ValueError):
    """A feature store that cannot be used as asked; the message starts with the file."""


class StoreMismatch(StoreError):
    """Features, stores or shards whose provenance does not agree (the message names the keys)."""


class StoreCorrupt(StoreError):
    """Stored data that fails its checksum or whose layout is inconsistent (names file, subject, plane)."""


class StaleEmbeddings(StoreError):
    """Volume embeddings aggregated from slice features that were recomputed or removed since."""


class StoreLocked(StoreError, RuntimeError):
    """Another process holds the store's writer lock (the message names the lock and its holder)."""


class ShardsIncomplete(StoreError):
    """``merge`` was given an incomplete set of shards (missing files or unfinished jobs)."""


class StoreWriteFailed(StoreError, OSError):
    """A store file could not be written (disk full, quota, permissions): nothing was replaced.

    ``why`` is the reason in words, without the file or what became of the store.
    """

    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message)
        self.why = why


def _write_failure(path: Path, err: BaseException) -> StoreWriteFailed:
    """One line for an error while writing ``path``'s new version. Disk errors arrive as the OSError of
    :class:`_GuardedFile`'s own write, with its errno (HDF5 never sees them)."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "no space left on the device (or the disk quota or file size limit is reached)"
    elif code == errno.EROFS:
        why = "its file system is mounted read-only"
    elif code in (errno.EACCES, errno.EPERM):
        folder = path.parent if str(path.parent) else Path(".")
        # a writable folder with a file that cannot be replaced: an immutable file (chattr +i) or an ACL
        why = ("the file cannot be replaced although its folder is writable (marked immutable? lsattr shows "
               "it; chattr -i clears it)" if os.access(folder, os.W_OK) else "no permission to write in its folder")
    else:
        why = " ".join(str(err).split())
    return StoreWriteFailed(f"{path}: could not be written: {why}; the store is as it was before this write "
                            "(free space or fix the folder, then rerun)", why)


def checked_store_path(path: str | Path) -> Path:
    """``path`` as a Path, or :class:`StoreError` when it is a folder ('.', '..', an existing
    directory): a store, its parts folder, lock and log are named after a file name.

    A symbolic link is resolved to its target (also one that does not exist yet): the store is the
    target file. Its new versions replace the target, not the link, and its lock, parts folder and
    temporary files are the target's, so a job given the link and one given the target see each
    other's lock instead of writing the same file at once.
    """
    out = Path(path)
    if not out.name or out.name == ".." or out.is_dir():
        raise StoreError(f"{path}: is a directory; a feature store is a file, e.g. {out / 'feats.h5'}")
    out = _link_target(out, path)
    try:
        mode = out.stat().st_mode
    except OSError:
        return out  # absent (a writer creates it; a reader says "not found") or unreadable (the open says why)
    if not stat.S_ISREG(mode):
        # opening a named pipe blocks until some process writes to it: refuse before HDF5 tries
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise StoreError(f"{path}: {kind}, not a regular file; a feature store is an HDF5 file")
    return out


def _link_target(path: Path, given: str | Path | None = None) -> Path:
    """The file a symbolic link ``path`` points to (through every link of a chain); ``path`` itself
    when it is no link. Only a link as the last component is resolved: a linked folder names the same
    folder, so the store's sibling files are the same files anyway."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops where a chain loops
        raise StoreError(f"{given if given is not None else path}: a symbolic link that loops back on itself "
                         f"(through {target}); point it at a store file, or give the store file itself")
    return target


# -- provenance helpers --------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    """Versions of the libraries that can change features, without importing them."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    # installed versions cannot change under a running process; reading the package metadata costs
    # ~30 ms, twice per caching job
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


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- checksums ------------------------------------------------------------------------------------
def block_sha256(*arrays: np.ndarray) -> str:
    """sha256 of arrays' bytes as stored (C order, little-endian), hashed one after the other.

    This is the per-subject checksum of a store: ``block_sha256(features[a:b])`` for ``checksums``,
    ``block_sha256(indices[a:b], positions[a:b])`` for ``meta_checksums``; plain
    ``hashlib.sha256(x.tobytes())`` gives the same for the little-endian arrays h5py returns.
    """
    digest = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        digest.update(np.ascontiguousarray(a).data)
    return digest.hexdigest()


def volume_sha256(ids: Sequence[str], X: np.ndarray) -> str:
    """Checksum of a volume-embedding set: sha256 of the ids joined by newlines (utf-8), then X (float32)."""
    digest = hashlib.sha256("\n".join(ids).encode())
    digest.update(np.ascontiguousarray(np.asarray(X, dtype="<f4")).data)
    return digest.hexdigest()


# -- files ----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: bytes of writes after a failed one that a :class:`_GuardedFile` keeps to serve HDF5's reads of them
_OVERLAY_MAX = 256 << 20


def _stop_if_failed(f: h5py.File) -> None:
    """Raises :class:`StoreWriteFailed` when a write under the :class:`_AtomicH5` of ``f`` has failed:
    a long copy stops at its next block instead of pushing gigabytes into a file that is discarded.
    (The context manager's exit reports the write's own error.)"""
    guard = getattr(f, "_slice2vol_guard", None)
    if guard is not None and guard.error is not None:
        raise StoreWriteFailed(f"{f.filename}: a write failed", str(guard.error))


def _atomic_h5(path: Path) -> "_AtomicH5":
    return _AtomicH5(path)


class _GuardedFile(io.RawIOBase):
    """The temporary file under an :class:`_AtomicH5`, given to h5py as a file object.

    HDF5 does not survive a failed write: after ENOSPC its datasets can neither flush nor close, and
    at exit the library's own clean-up of them crashes the interpreter (SIGSEGV after the job's error
    message, so a scheduler sees a crash instead of exit status 2). This file keeps the first write
    error and accepts every write after it, so HDF5 finishes and closes normally; the file is then
    discarded and the error reported. Writes after the error are kept in memory (up to
    :data:`_OVERLAY_MAX` bytes) and served back to reads: HDF5 reads its own metadata back while it
    works, and a dropped block read as zeros crashed it (SIGSEGV creating the next dataset when a
    nearly full disk failed a compaction). Writers stop early when :attr:`error` is set (see
    :func:`_stop_if_failed`), so the overlay holds little more than metadata. Writing through it
    costs what the sec2 driver costs (a 576 MiB file in 1.25-1.6 s both ways).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.fh = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None
        self.overlay: list[tuple[int, bytes]] = []  # (offset, data) written after the error, oldest first
        self.overlay_bytes = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readinto(self, buffer) -> int:  # type: ignore[override]
        start = self.fh.tell()
        got = self.fh.readinto(buffer) or 0
        if not self.overlay:
            return got
        view = memoryview(buffer).cast("B")
        end = start + len(view)
        for at, data in self.overlay:  # oldest first: a later write wins
            lo, hi = max(at, start), min(at + len(data), end)
            if lo < hi:
                if lo - start > got:  # the block lies past the file's end: what is between reads as zeros
                    view[got:lo - start] = bytes(lo - start - got)
                view[lo - start:hi - start] = data[lo - at:hi - at]
                got = max(got, hi - start)
        self.fh.seek(start + got)
        return got

    def write(self, data) -> int:  # type: ignore[override]
        size = memoryview(data).nbytes
        start = self.fh.tell()
        if self.error is None:
            try:
                written = self.fh.write(data)
                while written is not None and written < size:  # a raw file may write part of a buffer
                    more = self.fh.write(memoryview(data).cast("B")[written:])
                    written += more or 0
                    if not more:
                        break
                return size
            except OSError as err:
                self.error = err
        if self.overlay_bytes + size <= _OVERLAY_MAX:
            self.overlay.append((start, bytes(memoryview(data).cast("B"))))
            self.overlay_bytes += size
        self.fh.seek(start + size)
        return size

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.fh.truncate(size)
        except OSError as err:
            self.error = self.error or err
            return self.fh.tell() if size is None else size

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()
        super().close()


class _AtomicH5:
    """Context manager: an HDF5 file written to ``<path>.<uuid>.tmp``, fsync'ed and renamed to path.

    A write that fails (full disk, quota, file size limit) leaves nothing behind and raises
    :class:`StoreWriteFailed` naming ``path``, in one line.
    """

    def __init__(self, path: Path) -> None:
        # os.replace over a symbolic link would replace the link with a file of its own and leave the
        # target as it was: the new version goes to the target, beside it (stores resolve their path
        # when opened; this catches a caller that did not)
        self.path = _link_target(Path(path))
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.guard: _GuardedFile | None = None

    def __enter__(self) -> h5py.File:
        try:
            self.guard = _GuardedFile(self.tmp)
            self.file = h5py.File(self.guard, "w", libver="latest")
            self.file._slice2vol_guard = self.guard  # for _stop_if_failed
        except OSError as err:
            self._discard()
            raise _write_failure(self.path, self.guard.error if self.guard and self.guard.error else err) from None
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        guard = self.guard
        assert guard is not None
        try:
            try:
                self.file.close()
            except (OSError, RuntimeError) as err:
                if exc_type is None and guard.error is None:
                    raise _write_failure(self.path, err) from None
            if guard.error is not None:
                # whatever the block raised after a dropped write (HDF5 reading back what it could not
                # write) follows from it: report the write
                raise _write_failure(self.path, guard.error) from None
            if exc_type is None:
                try:
                    guard.fsync()
                    guard.close()
                    with contextlib.suppress(OSError):
                        # the rewritten file keeps the store's permissions (664 for a group-shared store,
                        # 444 for a frozen one) instead of the process's default
                        os.chmod(self.tmp, stat.S_IMODE(self.path.stat().st_mode))
                    os.replace(self.tmp, self.path)
                except OSError as err:
                    raise _write_failure(self.path, err) from None
                _fsync_dir(self.path.parent)
        finally:
            self._discard()

    def _discard(self) -> None:
        if self.guard is not None and not self.guard.closed:
            with contextlib.suppress(OSError):
                self.guard.close()
        with contextlib.suppress(OSError):
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
    """Everything a job writes for one subject: plane -> :class:`PlaneFeatures`, plus manifest labels.

    ``inputs`` (JSON-able) describes what the features were made from: the input files' fingerprint
    (``files``: modality -> size, mtime_ns, sha256) and the oblique handling; it is the resume key.
    """

    subject_id: str
    planes: dict[str, PlaneFeatures]
    labels: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None


# -- one segment (an HDF5 file of the store) ------------------------------------------------------
@dataclass
class _PlaneIndex:
    """Where the subjects of one plane of one segment are, with their checksums and fingerprints."""

    ids: list[str]
    offsets: np.ndarray
    checksums: list[str] | None = None
    meta_checksums: list[str] | None = None
    token_checksums: list[str] | None = None
    inputs: list[str] | None = None

    def get(self, name: str, i: int) -> str:
        values = getattr(self, name)
        return values[i] if values is not None else ""


class _Segment:
    """Read side of one HDF5 file of the store; the handle is opened lazily and per process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._index: dict[str, _PlaneIndex] | None = None
        self.broken: dict[str, str] = {}  # plane -> why its group cannot be used

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork must not be used: HDF5 state is per process.
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: store segment not found (compacted meanwhile?)")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                hint = ("the file is damaged or not a feature store" if not self.path.parent.name.endswith(".parts")
                        else f"a damaged part of an unfinished job: move it out of {self.path.parent} to go on "
                             "without the subjects it held (the next caching run recomputes them)")
                raise StoreCorrupt(f"{self.path}: cannot open as HDF5 ({_short(err)}); {hint}") from None
            self._pid = os.getpid()
            if self._file.attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path}: not a slice2vol feature store (format attribute missing)")
            raw_version = self._file.attrs.get("format_version", 0)
            try:
                version = int(raw_version)
            except (TypeError, ValueError):
                raise StoreCorrupt(f"{self.path}: attribute 'format_version' is {_str(raw_version)!r}, not a "
                                   "whole number (edited by hand?)") from None
            if version > FORMAT_VERSION:
                raise StoreError(f"{self.path}: store format {version} is newer than this slice2vol "
                                 f"({FORMAT_VERSION}); upgrade slice2vol")
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._file.close()
        self._file = None

    def _attr_json(self, name: str, default: str) -> Any:
        raw = self.file.attrs.get(name, default)
        try:
            value = json.loads(_str(raw))
        except (ValueError, TypeError) as err:
            raise StoreCorrupt(f"{self.path}: attribute {name!r} is not valid JSON ({_short(err)})") from None
        expected = type(json.loads(default))  # a dict or a list, as written; an edited file may hold another
        if not isinstance(value, expected):
            raise StoreCorrupt(f"{self.path}: attribute {name!r} holds a JSON {type(value).__name__}, not the "
                               f"{expected.__name__} a store writes (edited by hand?)")
        return value

    @property
    def provenance(self) -> dict:
        return self._attr_json("provenance", "{}")

    @property
    def history(self) -> list:
        return self._attr_json("history", "[]")

    @property
    def feature_set(self) -> str:
        return _str(self.file.attrs.get("feature_set", ""))

    @property
    def invalidated(self) -> dict[str, list[str]]:
        """subject -> planes whose copies in *older* segments are void (``{}`` for most segments)."""
        value = self._attr_json("invalidated", "{}")
        if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in value.values()):
            raise StoreCorrupt(f"{self.path}: attribute 'invalidated' is not a JSON object subject -> [planes] "
                               "(edited by hand?)")
        return value

    @property
    def feature_rows(self) -> int:
        """Rows of slice features this segment holds, from the datasets' shapes (no data read).

        A segment without rows (a job's record, volume sets, labels, subjects of zero slices) stores
        nothing whose values depend on its feature set's dtype. A plane group whose size cannot be
        read counts as one row: unknown is treated as holding features.
        """
        rows = 0
        for group in self.file.get("planes", {}).values():
            try:
                if "features" in group:
                    rows += int(group["features"].shape[0])
                elif len(group.get("ids", ())):
                    return max(rows, 1)  # subjects without a features dataset: broken, not empty
            except (OSError, KeyError, ValueError, TypeError, AttributeError):
                return max(rows, 1)
        return rows

    def index(self) -> dict[str, _PlaneIndex]:
        """plane -> :class:`_PlaneIndex` of the plane groups that are consistent (others in ``broken``)."""
        if self._index is None:
            out: dict[str, _PlaneIndex] = {}
            for plane in self.file.get("planes", {}):
                try:
                    out[plane] = self._read_plane(plane)
                except StoreCorrupt as err:
                    self.broken[plane] = str(err)
            self._index = out
        return self._index

    def _read_plane(self, plane: str) -> _PlaneIndex:
        """Reads and validates one plane group: offsets against rows, per-subject arrays against ids."""
        where = f"{self.path}: /planes/{plane}"
        group = self.file["planes"][plane]

        def read(name: str, strings: bool = False):
            try:
                ds = group[name]
                return [_str(v) for v in ds[()]] if strings else ds[()]
            except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
                raise StoreCorrupt(f"{where}/{name} cannot be read ({_short(err)})") from None

        ids = read("ids", strings=True)
        offsets = np.asarray(read("offsets")).astype(np.int64).reshape(-1)
        try:
            rows = {name: int(group[name].shape[0]) for name in ("features", "indices", "positions", "tokens")
                    if name in group}
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise StoreCorrupt(f"{where} cannot be read ({_short(err)})") from None
        n_rows = rows.get("features", 0)
        if len(offsets) != len(ids) + 1:
            raise StoreCorrupt(f"{where}: {len(offsets)} offsets for {len(ids)} subjects (expected n + 1)")
        if len(offsets) and offsets[0] != 0:
            raise StoreCorrupt(f"{where}: offsets start at {offsets[0]}, not 0")
        if np.any(np.diff(offsets) < 0):
            bad = int(np.flatnonzero(np.diff(offsets) < 0)[0])
            raise StoreCorrupt(f"{where}: offsets decrease at subject {ids[bad]!r} "
                               f"({offsets[bad]} -> {offsets[bad + 1]})")
        if offsets[-1] != n_rows:
            raise StoreCorrupt(f"{where}: offsets end at row {offsets[-1]} but features has {n_rows} rows")
        short = {name: r for name, r in rows.items() if r != n_rows}
        if short:
            raise StoreCorrupt(f"{where}: {', '.join(f'{k} has {v}' for k, v in short.items())} rows, "
                               f"features {n_rows}")
        if len(set(ids)) != len(ids):
            raise StoreCorrupt(f"{where}: duplicate subject ids")
        index = _PlaneIndex(ids, offsets)
        for name in _PER_SUBJECT:
            if name in group:
                values = read(name, strings=True)
                if len(values) != len(ids):
                    raise StoreCorrupt(f"{where}/{name}: {len(values)} entries for {len(ids)} subjects")
                setattr(index, name, values)
        return index

    def labels(self) -> tuple[dict[str, dict], dict[str, str]]:
        if "labels" not in self.file:
            return {}, {}
        ds = self.file["labels"]
        try:
            records = json.loads(_str(ds[()]))
            types = json.loads(_str(ds.attrs.get("label_types", "{}")))
        except (OSError, ValueError, TypeError) as err:
            raise StoreCorrupt(f"{self.path}: /labels cannot be read ({_short(err)})") from None
        if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()) \
                or not isinstance(types, dict):
            raise StoreCorrupt(f"{self.path}: /labels is not a mapping subject -> {{label: value}} (edited by hand?)")
        return records, types

    def volume_names(self) -> list[str]:
        return [_vol_name(k) for k in self.file.get("volumes", {}).keys()]

    def volume_group(self, name: str) -> h5py.Group | None:
        if set_name_problem(name):
            return None  # HDF5 would resolve '.' to /volumes itself: no set can have such a name
        return self.file.get("volumes", {}).get(_vol_key(name))


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


# -- verification report ----------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """What :meth:`FeatureStore.verify` found.

    Attributes:
        store: the store.
        checked: (subject, plane) entries whose rows were compared with their checksums.
        unverifiable: entries without checksums (written by slice2vol before format 2).
        damaged: (subject, plane, reason) of entries whose rows do not match.
        broken: plane groups (or volume sets) that cannot be read or are inconsistent, one line each.
        volumes_checked: volume-embedding sets whose checksum matched.
    """

    store: Path
    checked: int = 0
    unverifiable: int = 0
    damaged: list[tuple[str, str, str]] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    volumes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.broken

    @property
    def damaged_subjects(self) -> list[str]:
        return sorted({sid for sid, _, _ in self.damaged})

    def summary(self) -> str:
        head = (f"{self.store}: {self.checked} subject-plane(s) verified, {len(self.damaged)} damaged"
                f"{f', {self.unverifiable} without checksums (older store)' if self.unverifiable else ''}"
                f"; {self.volumes_checked} volume-embedding set(s) verified")
        lines = [head]
        lines += [f"  damaged: {sid} {plane}: {reason}" for sid, plane, reason in self.damaged]
        lines += [f"  broken: {line}" for line in self.broken]
        if self.damaged:
            lines.append("  rerun the caching job on this store to recompute the damaged subjects")
        if any("volume embeddings" in line for line in self.broken):
            # a set is derived data: the caching job does not rewrite it, aggregating (or embedding) does
            lines.append("  write damaged volume embeddings again: slice2vol aggregate (or embed) with the same name")
        return "\n".join(lines)


# -- the store ------------------------------------------------------------------------------------
class FeatureStore:
    """Slice features, volume embeddings and labels of one cohort under one feature set.

    Opening is lazy (nothing is read until first use) and safe in DataLoader workers: HDF5 handles are
    reopened in each process, and pickling drops them. Reads are checked against the per-subject
    checksums (:class:`StoreCorrupt` on a mismatch).

    Args:
        path: ``STORE.h5``; committed parts in ``STORE.h5.parts/`` are read too. A symbolic link
            stands for its target (``path`` is then the target, ``given`` the link).
        mode: ``r`` to read; ``a`` also allows ``write_volume_embeddings`` and ``write_labels``.

    Example:
        >>> store = FeatureStore("ixi.h5")
        >>> X = store.slice_features("IXI039-HH-1261", "axial")   # (S, D) float32
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = checked_store_path(path)
        self.given = Path(path)  # as the user named it, for messages
        self.mode = mode
        if mode == "a":
            try:
                bits = self.path.stat().st_mode
            except OSError:
                bits = None  # absent: a writer creates it
            if bits is not None and not bits & 0o222:
                # a new version replaces the file (its folder is writable), so a store protected with
                # chmod a-w was rewritten, keeping its mode 444, as if the protection were not there
                raise StoreError(f"{self.shown}: the store is read-only (mode {stat.S_IMODE(bits):o}): make it writable "
                                 "(chmod u+w) to add to it, or give another store")
        self._segments: list[_Segment] | None = None
        self._pid: int | None = None
        self._lookup: dict[str, dict[str, tuple[int, int, int, int]]] | None = None
        # tolerant: plane groups that are inconsistent are left out instead of raising (resume, verify)
        self._tolerant = False

    # -- opening ---------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".parts")

    def segment_paths(self) -> list[Path]:
        """The main file (if any) then committed parts in commit order (oldest first)."""
        paths = [self.path] if self.path.exists() else []
        if self.parts_dir.is_dir():
            paths += sorted(p for p in self.parts_dir.glob("part-*.h5"))
        return paths

    def exists(self) -> bool:
        return bool(self.segment_paths())

    @property
    def segments(self) -> list[_Segment]:
        if self._segments is None or self._pid != os.getpid():
            for attempt in range(6):
                paths = self.segment_paths()
                if not paths and self.mode == "r":
                    raise FileNotFoundError(f"{self.shown}: feature store not found")
                segments = [_Segment(p) for p in paths]
                try:
                    self._check_consistent(segments)  # opens every segment now
                    break
                except FileNotFoundError:
                    # a writer compacted between listing and opening: list again
                    for seg in segments:
                        seg.close()
                    time.sleep(0.05 * (attempt + 1))
            else:
                raise StoreError(f"{self.path}: the store kept changing while it was opened; retry")
            self._segments = segments
            self._pid = os.getpid()
            self._lookup = None
        return self._segments

    def _check_consistent(self, segments: Sequence[_Segment]) -> None:
        # only segments with feature rows pin the feature set: a job that cached nothing leaves a
        # segment with its provenance, which a later job may supersede (the dtype fallback,
        # :meth:`check_identity`)
        sets = {}
        for seg in segments:
            fs = seg.feature_set
            if fs and seg.feature_rows:
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

    @property
    def shown(self) -> str:
        """The store as messages name it: its path, or ``LINK (a link to TARGET)``."""
        return str(self.path) if self.given == self.path else f"{self.given} (a link to {self.path})"

    # -- metadata --------------------------------------------------------------------------------
    def _slice_segment(self) -> _Segment | None:
        return _identity_segment(self.segments)

    @property
    def holds_features(self) -> bool:
        """Whether any segment (main file or part) holds slice-feature rows; a store whose jobs cached
        nothing has a feature set and a history, but no row depends on its dtype."""
        return any(seg.feature_rows for seg in self.segments) if self.exists() else False

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

    @property
    def broken(self) -> list[str]:
        """Plane groups of segments that cannot be read or are inconsistent (one line each)."""
        self._build_lookup()
        return [msg for seg in self.segments for msg in seg.broken.values()]

    def _build_lookup(self) -> dict[str, dict[str, tuple[int, int, int, int]]]:
        """plane -> subject -> (segment, start row, stop row, position in the segment's ids)."""
        if self._lookup is None or self._pid != os.getpid():
            lookup: dict[str, dict[str, tuple[int, int, int, int]]] = {}
            for k, seg in enumerate(self.segments):
                # void first what this segment says no longer describes its input, then add its own
                # rows: a subject recomputed later is in a newer segment still, and counts again
                for sid, planes in seg.invalidated.items():
                    for plane in planes:
                        table = lookup.get(plane)
                        if table is not None:
                            table.pop(sid, None)
                            if not table:
                                del lookup[plane]
                for plane, index in seg.index().items():
                    table = lookup.setdefault(plane, {})
                    offsets = index.offsets
                    for i, sid in enumerate(index.ids):
                        # the newest segment wins: a recomputed subject shadows its damaged or stale copy;
                        # after a kill between compaction and part deletion both copies are identical
                        table[sid] = (k, int(offsets[i]), int(offsets[i + 1]), i)
            broken = [msg for seg in self.segments for msg in seg.broken.values()]
            if broken and not self._tolerant:
                raise StoreCorrupt(f"{broken[0]}; run `slice2vol cache verify --store {self.path}` and rerun "
                                   "the caching job to recompute what it holds")
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

    def _entry(self, subject: str, plane: str) -> tuple[int, int, int, int]:
        lookup = self._build_lookup()
        if plane not in lookup:
            raise KeyError(f"{self.path}: no plane {plane!r} (planes: {self.planes})")
        try:
            return lookup[plane][subject]
        except KeyError:
            raise KeyError(f"{self.path}: subject {subject!r} has no {plane} features") from None

    def _where(self, subject: str, plane: str) -> tuple[h5py.Group, int, int]:
        k, start, stop, _ = self._entry(subject, plane)
        return self.segments[k].file["planes"][plane], start, stop

    def _per_subject(self, subject: str, plane: str, name: str) -> tuple[_Segment, str]:
        """The segment holding (subject, plane) and its value of the per-subject dataset ``name``
        (``checksums``, ``inputs``...; ``""`` where the store has none)."""
        k, _, _, i = self._entry(subject, plane)
        seg = self.segments[k]
        return seg, seg.index()[plane].get(name, i)

    def _check(self, subject: str, plane: str, what: str, *blocks: np.ndarray) -> None:
        """Compares rows just read with their stored checksum (``what``: a per-subject dataset)."""
        seg, expected = self._per_subject(subject, plane, what)
        if expected and block_sha256(*blocks) != expected:
            label = {"checksums": "features", "meta_checksums": "slice indices/positions",
                     "token_checksums": "tokens"}[what]
            raise StoreCorrupt(f"{seg.path}: subject {subject!r} {plane} {label} fail their checksum (the file "
                               f"is damaged); run `slice2vol cache verify --store {self.path}`, then rerun the "
                               "caching job to recompute it")

    def slice_source_sha256(self, subjects: Iterable[str], planes: Sequence[str]) -> str | None:
        """One sha256 over the stored feature checksums of ``subjects`` x ``planes`` (sorted): what a
        set aggregated from them records, so that a later recompute of any of them shows. None when a
        row has no checksum (a store written before format 2).

        Raises:
            KeyError: a subject has no features in a plane (any more).
        """
        digest = hashlib.sha256()
        for sid in sorted(set(subjects)):
            for plane in sorted(planes):
                checksum = self._per_subject(sid, plane, "checksums")[1]
                if not checksum:
                    return None
                digest.update(f"{sid}\t{plane}\t{checksum}\n".encode())
        return digest.hexdigest()

    def _check_fresh(self, name: str, ids: Sequence[str], prov: Mapping[str, Any]) -> None:
        """Refuses an aggregated set whose slice features changed since it was made (StaleEmbeddings)."""
        recorded = prov.get("source_slices_sha256") if isinstance(prov, Mapping) else None
        if not recorded or prov.get("kind") != "aggregate":
            return
        used = set(ids) | set(prov.get("train_ids") or [])
        try:
            now = self.slice_source_sha256(used, list(prov.get("source_planes") or prov.get("planes") or []))
        except (KeyError, LookupError):
            now = "missing"
        if now is not None and now != recorded:
            raise StaleEmbeddings(f"{self.path}: volume embeddings {name!r} were aggregated from slice features that "
                                  "changed since (a subject cached again or removed): run slice2vol aggregate again")

    def same_features(self) -> list[list[str]]:
        """Groups of subjects whose stored features are equal, bit for bit, in every plane of the store:
        one scan under several IDs (a copy with other bytes, e.g. ``.nii`` beside ``.nii.gz``, gives the
        same voxels and so, on one machine, the same rows). Compared through the per-subject checksums,
        so nothing is read but the index; a store without checksums (before format 2) gives none.

        Returns:
            Groups of two or more subject IDs, each sorted, the groups sorted.
        """
        planes = self.planes
        by_rows: dict[tuple[str, ...], list[str]] = {}
        for sid in self.subjects():
            key = tuple(self._per_subject(sid, plane, "checksums")[1] for plane in planes)
            if all(key):
                by_rows.setdefault(key, []).append(sid)
        return sorted(sorted(g) for g in by_rows.values() if len(g) > 1)

    def subject_inputs(self, subject: str, plane: str) -> dict[str, Any] | None:
        """What a subject's features in ``plane`` were made from (input fingerprint, oblique handling),
        or None when the store does not record it (stores written before format 2)."""
        raw = self._per_subject(subject, plane, "inputs")[1]
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    # -- slice features --------------------------------------------------------------------------
    def slice_features(self, subject: str, plane: str) -> np.ndarray:
        """Features of one subject's slices, float32 array of shape (S, D) (checked against its checksum)."""
        group, start, stop = self._where(subject, plane)
        rows = _read_rows(group, "features", start, stop, self)
        self._check(subject, plane, "checksums", rows)
        return _as_float32(rows)

    def slice_meta(self, subject: str, plane: str) -> dict[str, np.ndarray]:
        """``indices`` (S,) int slice indices and ``positions`` (S, 3) world mm of one subject's slices."""
        group, start, stop = self._where(subject, plane)
        indices = _read_rows(group, "indices", start, stop, self)
        positions = _read_rows(group, "positions", start, stop, self)
        self._check(subject, plane, "meta_checksums", indices, positions)
        return {"indices": indices.astype(np.int64), "positions": positions.astype(np.float32)}

    def slice_tokens(self, subject: str, plane: str) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch tokens (S, T, Dt) float32 and their grid (gh, gw).

        Raises:
            KeyError: tokens were not cached (run the job with ``--tokens``).
        """
        group, start, stop = self._where(subject, plane)
        if "tokens" not in group:
            raise KeyError(f"{self.path}: no patch tokens cached (cache with --tokens / save_tokens=True)")
        grid = tuple(int(g) for g in group["tokens"].attrs["grid"])
        rows = _read_rows(group, "tokens", start, stop, self)
        self._check(subject, plane, "token_checksums", rows)
        return rows.astype(np.float32), grid  # type: ignore[return-value]

    @property
    def has_tokens(self) -> bool:
        return bool(self.provenance.get("tokens"))

    @property
    def embed_dim(self) -> int:
        for seg in self.segments:
            for plane, group in seg.file.get("planes", {}).items():
                features = group["features"]
                if len(features.shape) != 2 or features.dtype.kind != "f":
                    raise StoreCorrupt(f"{seg.path}: planes/{plane}/features has shape {tuple(features.shape)} and "
                                       f"dtype {features.dtype}, not (rows, dim) floats (edited by another "
                                       "program?)")
                return int(features.shape[1])
        raise ValueError(f"{self.path}: no slice features")

    def load_packed(self, subjects: Sequence[str], plane: str, *, meta: bool = False,
                    dtype: Any = np.float32, verify: bool = True
                    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """All slices of many subjects in one array: the fast bulk path.

        Reads whole runs of consecutive rows in one HDF5 call, and a segment's whole dataset when most
        of it is wanted, so reading 10,000 subjects costs about one sequential pass over the file.

        Args:
            subjects: subject ids (each must have features in ``plane``).
            plane: the plane.
            meta: also return ``indices`` (N,) and ``positions`` (N, 3).
            dtype: ``np.float32`` (default) or ``None`` to keep the stored dtype (float16 halves the
                memory and skips the conversion, which dominates reading 10,000 subjects on a CPU).
            verify: compare every subject's rows with its checksum (sha256 at ~1 GB/s: about a tenth
                of the float32 conversion).

        Returns:
            features (N, D) float32 with subject i in rows offsets[i]:offsets[i + 1], offsets (n + 1,),
            and with ``meta`` a dict of indices / positions in the same row order.

        Raises:
            StoreCorrupt: a subject's rows fail their checksum.
        """
        lookup = self._build_lookup()
        if plane not in lookup:
            raise KeyError(f"{self.path}: no plane {plane!r} (planes: {self.planes})")
        table = lookup[plane]
        missing = [s for s in subjects if s not in table]
        if missing:
            raise KeyError(f"{self.path}: {len(missing)} subject(s) have no {plane} features, "
                           f"e.g. {missing[:3]}")
        where = np.array([table[s] for s in subjects], dtype=np.int64).reshape(-1, 4)  # (seg, start, stop, i)
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
                try:
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
                except (OSError, ValueError, RuntimeError) as err:
                    raise StoreCorrupt(f"{self.segments[int(k)].path}: /planes/{plane}/{name} cannot be read "
                                       f"({_short(err)})") from None
                parts.append(k)
            if name not in gathered:  # no subjects asked for
                ds = self.segments[0].file["planes"][plane][name] if self.segments else None
                gathered[name] = np.empty((0, *(ds.shape[1:] if ds is not None else ())), np.float32)
        if verify:
            for j, sid in enumerate(subjects):
                a, b = offsets[j], offsets[j + 1]
                self._check(sid, plane, "checksums", gathered["features"][a:b])
                if meta:
                    self._check(sid, plane, "meta_checksums", gathered["indices"][a:b], gathered["positions"][a:b])
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

    # -- verification ----------------------------------------------------------------------------
    def verify(self, subjects: Sequence[str] | None = None, planes: Sequence[str] | None = None, *,
               progress: bool = False) -> VerifyReport:
        """Checks every stored row of the store (or of ``subjects`` x ``planes``) against its checksum.

        Also checks the layout (offsets against rows, per-subject arrays against ids), that each
        subject's slice indices increase (catches a shifted offset even in stores without checksums),
        and the volume-embedding sets' checksums. Reads each segment sequentially, in blocks.

        Returns:
            A :class:`VerifyReport` (``report.ok``, ``report.damaged`` as (subject, plane, reason)).
        """
        from slice2vol.progress import bar

        tolerant, self._tolerant = self._tolerant, True
        try:
            self._lookup = None
            lookup = self._build_lookup()
            report = VerifyReport(self.path, broken=[m for seg in self.segments for m in seg.broken.values()])
            wanted = None if subjects is None else set(subjects)
            jobs: list[tuple[str, int, list[tuple[int, int, int, str]]]] = []  # plane, segment, entries
            for plane in planes or self.planes:
                by_seg: dict[int, list[tuple[int, int, int, str]]] = {}
                for sid, (k, a, b, i) in lookup.get(plane, {}).items():
                    if wanted is None or sid in wanted:
                        by_seg.setdefault(k, []).append((a, b, i, sid))
                jobs += [(plane, k, sorted(entries)) for k, entries in by_seg.items()]
            total = sum(len(e) for _, _, e in jobs)
            progress_bar = bar(total, desc=f"verify {self.path.name}", unit="subj-plane", enabled=progress)
            try:
                for plane, k, entries in jobs:
                    self._verify_entries(report, plane, self.segments[k], entries, progress_bar)
            finally:
                progress_bar.close()
            for name in self.volume_embedding_names():
                try:
                    self.volume_embeddings(name)
                    report.volumes_checked += 1
                except (StoreCorrupt, StaleEmbeddings) as err:
                    report.broken.append(str(err))
            # the feature-set hash is computed from the provenance when written: an edited provenance
            # (another encoder name, slice size...) no longer matches it
            for seg in self.segments:
                try:
                    stored, prov = seg.feature_set, seg.provenance
                except StoreCorrupt as err:  # provenance that is not a JSON object
                    report.broken.append(str(err))
                    continue
                if stored and prov and config_hash_of(prov) != stored:
                    report.broken.append(f"{seg.path}: the provenance does not hash to the stored feature set "
                                         f"{stored} (edited after it was written?)")
            return report
        finally:
            self._tolerant = tolerant
            self._lookup = None

    def _verify_entries(self, report: VerifyReport, plane: str, seg: _Segment,
                        entries: list[tuple[int, int, int, str]], progress_bar: Any) -> None:
        group = seg.file["planes"][plane]
        index = seg.index()[plane]
        names = ["features", "indices", "positions"] + (["tokens"] if "tokens" in group else [])
        for block_start, block_stop, members in _blocks(entries):
            try:
                data = {name: group[name][block_start:block_stop] for name in names}
            except (OSError, ValueError, RuntimeError) as err:
                for a, b, i, sid in members:
                    report.damaged.append((sid, plane, f"rows {a}:{b} of {seg.path.name} cannot be read "
                                                       f"({_short(err)})"))
                progress_bar.update(len(members))
                continue
            for a, b, i, sid in members:
                rows = {name: data[name][a - block_start:b - block_start] for name in names}
                problems = []
                for what, blocks in (("checksums", (rows["features"],)),
                                     ("meta_checksums", (rows["indices"], rows["positions"])),
                                     ("token_checksums", (rows["tokens"],) if "tokens" in rows else ())):
                    expected = index.get(what, i)
                    if not blocks:
                        continue
                    if not expected:
                        if what == "checksums":
                            report.unverifiable += 1
                        continue
                    if block_sha256(*blocks) != expected:
                        problems.append({"checksums": "features", "meta_checksums": "indices/positions",
                                         "token_checksums": "tokens"}[what] + " fail their checksum")
                if len(rows["indices"]) > 1 and np.any(np.diff(rows["indices"].astype(np.int64)) <= 0):
                    problems.append(f"slice indices do not increase (rows {a}:{b}: offsets shifted?)")
                if problems:
                    report.damaged.append((sid, plane, f"{'; '.join(problems)} ({seg.path.name} rows {a}:{b})"))
                elif index.get("checksums", i):
                    report.checked += 1
                progress_bar.update(1)

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

    def volume_embeddings(self, name: str, *, check_fresh: bool = True) -> tuple[list[str], np.ndarray, dict]:
        """One set of volume embeddings: (ids, X (N, D) float32, provenance), checked against its checksum.

        An aggregated set is also checked against the slice features it was made from (``check_fresh``):
        :class:`StaleEmbeddings` when any of them was recomputed or removed since.
        """
        for seg in reversed(self.segments):  # newest wins
            group = seg.volume_group(name)
            if group is not None:
                try:
                    ids = [_str(s) for s in group["ids"][()]]
                    X = group["X"][()].astype(np.float32)
                    prov = json.loads(_str(group.attrs.get("provenance", "{}")))
                except (OSError, KeyError, ValueError, TypeError) as err:
                    raise StoreCorrupt(f"{seg.path}: volume embeddings {name!r} cannot be read "
                                       f"({_short(err)})") from None
                expected = _str(group.attrs.get("checksum", ""))
                if expected and volume_sha256(ids, X) != expected:
                    raise StoreCorrupt(f"{seg.path}: volume embeddings {name!r} fail their checksum (the file is "
                                       "damaged); write them again (slice2vol aggregate / embed)")
                if X.ndim != 2:
                    raise StoreCorrupt(f"{seg.path}: volume embeddings {name!r} have shape {tuple(X.shape)}, not "
                                       "(subjects, dims) (edited by another program?)")
                if len(ids) != len(X):
                    raise StoreCorrupt(f"{seg.path}: volume embeddings {name!r}: {len(ids)} ids for {len(X)} rows")
                if check_fresh:
                    self._check_fresh(name, ids, prov)
                return ids, X, prov
        raise KeyError(f"{self.path}: no volume embeddings {name!r} (have: {self.volume_embedding_names()})")

    def write_volume_embeddings(self, name: str, ids: Sequence[str], X: np.ndarray,
                                provenance: Mapping[str, Any] | None = None) -> None:
        """Stores a set of volume embeddings in the main file (replacing a set of the same name).

        The main file is rewritten (HDF5-level copy of everything else, then rename: atomic), so the
        store stays one file that plain h5py reads. ``provenance`` should say what made them
        (aggregator and parameters, or the 3D encoder and its weights); the date, host and versions are
        added, and the slice feature set they came from if any.

        Args:
            name: e.g. ``mean`` or ``ssl/simclr3d``.
            ids: N subject ids.
            X: (N, D) embeddings.

        Raises:
            StoreLocked: a caching job (or another writer) is writing the store.
        """
        check_set_name(name, self.path)
        if np.ndim(X) != 2 or np.shape(X)[0] == 0 or np.shape(X)[1] == 0:
            raise ValueError(f"{self.path}: volume embeddings {name!r} of shape {np.shape(X)}: expected "
                             "(subjects, dims) with at least one of each")
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
        with self.writer_lock():
            if self.exists() and self.feature_set:
                prov.setdefault("slice_feature_set", self.feature_set)
            self._write_main(volumes={name: (ids, X, prov)})
        self.refresh()

    def write_labels(self, labels: Mapping[str, Mapping[str, Any]], label_types: Mapping[str, str]) -> None:
        """Stores label rows {subject_id: {column: value}} (e.g. for a store written by a 3D encoder)."""
        self._require_writable()
        with self.writer_lock():
            self._write_main(labels=(dict(labels), dict(label_types)))
        self.refresh()

    def _write_main(self, *, volumes: Mapping[str, tuple[list[str], np.ndarray, dict]] | None = None,
                    labels: tuple[dict, dict] | None = None) -> None:
        """Rewrites the main file with new volume sets / labels (call under :meth:`writer_lock`).

        With parts pending (a killed job), everything is compacted together; otherwise the main file
        is copied object by object with HDF5's own copy (no decoding: about the speed of a file copy),
        minus what is replaced, into a temporary file that is renamed over it.
        """
        self.clean_tmp()
        self.refresh()
        if not self.path.exists() or any(p != self.path for p in self.segment_paths()):
            self._commit_part(volumes=volumes, labels=labels)
            try:
                self._compact_all()
            except StoreWriteFailed as err:
                # the part is written: the store has the new data, only not in one file yet
                raise StoreWriteFailed(f"{self.path}: could not be written: {err.why}; what was written is kept in "
                                       f"{self.parts_dir} (the store reads it from there) and joins the main file "
                                       "at the next compaction", err.why) from None
            return
        old = _Segment(self.path)
        try:
            src = old.file
            with _atomic_h5(self.path) as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for key in src:
                    if key == "volumes":
                        group = dst.create_group("volumes")
                        for vkey in src["volumes"]:
                            if _vol_name(vkey) not in (volumes or {}):
                                src.copy(src["volumes"][vkey], group, name=vkey)
                    elif key == "labels" and labels is not None:
                        continue
                    else:
                        src.copy(src[key], dst, name=key)
                if labels is not None:
                    records, types = old.labels()
                    records.update(labels[0])
                    types.update(labels[1])
                    _write_labels(dst, records, types)
                for name, (ids, X, prov) in (volumes or {}).items():
                    _write_volume(dst, name, ids, X, prov)
        finally:
            old.close()

    # -- writing (jobs) --------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path}: store opened read-only; use FeatureStore(path, mode='a')")

    def write_problem(self, also: Sequence[Path] = ()) -> str | None:
        """Why this store could not be written now (one line), or None: its folder cannot be created or
        written in, or the store file, its lock, its parts folder or one of ``also`` (where they exist)
        is read-only. ``os.access`` honours read-only file systems and immutable files, also for root,
        unlike a mode check. The writer lock is not looked at (:meth:`locked_by`)."""
        folder = self.path.parent
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing}: not a folder, so the store's folder {folder} cannot be created"
        if not os.access(existing, os.W_OK | os.X_OK):
            return (f"{existing}: no permission to write in this folder (read-only, immutable or another user's); "
                    "write the store elsewhere (--store)")
        for path in (self.path, self.lock_path, self.parts_dir, *also):
            if path.exists() and not os.access(path, os.W_OK):
                return (f"{path}: not writable (read-only or immutable), so the store cannot be updated; fix its "
                        "permissions or write to another --store")
        return None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def locked_by(self) -> str | None:
        """Who holds the writer lock (``pid ... on host: command``), or None when it is free."""
        if not self.lock_path.exists():
            return None
        with open(self.lock_path, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                return fh.read().strip() or "another process"
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Exclusive lock for writers of this store (two jobs must not write the same file).

        Raises:
            StoreLocked: another process holds it; the message names the lock file and its holder.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.lock_path
        with open(lock_path, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise StoreLocked(f"{self.shown}: another process is writing this store ({holder}; lock "
                                  f"{lock_path}); wait for it to finish, or give each job its own --store "
                                  "or --shard") from None
            except OSError as err:  # e.g. ENOLCK on a filesystem without flock support
                raise StoreError(f"{self.path}: cannot lock {lock_path} ({_short(err)}); this filesystem does not "
                                 "support flock: write the store to a local or flock-capable disk") from None
            try:
                fh.seek(0)
                fh.truncate()
                command = " ".join(sys.argv)[:200]
                fh.write(f"pid {os.getpid()} on {socket.gethostname()}: {command}")
                fh.flush()
                yield
            finally:
                with contextlib.suppress(OSError):
                    fh.truncate(0)
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
        stored, asked = identity_of(self.provenance), identity_of(provenance)
        if not self.holds_features and _jsonable({**stored, "dtype": None}) == _jsonable({**asked, "dtype": None}):
            return  # no row was stored in the old dtype: a store that cached nothing is new in this respect
        diffs = diff_dicts(stored, asked)
        fallback = self.provenance.get("dtype_fallback") or {}
        others = [d for d in diffs if not d.startswith("dtype:")]
        if others and asked.get("dtype") == fallback.get("requested"):
            # the store's float32 is what the fallback chose for this very --dtype: not a change the user
            # made, so listing it would only hide the keys that do differ
            diffs = others
        raise StoreMismatch(
            f"{self.path} holds feature set {self.feature_set} "
            f"({self.provenance.get('encoder')}); these features would be feature set {want}, which "
            f"differs in: {'; '.join(diffs[:6]) or '(format)'}. Write them to another store (--store) "
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
                     labels: tuple[dict, dict] | None = None, history: Sequence[dict] = (),
                     invalidated: Mapping[str, Sequence[str]] | None = None) -> Path:
        """Writes one part segment atomically and returns its path (``invalidated``: subject -> planes
        whose older copies become void, in the same commit as what else the part holds)."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.parts_dir / f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.h5"
        if labels is None and subjects:
            labels = ({s.subject_id: s.labels for s in subjects if s.labels is not None},
                      dict(label_types or {}))
        with _atomic_h5(path) as f:
            _init_segment(f, provenance or {}, history)
            if invalidated:
                f.attrs["invalidated"] = _dumps({sid: list(planes) for sid, planes in invalidated.items()})
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
        """Writes completed subjects as one atomic part segment (call under :meth:`writer_lock`).

        Each subject's rows get their checksums here, from the arrays in memory.
        """
        self._require_writable()
        return self._commit_part(provenance=provenance, subjects=subjects, dtype=dtype,
                                 label_types=label_types)

    def compact(self, history: Sequence[dict] = (), provenance: Mapping[str, Any] | None = None, *,
                drop_broken: bool = False, subjects: Sequence[SubjectFeatures] = (), dtype: str = "float16",
                label_types: Mapping[str, str] | None = None,
                invalidated: Mapping[str, Sequence[str]] | None = None) -> None:
        """Merges the main file and all parts into a fresh main file, then deletes the parts.

        Crash-safe: the new file is complete and fsync'ed before it replaces the old one; parts are
        deleted afterwards. Only the winning (newest) copy of each (subject, plane) is kept. A store
        whose only segment is one part (a job of up to ``commit_every`` subjects on a new store) gets
        that part renamed into place: it is already a complete segment, so copying it would only
        write the same rows twice.

        Args:
            history: job records to append (written in a part first, like any other write).
            provenance: provenance of that part (default: the store's).
            drop_broken: leave out plane groups that cannot be read (a caching job that has recomputed
                their subjects); without it such a store is refused with :class:`StoreCorrupt`.
            subjects, dtype, label_types: completed subjects not committed yet (a caching job's last
                ones), written in the same part as ``history`` (as :meth:`commit_subjects`).
            invalidated: subject -> planes whose stored copies are void (input changed, recompute
                failed), in the same part as ``history``: compaction then leaves them out.
        """
        self._require_writable()
        if history or subjects or invalidated:  # a job's record and last writes travel in one part
            self._commit_part(provenance=provenance or self.provenance, subjects=subjects, dtype=dtype,
                              label_types=label_types, history=history, invalidated=invalidated)
        if not any(p != self.path for p in self.segment_paths()):
            return
        try:
            self._compact_all(drop_broken=drop_broken)
        except StoreWriteFailed as err:
            # everything is committed by now: "the store is as it was before this write" hid that only
            # the folding is left to do, and the user cached every subject again
            raise StoreWriteFailed(
                f"{self.path}: every commit is safe in {self.parts_dir}, but folding the parts into the main file "
                f"failed: {err.why or err}; free space, then run `slice2vol cache compact --store {self.path}` (the "
                "store reads as it is meanwhile)", err.why) from None

    def _compact_all(self, drop_broken: bool = False) -> None:
        parts = [p for p in self.segment_paths() if p != self.path]
        tolerant, self._tolerant = self._tolerant, drop_broken
        try:
            self.refresh()
            segments = list(self.segments)
            lookup = self._build_lookup()
            if len(parts) == 1 and len(segments) == 1 and not self.broken and all(
                    len(table) == len(segments[0].index()[plane].ids) for plane, table in lookup.items()):
                # no main file, one part holding each (subject, plane) once: it is the compacted store
                segments[0].close()
                os.replace(parts[0], self.path)
                _fsync_dir(self.path.parent)
                with contextlib.suppress(OSError):
                    self.parts_dir.rmdir()
                self.refresh()
                return
            selection = _select(lookup)
            if drop_broken and self.broken:
                log.warning("%s: left out unreadable data while compacting: %s", self.path, "; ".join(self.broken))
            _merge_segments(segments, self.path, selection=selection)
        finally:
            self._tolerant = tolerant
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
            vc = prov.get("volume_config", {})
            dim = self.embed_dim if self.planes else "-"
            lines.append(f"  encoder {prov.get('encoder')} weights {prov.get('weights')} "
                         f"sha256 {str(prov.get('weights_sha256'))[:12] or '-'} dim {dim} "
                         f"dtype {prov.get('dtype')} tokens {prov.get('tokens')}")
            if prov.get("dtype_fallback"):
                lines.append(f"  dtype fallback: {prov['dtype_fallback'].get('reason')}")
            lines.append(f"  slices: size {sc.get('size')} stride {sc.get('stride')} context "
                         f"{sc.get('context')} min_foreground {sc.get('min_foreground')}; oblique volumes: "
                         f"{vc.get('oblique', 'snap' if vc.get('allow_oblique') else 'refuse')}")
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
            lines.append(f"  {parts} uncompacted part(s) in {self.parts_dir} (a job is running or was killed; "
                         "`slice2vol cache compact` folds them)")
        failed = [f for e in self.history for f in e.get("failures", [])]
        if failed:
            lines.append(f"  {len(failed)} failure(s) recorded by jobs (retried by the next run)")
        return "\n".join(lines)


def _read_rows(group: h5py.Group, name: str, start: int, stop: int, store: FeatureStore) -> np.ndarray:
    try:
        return group[name][start:stop]
    except (OSError, ValueError, RuntimeError) as err:
        raise StoreCorrupt(f"{group.file.filename}: /planes/{group.name.rsplit('/', 1)[-1]}/{name} rows "
                           f"{start}:{stop} cannot be read ({_short(err)}); run `slice2vol cache verify "
                           f"--store {store.path}`") from None


def _blocks(entries: Sequence[tuple[int, int, int, str]], rows: int = _COPY_ROWS
            ) -> Iterator[tuple[int, int, list[tuple[int, int, int, str]]]]:
    """Groups (start, stop, i, sid) entries sorted by start into row blocks of about ``rows`` rows."""
    members: list[tuple[int, int, int, str]] = []
    lo = hi = 0
    for entry in entries:
        a, b = entry[0], entry[1]
        if members and b - lo > rows:
            yield lo, hi, members
            members = []
        if not members:
            lo, hi = a, b
        members.append(entry)
        hi = max(hi, b)
    if members:
        yield lo, hi, members


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


def _identity_segment(segments: Sequence[_Segment]) -> _Segment | None:
    """The segment whose provenance names the store's feature set: the first one holding feature rows
    (all such segments share one feature set), else the newest with a feature set (the last job that
    cached nothing: it may have superseded the dtype of an earlier one)."""
    named = [s for s in segments if s.feature_set]
    return next((s for s in named if s.feature_rows), named[-1] if named else None)


def config_hash_of(provenance: Mapping[str, Any]) -> str:
    """The feature-set name: a hash of the identity part of a provenance dict."""
    from slice2vol.config import config_hash

    return config_hash(_jsonable(identity_of(provenance)))


def set_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a volume-embedding set (the rule it breaks), or None."""
    if not isinstance(name, str) or not name:
        return "a set name must be a non-empty string"
    if name in (".", ".."):
        return "'.' and '..' are HDF5's names for a group itself and its parent"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "control characters (newline, tab, ...) are not allowed: the set lists print one name per line"
    return None


def check_set_name(name: Any, store: str | Path | None = None) -> str:
    """``name`` when it can name a volume-embedding set, else :class:`StoreError` (a ValueError; one
    line naming the store if given, the name and the rule)."""
    problem = set_name_problem(name)
    if problem:
        where = f"{store}: " if store else ""
        raise StoreError(f"{where}volume-embedding set name {name!r}: {problem}; choose another --name")
    return name


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


def _strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=_STR)


def _write_planes(f: h5py.File, subjects: Sequence[SubjectFeatures], dtype: str) -> None:
    planes = sorted({p for s in subjects for p in s.planes})
    for plane in planes:
        have = [s for s in subjects if plane in s.planes]
        items = [s.planes[plane] for s in have]
        counts = [len(it.features) for it in items]
        dim = max(it.features.shape[1] if it.features.ndim == 2 else 0 for it in items)
        # cast once, per subject: the arrays written are the arrays hashed
        feats = [np.ascontiguousarray(it.features.reshape(-1, dim), dtype=dtype) for it in items]
        indices = [np.ascontiguousarray(it.indices, dtype=np.int32).reshape(-1) for it in items]
        positions = [np.ascontiguousarray(it.positions, dtype=np.float32).reshape(-1, 3) for it in items]
        group = f.create_group(f"planes/{plane}")
        group.attrs["checksum"] = CHECKSUM
        _strings(group, "ids", [s.subject_id for s in have])
        group.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        group.create_dataset("features", data=np.concatenate(feats))
        group.create_dataset("indices", data=np.concatenate(indices))
        group.create_dataset("positions", data=np.concatenate(positions))
        _strings(group, "checksums", [block_sha256(x) for x in feats])
        _strings(group, "meta_checksums", [block_sha256(i, p) for i, p in zip(indices, positions)])
        _strings(group, "inputs", [_dumps(s.inputs) if s.inputs else "" for s in have])
        with_tokens = [it for it in items if it.tokens is not None]
        if with_tokens:
            ref = max(with_tokens, key=lambda it: it.tokens.size)  # type: ignore[union-attr]
            shape = ref.tokens.shape[1:]  # type: ignore[union-attr]
            tokens = [np.ascontiguousarray(np.zeros((0, *shape)) if it.tokens is None
                                           else it.tokens.reshape(-1, *shape), dtype=dtype) for it in items]
            ds = group.create_dataset("tokens", data=np.concatenate(tokens))
            ds.attrs["grid"] = np.array(ref.grid or (0, 0), dtype=np.int64)
            _strings(group, "token_checksums", [block_sha256(t) for t in tokens])


def _write_labels(f: h5py.File, records: Mapping[str, Any], types: Mapping[str, str]) -> None:
    ds = f.create_dataset("labels", data=_dumps(records), dtype=_STR)
    ds.attrs["label_types"] = _dumps(dict(types))


def _write_volume(f: h5py.File, name: str, ids: Sequence[str], X: np.ndarray, prov: Mapping) -> None:
    group = f.require_group("volumes").create_group(_vol_key(name))
    group.attrs["name"] = name
    X = np.asarray(X, dtype=np.float32)
    _strings(group, "ids", list(ids))
    group.create_dataset("X", data=X)
    group.attrs["provenance"] = _dumps(dict(prov))
    group.attrs["checksum"] = volume_sha256(list(ids), X)


Selection = dict[str, list[tuple[int, str, int, int, int]]]  # plane -> [(segment, sid, start, stop, i)]


def _select(lookup: Mapping[str, Mapping[str, tuple[int, int, int, int]]]) -> Selection:
    """The rows to copy: every (subject, plane) of ``lookup`` (its winning copy), in lookup order."""
    return {plane: [(k, sid, a, b, i) for sid, (k, a, b, i) in table.items()] for plane, table in lookup.items()}


def _merge_segments(segments: Sequence[_Segment], out: Path, *, selection: Selection,
                    extra_history: Sequence[dict] = (), provenance: Mapping[str, Any] | None = None,
                    volumes: bool = True, promote: bool = False) -> None:
    """Streams the ``selection`` of rows of ``segments`` into one new segment at ``out`` (atomic).

    Checksums and fingerprints are copied, never recomputed, so damage in a source stays detectable
    (promoted rows excepted: see :func:`_promote_rows`). Labels and (with ``volumes``) volume-embedding
    sets: the newest segment wins.

    Args:
        promote: float16 features (and tokens) of some segments beside float32 ones are written as
            float32 (exact: every float16 value is a float32 value), for ``merge`` of shards of which
            some took the float16 -> float32 fallback; without it such a mix is refused.
    """
    if provenance is None:
        seg = _identity_segment(segments)
        provenance = seg.provenance if seg else {}
    history: list[dict] = []
    for seg in segments:
        history.extend(e for e in seg.history if e not in history)
    history.extend(extra_history)
    with _atomic_h5(Path(out)) as f:
        _init_segment(f, provenance, history)
        for plane in sorted(selection):
            entries = selection[plane]
            counts = np.array([b - a for _, _, a, b, _ in entries], dtype=np.int64)
            offsets_out = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            total = int(offsets_out[-1])
            group = f.create_group(f"planes/{plane}")
            group.attrs["checksum"] = CHECKSUM
            _strings(group, "ids", [e[1] for e in entries])
            group.create_dataset("offsets", data=offsets_out)
            used = sorted({e[0] for e in entries})
            src_groups = {k: segments[k].file["planes"][plane] for k in used}
            indexes = {k: segments[k].index()[plane] for k in used}
            rows_from = {k: sum(b - a for kk, _, a, b, _ in entries if kk == k) for k in used}
            rehashed: dict[str, dict[int, str]] = {}  # checksum dataset -> entry position -> new checksum
            for name in ("features", "indices", "positions", "tokens"):
                having = [g for g in src_groups.values() if name in g]
                if not having:
                    continue
                # a part holding only zero-slice subjects has no tokens dataset: nothing to copy from it
                if any(name not in g and rows_from[k] for k, g in src_groups.items()):
                    raise StoreMismatch(f"{out}: some segments have {plane} {name}, others do not")
                first = max(having, key=lambda g: g[name].shape[-1] if g[name].ndim > 1 else 0)
                src = first[name]
                dtypes = {np.dtype(g[name].dtype) for k, g in src_groups.items() if name in g and rows_from[k]}
                dtype = np.dtype(src.dtype) if not dtypes else max(dtypes, key=lambda d: d.itemsize)
                if len(dtypes) > 1 and not (promote and dtypes == {np.dtype(np.float16), np.dtype(np.float32)}):
                    raise StoreMismatch(f"{out}: {plane} {name} are stored as {' and '.join(sorted(map(str, dtypes)))} "
                                        "in different segments")
                dst = group.create_dataset(name, shape=(total, *src.shape[1:]), dtype=dtype)
                for attr, value in src.attrs.items():
                    dst.attrs[attr] = value
                by_k: dict[int, list[tuple[int, int, int]]] = {}
                for (k, _, a, b, _), at in zip(entries, offsets_out[:-1]):
                    by_k.setdefault(k, []).append((a, b, int(at)))
                for k, items in by_k.items():
                    if name not in src_groups[k]:
                        continue  # zero rows from this segment (checked above)
                    ds = src_groups[k][name]
                    if ds.dtype != dtype:
                        checksums = "checksums" if name == "features" else "token_checksums"
                        _promote_rows(segments[k], plane, name, entries, offsets_out, k, dst,
                                      rehashed.setdefault(checksums, {}), indexes[k].get)
                        continue
                    for a, b, at in _runs(items):
                        for lo in range(a, b, _COPY_ROWS):
                            _stop_if_failed(f)
                            hi = min(b, lo + _COPY_ROWS)
                            dst[at + lo - a:at + hi - a] = ds[lo:hi]
            for name in _PER_SUBJECT:
                if name == "token_checksums" and not any("tokens" in g for g in src_groups.values()):
                    continue
                new = rehashed.get(name, {})
                _strings(group, name, [new.get(pos, indexes[k].get(name, i))
                                       for pos, (k, _, _, _, i) in enumerate(entries)])
        records: dict[str, dict] = {}
        types: dict[str, str] = {}
        for seg in segments:
            r, t = seg.labels()
            records.update(r)
            types.update(t)
        if records or types:
            _write_labels(f, records, types)
        newest: dict[str, _Segment] = {}
        for seg in segments if volumes else []:
            for name in seg.volume_names():
                newest[name] = seg  # newest wins
        for name, seg in newest.items():
            f.copy(seg.volume_group(name), f.require_group("volumes"), name=_vol_key(name))


def _promote_rows(seg: _Segment, plane: str, name: str, entries: Sequence[tuple[int, str, int, int, int]],
                  offsets_out: np.ndarray, k: int, dst: h5py.Dataset, rehashed: dict[int, str], stored) -> None:
    """Writes segment ``k``'s float16 ``name`` rows of ``entries`` into the float32 ``dst``, subject by
    subject. Checksums are over the stored bytes, so a promoted subject needs a new one: its float16
    rows are checked against their own checksum first (damage is refused, not laundered into a valid
    new checksum), then the float32 rows are hashed (``rehashed``: entry position -> checksum)."""
    checksums = "checksums" if name == "features" else "token_checksums"
    ds = seg.file["planes"][plane][name]
    for pos, ((kk, sid, a, b, i), at) in enumerate(zip(entries, offsets_out[:-1])):
        if kk != k:
            continue
        rows = ds[a:b]
        if block_sha256(rows) != stored(checksums, i):
            raise StoreCorrupt(f"{seg.path}: subject {sid!r} {plane} {name} fail their checksum (the file is "
                               "damaged); not merged: run `slice2vol cache verify` on it and rerun its shard")
        wide = _as_float32(rows)
        dst[int(at):int(at) + len(wide)] = wide
        rehashed[pos] = block_sha256(wide)


# -- shards -----------------------------------------------------------------------------------------
def shard_of_path(path: str | Path) -> tuple[int, int] | None:
    """``feats.shard-03-of-08.h5`` -> (3, 8); None for a name without the shard suffix."""
    m = _SHARD_NAME.match(Path(path).name)
    return (int(m["i"]), int(m["n"])) if m else None


def find_shards(store: str | Path) -> list[Path]:
    """The shard files of ``store`` (``STORE.shard-i-of-n.h5`` beside it), sorted by shard index."""
    store = Path(store)
    stem, suffix = (store.name[:-len(store.suffix)], store.suffix) if store.suffix else (store.name, ".h5")
    found = [p for p in store.parent.glob(f"{stem}.shard-*-of-*{suffix}")
             if _SHARD_NAME.match(p.name) and _SHARD_NAME.match(p.name)["base"] == stem]
    return sorted(found, key=lambda p: shard_of_path(p) or (0, 0))


def shard_problems(inputs: Sequence[str | Path]) -> list[str]:
    """Why a set of shard files is not a complete, finished set (empty list: it is).

    Only inputs named ``*.shard-i-of-n.*`` are checked: they must share one n, cover 0..n-1, and each
    must record a finished caching job for its shard (a killed or still running job records none).
    """
    named = [(Path(p), shard_of_path(p)) for p in inputs]
    shards = [(p, s) for p, s in named if s is not None]
    if not shards:
        return []
    problems = []
    counts = sorted({n for _, (_, n) in shards})
    if len(counts) > 1:
        problems.append(f"shards of different counts {counts}: "
                        f"{', '.join(p.name for p, _ in shards)}")
    n = counts[-1]
    claims: dict[tuple[int, int], list[Path]] = {}
    for path, shard in shards:
        files = claims.setdefault(shard, [])
        if all(path.resolve() != other.resolve() for other in files):  # one file given twice is one shard
            files.append(path)
    for (i, nn), files in claims.items():
        if len(files) > 1:
            # two runs' stores of one shard (copied from two places): which one is the shard cannot be told
            problems.append(f"shard {i}/{nn} given as {len(files)} different files ({', '.join(map(str, files[:3]))}); "
                            "give one per shard")
    have = {i for _, (i, nn) in shards if nn == n}
    missing = sorted(set(range(n)) - have)
    if missing:
        base = shards[0][0]
        width = len(str(n - 1))
        names = [base.name.replace(_SHARD_NAME.match(base.name)["i"], f"{i:0{width}d}", 1) for i in missing]
        problems.append(f"missing shard(s) {missing} of {n} ({', '.join(names[:8])}"
                        f"{' ...' if len(names) > 8 else ''} not given or not found)")
    for path, (i, nn) in shards:
        if not path.exists() and not path.with_name(path.name + ".parts").is_dir():
            problems.append(f"{path}: not found")
            continue
        store = FeatureStore(path)
        finished = any(e.get("event") == "cache" and list(e.get("shard") or []) == [i, nn] for e in store.history)
        store.close()
        if not finished:
            problems.append(f"{path}: shard {i}/{nn} did not finish (no completed caching job in its history: "
                            f"killed or still running); rerun it with --shard {i}/{nn}")
    return problems


def merge_stores(out: str | Path, inputs: Sequence[str | Path], *, allow_version_mismatch: bool = False,
                 require_complete: bool = True) -> dict[str, Any]:
    """Joins shard stores into one file, after checking that they are complete and their provenance agrees.

    Args:
        out: the merged store (must not be one of the inputs).
        inputs: shard stores (their uncompacted parts are included).
        allow_version_mismatch: accept shards made with different library versions.
        require_complete: inputs named ``*.shard-i-of-n.h5`` must be all n shards, each finished
            (see :func:`shard_problems`).

    Inputs that hold no feature row (a shard that cached nothing) take no part in the feature-set
    checks. Inputs that stored float16 where others took the float16 -> float32 fallback, under
    otherwise equal settings, are written as float32 (:func:`_promotable`).

    Returns:
        counts: ``subjects`` per plane, ``duplicates`` left out (first input wins), ``promoted``
        (inputs whose float16 rows were written as float32).

    Raises:
        ShardsIncomplete: missing or unfinished shards (the message lists them).
        StoreMismatch: feature sets, label types or library versions differ (the message names the key).
    """
    out = Path(out)
    if not inputs:
        raise StoreError(f"{out}: merge needs input stores (none given, and no {out.stem}.shard-*-of-* files found)")
    out = checked_store_path(out)  # a link: the merged store replaces its target
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise StoreError(f"{out}: merge output is also an input")
    if require_complete:
        problems = shard_problems(inputs)
        if problems:
            raise ShardsIncomplete(f"{out}: not merging, the shards are incomplete: {'; '.join(problems)}")
    stores = [FeatureStore(p) for p in inputs]
    # only stores with feature rows take part in the feature-set comparison: a shard that cached
    # nothing (more shards than subjects, or all of its subjects failed) kept the float16 its job
    # started with, while the others may have taken the float32 fallback; its history still merges
    holding = [s for s in stores if s.holds_features]
    ref = (next((s for s in holding if s.provenance.get("dtype") == "float32"), holding[0]) if holding
           else next((s for s in stores if s.feature_set), stores[0]))
    ref_prov = ref.provenance
    promoted: list[str] = []
    for store in stores:
        rows = store in holding
        if rows and store.feature_set != ref.feature_set:
            diffs = diff_dicts(identity_of(ref_prov), identity_of(store.provenance))
            if _promotable(ref_prov, store.provenance):
                promoted.append(str(store.path))
            elif diffs == ["dtype: 'float32' -> 'float16'"]:
                raise StoreMismatch(
                    f"merge: {store.path} holds float16 features and {ref.path} float32 ones asked for with "
                    f"--dtype float32: delete {store.path} and rerun its shard with --dtype float32")
            else:
                raise StoreMismatch(
                    f"merge: {store.path} (feature set {store.feature_set}) and {ref.path} (feature set "
                    f"{ref.feature_set}) were made differently: {'; '.join(diffs[:6])}")
        if rows and not allow_version_mismatch:
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
    _check_merge_target(out, ref, stores)
    # each store resolves its own copies (newest wins), then across stores the first input wins
    segments: list[_Segment] = []
    selection: Selection = {}
    seen: dict[str, dict[str, FeatureStore]] = {}
    duplicates: dict[str, int] = {}
    duplicated: list[str] = []
    for store in stores:
        base = len(segments)
        segments.extend(store.segments)
        for plane, table in store._build_lookup().items():
            chosen = selection.setdefault(plane, [])
            have = seen.setdefault(plane, {})
            for sid, (k, a, b, i) in table.items():
                if sid in have:
                    _check_same_input(sid, plane, have[sid], store)
                    duplicates[plane] = duplicates.get(plane, 0) + 1
                    duplicated += [sid] if sid not in duplicated else []
                    continue
                have[sid] = store
                chosen.append((base + k, sid, a, b, i))
    event = {**run_context(), "event": "merge", "inputs": [str(p) for p in inputs]}
    event.pop("versions")
    if promoted:
        event["dtype_promoted"] = {"from": "float16", "to": "float32", "inputs": promoted}
        log.warning("merge: the float16 features of %s written as float32 (exact), the dtype %s took as its "
                    "float16 fallback", ", ".join(promoted), ref.path)
    sets, dropped = _merged_volume_sets(stores)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = FeatureStore(out, mode="a")
    with target.writer_lock():
        _merge_segments(segments, out, selection=selection, extra_history=[event], provenance=ref_prov,
                        volumes=False, promote=bool(promoted))
    for store in stores:
        store.close()
    target.refresh()
    for name, (ids, X, prov) in sets.items():
        target.write_volume_embeddings(name, ids, X, prov)
    target.close()
    for name, why in dropped.items():
        log.warning("merge: volume embeddings %r not merged: %s; run slice2vol aggregate (or embed) on %s",
                    name, why, out)
    merged = FeatureStore(out)
    counts = {"subjects": {p: len(merged.subjects(p)) for p in merged.planes}, "duplicates": duplicates,
              "volume_sets": sorted(sets), "volume_sets_dropped": dropped, "promoted": promoted}
    merged.close()
    if any(duplicates.values()):
        log.warning("merge: %d subject(s) appeared in several inputs, made from the same files (e.g. %s; per plane "
                    "%s); kept the copy of the first input", len(duplicated), ", ".join(duplicated[:3]), duplicates)
    return counts


def _check_same_input(sid: str, plane: str, first: "FeatureStore", other: "FeatureStore") -> None:
    """Refuses a subject that two merge inputs made from different files: which copy is the subject's
    cannot be told, and keeping the first input's made the merged store depend on the argument order.

    Raises:
        StoreMismatch: naming the subject, both stores and the modality whose file differs.
    """
    a, b = first.subject_inputs(sid, plane) or {}, other.subject_inputs(sid, plane) or {}
    files_a, files_b = a.get("files") or {}, b.get("files") or {}
    for name in sorted(set(files_a) & set(files_b)):
        sha_a, sha_b = (files_a[name] or {}).get("sha256"), (files_b[name] or {}).get("sha256")
        if sha_a and sha_b and sha_a != sha_b:
            raise StoreMismatch(f"merge: subject {sid!r} is in {first.path} and {other.path} made from different "
                                f"{name} files (sha256 {sha_a[:12]}... vs {sha_b[:12]}...): two scans under one ID; "
                                "cache it again in one of them, or leave one input out")


def _promotable(wide: Mapping[str, Any], narrow: Mapping[str, Any]) -> bool:
    """Whether features of provenance ``narrow`` (float16) can join those of ``wide`` as float32: the
    same identity but for the dtype, and ``wide`` stored float32 only as the fallback of a float16 job
    (each shard decides the fallback on its own batches, so one shard of a real encoder may take it
    and the others not). A float32 asked for with --dtype is a choice merge does not override."""
    fallback = wide.get("dtype_fallback") or {}
    return (wide.get("dtype") == "float32" and narrow.get("dtype") == "float16"
            and fallback.get("requested") == "float16"
            and _jsonable({**identity_of(wide), "dtype": None}) == _jsonable({**identity_of(narrow), "dtype": None}))


def _merged_volume_sets(stores: Sequence["FeatureStore"]
                        ) -> tuple[dict[str, tuple[list[str], np.ndarray, dict]], dict[str, str]]:
    """The volume-embedding sets of the merged store, and why the others are left out.

    Shards aggregated (or embedded) one by one hold one set each covering their own subjects: a set
    is joined (rows of the inputs in order, a subject's first copy wins) when every input holds it and
    was made the same way (provenance equal but for date and host; a trainable aggregator fitted on
    each shard differs in its training subjects, so it is not joined). Otherwise it is left out, with
    a warning, instead of one input's set standing for the whole store.
    """
    names = list(dict.fromkeys(n for store in stores for n in store.volume_embedding_names()))
    sets: dict[str, tuple[list[str], np.ndarray, dict]] = {}
    dropped: dict[str, str] = {}
    for name in names:
        lacking = [str(store.path) for store in stores if name not in store.volume_embedding_names()]
        if lacking:
            dropped[name] = f"{len(lacking)} input(s) do not hold it (e.g. {lacking[0]})"
            continue
        try:
            parts = [store.volume_embeddings(name) for store in stores]
        except (StoreCorrupt, StaleEmbeddings) as err:  # derived data: left out, the slice features are still merged
            dropped[name] = str(err)
            continue
        ref_id = identity_of(parts[0][2])
        diffs = [(store.path, diff_dicts(ref_id, identity_of(prov))) for store, (_, _, prov) in zip(stores, parts)]
        differ = [(path, d) for path, d in diffs if d]
        if differ:
            dropped[name] = f"{differ[0][0]} made it differently ({'; '.join(differ[0][1][:3])})"
            continue
        ids: list[str] = []
        rows: list[np.ndarray] = []
        seen: set[str] = set()
        for sub_ids, X, _ in parts:
            for sid, row in zip(sub_ids, X):
                if sid not in seen:
                    seen.add(sid)
                    ids.append(sid)
                    rows.append(row)
        sets[name] = (ids, np.stack(rows), identity_of(parts[0][2]))
    return sets, dropped


def _check_merge_target(out: Path, ref: "FeatureStore", stores: Sequence["FeatureStore"]) -> None:
    """Refuses to replace an existing store at ``out`` with what would lose data: a store of another
    feature set, subjects no input holds, or volume embeddings (merge writes a new file). Rerunning
    the same merge over the same inputs stays allowed."""
    if not out.exists() and not out.with_name(out.name + ".parts").exists():
        return
    existing = FeatureStore(out)
    try:
        if (existing.holds_features and existing.feature_set and ref.feature_set
                and existing.feature_set != ref.feature_set):
            raise StoreMismatch(f"{out}: already a store of feature set {existing.feature_set} "
                                f"({existing.provenance.get('encoder')}), the inputs are {ref.feature_set} "
                                f"({ref.provenance.get('encoder')}); merge into another --store")
        held = {sid for store in stores for sid in store.subjects()}
        lost = sorted(set(existing.subjects()) - held)
        if lost:
            raise StoreError(f"{out}: already a store holding {len(lost)} subject(s) no input has (e.g. "
                             f"{lost[:3]}); merge would replace it: add {out.name} to the inputs, or merge into "
                             "another --store")
        names = existing.volume_embedding_names()
        if names:
            raise StoreError(f"{out}: already a store with volume embeddings {names}; merge would replace it "
                             "without them: merge into another --store (then aggregate again)")
    finally:
        existing.close()


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
