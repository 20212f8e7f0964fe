"""Embedding a cohort with a 3D encoder into a feature store (one vector per subject).

:func:`embed_cohort3d` loads every subject as the encoder asks (:meth:`Encoder3D.volume_config`: raw
intensities in RAS), embeds it (whole volume or sliding windows) and writes one set of volume
embeddings with :meth:`slice2vol.cache.FeatureStore.write_volume_embeddings`, where the benchmark reads
it like aggregated 2D features. The set's provenance is the encoder's :class:`Encoder3DInfo` (key,
weights, sha256 of the weights file and of the loaded parameters, the authors' preprocessing) plus the
embedding options and the per-volume time, and the *input fingerprint* of every row (``inputs``:
subject -> modality -> size, mtime_ns, sha256 of the file, :func:`slice2vol.data.io.fingerprint`).

Running again on a store that holds the set made with the same encoder, weights and options updates
it: subjects whose input files match their stored fingerprint are not embedded again, the others are,
and the rows of subjects that fail in this run or are not in this run's manifest are kept as they
were (``report.kept``). A set made with other settings is never replaced silently: that is refused
(:class:`slice2vol.cache.StoreMismatch`) unless ``replace=True`` (``slice2vol embed --replace``).

A subject that fails (unreadable file, a volume the network cannot take) is recorded in
``report.failures`` and the others go on. Finished rows, each with its input fingerprint, are kept
every ``commit_every`` subjects and once more before the final write in a side file
``<store>.<set>.partial.npz`` (plain arrays and a JSON string, no pickle), so a killed job, or one
whose final write failed, resumes where it stopped when run again with the same encoder and options;
a row whose input changed since is embedded again. The file is removed once the set is written. The
store is checked up front (not locked by another writer, its folder and files writable; a missing
folder is created when the first rows are kept), so a job that cannot write fails before it embeds
anything. So does a cohort the manifest checks left empty (:func:`check_cohort`) and sliding windows
for an encoder that does not support them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from slice2vol.data.io import VolumeConfig, file_problem, fingerprint, fingerprint_changes
from slice2vol.data.manifest import Cohort, Failure, load_subject
from slice2vol.encoders3d.base import Encoder3D, SlidingWindow, build_encoder3d

log = logging.getLogger(__name__)


@dataclass
class Encoder3DConfig:
    """A 3D encoder as a config (``slice2vol embed --config``, experiment ``encoders3d`` entries).

    Attributes:
        key: registry key (``3d/deepbet``, ``3d/monai_resnet18``, ...).
        weights: ``random``, ``hub[:tag]``, ``package`` or a local checkpoint.
        kwargs: family options (``levels``, ``pooling``, ``input_size``, ``spacing``, ``networks``, ...).
        sliding_window: ``None`` = whole volume; else :class:`SlidingWindow` fields
            (``roi_size``, ``overlap``, ``sw_batch_size``, ``mode``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    """

    key: str = "3d/deepbet"
    weights: str = "random"
    kwargs: dict = field(default_factory=dict)
    sliding_window: dict | None = None
    device: str = "auto"

    def build(self) -> Encoder3D:
        from slice2vol.commands._common import resolve_device

        return build_encoder3d(self.key, self.weights, **dict(self.kwargs)).to(resolve_device(self.device))


@dataclass
class Embed3DReport:
    """Outcome of :func:`embed_cohort3d`.

    Attributes:
        name: the set written.
        store: the feature store.
        done: subjects of this run's cohort that are in the set (in cohort order): embedded now, resumed
            or unchanged since they were stored.
        failures: subjects that could not be embedded, with the reason.
        embed_dim: D.
        resumed: subjects taken over from an interrupted run.
        unchanged: subjects already in the set whose input files did not change (not embedded again).
        kept: subjects not embedded in this run whose stored rows were kept -> why (``failed in this
            run``, ``not in this run's manifest``); written after the cohort's subjects.
        removed: subjects whose stored row this run dropped -> why: their input changed since, and
            embedding the new input failed (the row described the old scan).
        replaced: rows of the set stored before that this run dropped (``replace=True``).
        seconds_per_volume: mean embedding time per volume (preprocess + network), loading excluded.
        load_seconds_per_volume: mean loading time per volume.
    """

    name: str
    store: Path
    done: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    embed_dim: int = 0
    resumed: int = 0
    unchanged: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    removed: dict[str, str] = field(default_factory=dict)
    replaced: int = 0
    seconds_per_volume: float = 0.0
    load_seconds_per_volume: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def ids(self) -> list[str]:
        """Every subject of the set as written: ``done`` then ``kept``."""
        return self.done + [i for i in self.kept if i not in self.done]

    def summary(self, failures: bool = True) -> str:
        """What was written (first line), what was kept from before and, with ``failures``, what failed."""
        counts = [f"{self.seconds_per_volume:.2f} s/volume"]
        embedded = len(self.done) - len(self.unchanged) - self.resumed
        if self.unchanged or self.resumed or self.kept:
            counts.append(f"{embedded} embedded")
        counts += [f"{n} {what}" for n, what in ((self.resumed, "resumed"), (len(self.unchanged), "unchanged"),
                                                 (len(self.kept), "kept from before")) if n]
        lines = [f"{self.store}: wrote {self.name!r}, {len(self.ids)} subjects x {self.embed_dim} "
                 f"({', '.join(counts)})"]
        by_reason: dict[str, list[str]] = {}
        for subject, reason in self.kept.items():
            by_reason.setdefault(reason, []).append(subject)
        for reason, subjects in by_reason.items():
            shown = ", ".join(subjects[:10]) + (f" and {len(subjects) - 10} more" if len(subjects) > 10 else "")
            lines.append(f"  kept from before ({reason}): {shown}")
        for subject, reason in self.removed.items():
            lines.append(f"  removed ({reason}): {subject}")
        if self.replaced:
            lines.append(f"  replaced: the set's {self.replaced} earlier rows were dropped (--replace)")
        if failures:
            lines += [f"  failed: {f}" for f in self.failures]
        return "\n".join(lines)


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of the loaded parameters and buffers (the 2D caching job's definition)."""
    from slice2vol.encoders.base import state_sha256 as _state_sha256

    return _state_sha256(module)


def embedding_provenance(encoder: Encoder3D, window: SlidingWindow | None, volume_cfg: VolumeConfig,
                         state_hash: str | None = None) -> dict[str, Any]:
    """What identifies a 3D embedding set: encoder, weights (file and loaded parameters), options."""
    from slice2vol.extract import volume_identity

    info = encoder.info
    return {
        "kind": "native-3d", "encoder": info.key, "encoder_key": info.key, "weights": info.weights,
        "weights_sha256": info.weights_sha256, "state_sha256": state_hash or state_sha256(encoder),
        "encoder_info": info.to_dict(), "embed_dim": int(info.embed_dim),
        "mode": "sliding" if window is not None else "whole",
        "sliding_window": None if window is None else {**asdict(window), "roi_size": list(
            window.roi_size or info.input_size or [])},
        "volume_config": volume_identity(volume_cfg),  # as the slice cache records it
    }


def partial_path(store_path: str | Path, name: str) -> Path:
    store_path = Path(store_path)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return store_path.with_name(f"{store_path.name}.{safe}.partial.npz")


#: layout of the partial file (2: the input fingerprint of every row, so rows need not match a subject list)
PARTIAL_FORMAT = 2


def _identity(prov: Mapping[str, Any]) -> str:
    return json.dumps(prov, sort_keys=True, default=str)


@dataclass
class _Row:
    """One subject's embedding (D,) and the fingerprint of the input files it was made from (None: unknown)."""

    x: np.ndarray
    inputs: dict | None


def _load_partial(path: Path, identity: str) -> dict[str, _Row]:
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["identity"]) != identity:
                log.warning("%s: made with another encoder, options or an older version; starting again", path)
                return {}
            ids = [str(i) for i in data["ids"]]
            X = np.asarray(data["X"], dtype=np.float32)
            inputs = json.loads(str(data["inputs"]))
        return {i: _Row(x, inputs.get(i)) for i, x in zip(ids, X)}
    except (OSError, KeyError, ValueError, AttributeError) as err:
        log.warning("%s: unreadable partial embeddings (%s); starting again", path, err)
        return {}


def _save_partial(path: Path, identity: str, rows: Mapping[str, _Row]) -> None:
    ids = list(rows)
    # the store's folder is made by the final write; the rows kept before it need it already
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, dtype=str), X=np.stack([rows[i].x for i in ids]).astype(np.float32),
             inputs=np.asarray(json.dumps({i: rows[i].inputs for i in ids})), identity=np.asarray(identity))
    tmp.replace(path)


def _input_change(stored: Mapping[str, Any] | None, images: Mapping[str, str | Path]) -> str:
    """Why a row made from the input fingerprint ``stored`` cannot stand for ``images`` now ('' when it can).

    A file that is missing or unreadable now cannot be checked: the subject is embedded again (and
    fails with the loader's message)."""
    if not stored:
        return "no input fingerprint stored with it"
    for path in images.values():
        problem = file_problem(path)
        if problem:
            return f"{path}: {problem}"
    try:
        changes = fingerprint_changes(dict(stored), dict(images))
    except (AttributeError, TypeError, ValueError):
        return "its stored input fingerprint is unreadable"
    return f"input changed since it was embedded ({'; '.join(changes)})" if changes else ""


def check_store_writable(store_path: str | Path, set_name: str | None = None) -> None:
    """Fails fast when the set could not be written at the end, before any time is spent embedding.

    Checks that the store's folder can be created or written in, that the store file, its lock, its
    parts folder and the partial file of ``set_name`` (those that exist) are writable (not read-only
    or immutable), and that no other process holds the store's writer lock. The lock is not held
    afterwards (the final write takes it), so the final write can still fail; the rows embedded
    so far are then kept in the partial file for the rerun.

    Raises:
        StoreLocked: another process is writing the store.
        StoreError: the store path is a folder, or something above cannot be written (one line naming it).
    """
    from slice2vol.cache import FeatureStore, StoreError, StoreLocked

    store = FeatureStore(store_path, mode="a")  # a folder given as the store fails here
    problem = store.write_problem([partial_path(store.path, set_name)] if set_name else [])
    if problem:
        raise StoreError(problem)
    holder = store.locked_by()
    if holder:
        raise StoreLocked(f"{store.path}: another process is writing this store ({holder}; lock {store.lock_path}); "
                          "wait for it to finish, or write to another --store")


MAX_PROVENANCE_FAILURES = 100
"""At most this many failure lines go into a set's provenance (``n_failures`` counts them all)."""


def check_cohort(cohort: Cohort) -> None:
    """Fails when the manifest checks left no subject to embed, naming the first problem.

    Raises:
        ValueError: ``cohort.subjects`` is empty (one line: the manifest, how many rows were left out, the first).
    """
    if cohort.subjects:
        return
    first = f" (first: {cohort.failures[0]})" if cohort.failures else ""
    raise ValueError(f"{cohort.source or 'cohort'}: no subject left to embed: {len(cohort.failures)} left out by "
                     f"the manifest checks{first}")


def _stored_set(store_path: Path, name: str, prov: Mapping[str, Any], replace: bool,
                report: Embed3DReport) -> tuple[dict[str, _Row], dict[str, Any]]:
    """The rows (in stored order) and provenance of set ``name`` when the store holds it made with ``prov``.

    With ``replace``, a stored set is ignored (``report.replaced`` counts its rows) and nothing is returned.

    Raises:
        StoreMismatch: the set was made with another encoder, weights or options, and not ``replace``.
        StoreCorrupt: the stored set fails its checksum, and not ``replace``.
    """
    from slice2vol.cache import FeatureStore, StoreCorrupt, StoreMismatch, diff_dicts

    store = FeatureStore(store_path)
    try:
        if not store.exists() or name not in store.volume_embedding_names():
            return {}, {}
        try:
            ids, X, stored = store.volume_embeddings(name)
        except StoreCorrupt as err:
            if not replace:
                raise StoreCorrupt(f"{err}; or replace the whole set with --replace (replace=True)") from None
            log.warning("%s; replacing the set", err)
            return {}, {}
    finally:
        store.close()
    if replace:
        log.warning("%s: replacing set %r (%d rows) with this run's subjects only", store_path, name, len(ids))
        report.replaced = len(ids)
        return {}, {}
    want = json.loads(_identity(prov))
    have = json.loads(_identity({k: stored[k] for k in prov if k in stored}))
    differences = diff_dicts(have, want)
    if differences:
        shown = "; ".join(differences[:3])
        raise StoreMismatch(f"{store_path}: set {name!r} holds {len(ids)} embeddings made with other settings "
                            f"({shown[:300]}); embed under another --name, or replace the set with --replace "
                            "(replace=True; its stored rows are dropped)")
    inputs = stored.get("inputs") if isinstance(stored.get("inputs"), dict) else {}
    return {i: _Row(x, inputs.get(i)) for i, x in zip(ids, X)}, stored


def embed_cohort3d(encoder: Encoder3D, cohort: Cohort, store_path: str | Path, set_name: str, *,
                   progress: bool = True, sliding_window: SlidingWindow | Mapping | bool | None = None,
                   volume_config: VolumeConfig | None = None, write_labels: bool = True,
                   provenance: Mapping[str, Any] | None = None, commit_every: int = 8,
                   resume: bool = True, replace: bool = False) -> Embed3DReport:
    """Embeds every subject of ``cohort`` and writes (or updates) the set ``set_name`` in the store.

    When the store already holds the set made with the same encoder, weights and options, the set is
    updated, never shrunk: subjects whose input files match the fingerprint stored with their row
    are not embedded again (``report.unchanged``), and the rows of subjects that fail in this run or
    are not in ``cohort`` are kept (``report.kept``, after the cohort's subjects). A row whose input
    changed since is embedded again; should that fail, the old row is dropped (``report.removed``):
    it describes the old scan. Sets written before fingerprints were stored have none: their subjects are embedded again.

    Args:
        encoder: from :func:`build_encoder3d` (on the device it should run on).
        cohort: subjects to embed.
        store_path: ``.h5`` feature store (created if needed).
        set_name: volume-embedding set name, e.g. ``3d/deepbet``.
        progress: progress bar / log lines (:mod:`slice2vol.progress`).
        sliding_window: ``None`` for whole volumes, else MONAI ``sliding_window_inference`` options.
        volume_config: how subjects are loaded; default :meth:`Encoder3D.volume_config`.
        write_labels: also store the cohort's labels for the subjects written.
        provenance: extra provenance keys.
        commit_every: keep finished rows in the partial file every N subjects (0: only before the
            final write).
        resume: take over the rows of an interrupted run with the same encoder and options whose
            input files did not change since.
        replace: write the set from this run's subjects only, dropping a stored set of that name
            (needed when it was made with other settings).

    Returns:
        :class:`Embed3DReport`.

    Raises:
        ValueError: no subject could be embedded (the store is left unchanged), the manifest checks left
            none (:func:`check_cohort`), or sliding windows for an encoder that does not support them
            (both before anything is read).
        StoreMismatch: the store holds the set made with other settings (and not ``replace``).
        StoreLocked, StoreError: the store cannot be written (checked before embedding).
    """
    from slice2vol.cache import FeatureStore, checked_store_path
    from slice2vol.progress import track

    window = SlidingWindow.parse(sliding_window)
    if window is not None and not encoder.supports_sliding_window:
        # refused once here, not once per subject inside the loop
        raise ValueError(f"{encoder.info.key}: sliding windows are not supported (its preprocessing needs the whole "
                         "volume); embed whole volumes (no --sliding-window / sliding_window: null)")
    check_cohort(cohort)
    # a store given through a symbolic link is its target: the partial file sits beside the target,
    # where a job given the target itself finds it
    store_path = checked_store_path(store_path)
    check_store_writable(store_path, set_name)
    volume_cfg = volume_config or encoder.volume_config()
    encoder = encoder.eval()
    prov = embedding_provenance(encoder, window, volume_cfg)
    # every row carries its input fingerprint, so the partial file need not match a list of subjects
    identity = _identity({**prov, "partial_format": PARTIAL_FORMAT})
    side = partial_path(store_path, set_name)
    report = Embed3DReport(set_name, store_path, embed_dim=int(encoder.info.embed_dim))
    stored, stored_prov = _stored_set(store_path, set_name, prov, replace, report)
    partial = _load_partial(side, identity) if resume else {}
    rows: dict[str, _Row] = {}  # the cohort's rows: resumed, unchanged in the store, embedded now
    fresh: dict[str, _Row] = {}  # the rows not in the store yet: what the partial file keeps
    stale: dict[str, str] = {}  # stored subjects embedded again -> why
    todo = []
    for subject in cohort.subjects:
        sid = subject.subject_id
        if sid in partial:
            why = _input_change(partial[sid].inputs, subject.images)
            if not why:
                rows[sid] = fresh[sid] = partial[sid]
                report.resumed += 1
                continue
            log.warning("%s: not resumed from %s: %s; embedding it again", sid, side.name, why)
        if sid in stored:
            why = _input_change(stored[sid].inputs, subject.images)
            if not why:
                rows[sid] = stored[sid]
                report.unchanged.append(sid)
                continue
            stale[sid] = why
            log.info("%s: already in %r but %s; embedding it again", sid, set_name, why)
        todo.append(subject)
    if report.unchanged:
        log.info("%s: %d subject(s) of %r unchanged since they were embedded, %d to do", store_path,
                 len(report.unchanged), set_name, len(todo))
    embed_s, load_s, n_new = 0.0, 0.0, 0
    since_commit = 0
    for subject in track(todo, desc=f"embed {set_name}", unit="vol", enabled=progress):
        t0 = time.perf_counter()
        try:
            # fingerprinted before reading: a file rewritten meanwhile then counts as changed next time
            inputs = fingerprint(subject.images)
            volume = load_subject(subject, volume_cfg, with_seg=False)
        except Exception as err:  # noqa: BLE001 - whatever one subject's files raise fails that subject only
            # no log line here: the caller lists every failure once, as slice2vol cache does
            report.failures.append(Failure.of(subject, err))
            continue
        t1 = time.perf_counter()
        try:
            x = encoder.embed_volume(volume, window).numpy().astype(np.float32)
        except (ValueError, RuntimeError) as err:  # e.g. a volume too small for the network
            if "CUDA error" in str(err):
                # a device-side assert or illegal access leaves the CUDA context unusable: every later
                # subject would fail the same way, so the job stops here, keeping its finished rows for
                # the rerun
                if fresh:
                    _save_partial(side, identity, fresh)
                raise
            message = " ".join(str(err).split())[:300]
            source = subject.images[next(iter(subject.images))] if subject.images else ""
            report.failures.append(Failure(subject.subject_id, str(source), f"{source}: {message}"))
            continue
        if not np.isfinite(x).all():
            # the network overflowed on this volume's raw intensities (e.g. values near 1e30): name the file
            source = subject.images[next(iter(subject.images))] if subject.images else ""
            lo, hi = float(np.nanmin(volume.data)), float(np.nanmax(volume.data))
            why = (f"constant volume (all voxels = {lo:g}): nothing to embed" if lo == hi else
                   f"intensities {lo:.3g} to {hi:.3g} as given to {encoder.info.key}: rescale the image")
            report.failures.append(Failure(subject.subject_id, str(source), (
                f"{source}: the embedding is not finite (NaN/Inf); {why}")))
            continue
        load_s += t1 - t0
        embed_s += time.perf_counter() - t1
        n_new += 1
        rows[subject.subject_id] = fresh[subject.subject_id] = _Row(x, inputs)
        since_commit += 1
        if commit_every and since_commit >= commit_every:
            _save_partial(side, identity, fresh)
            since_commit = 0
    if not rows:
        failures = list(cohort.failures) + list(report.failures)  # the manifest's left-out rows count too
        raise ValueError(f"{cohort.source or 'cohort'}: no subject could be embedded with {encoder.info.key} "
                         f"({len(failures)} failures; first: {failures[0] if failures else '-'}); "
                         f"{store_path} is left unchanged")
    failed = {f.subject_id for f in report.failures} | {f.subject_id for f in cohort.failures}
    for sid in stored:
        if sid in rows:
            continue
        if sid not in failed:
            report.kept[sid] = "not in this run's manifest"
        elif stale.get(sid, "").startswith("input changed"):
            # its row describes a scan that is no longer there: a bench or search would take it for the
            # new one (the slice-feature cache voids such rows too)
            report.removed[sid] = "failed in this run; its row was of its input before it changed"
        else:
            report.kept[sid] = "failed in this run"
    report.done = [s.subject_id for s in cohort.subjects if s.subject_id in rows]
    ids = report.ids
    table = {**stored, **rows}
    X = np.stack([table[i].x for i in ids]).astype(np.float32)
    report.embed_dim = int(X.shape[1])
    if n_new:
        report.seconds_per_volume = embed_s / n_new
        report.load_seconds_per_volume = load_s / n_new
    else:  # nothing embedded in this run: the set's timing is still that of the run that embedded it
        report.seconds_per_volume = float(stored_prov.get("seconds_per_volume", 0.0) or 0.0)
        report.load_seconds_per_volume = float(stored_prov.get("load_seconds_per_volume", 0.0) or 0.0)
    failure_lines = list(dict.fromkeys(str(f) for f in [*cohort.failures, *report.failures]))  # manifest's too
    full = {**prov, "n_failures": len(failure_lines), "failures": failure_lines[:MAX_PROVENANCE_FAILURES],
            "seconds_per_volume": round(report.seconds_per_volume, 4),
            "load_seconds_per_volume": round(report.load_seconds_per_volume, 4),
            "device": str(encoder.device), "torch_threads": torch.get_num_threads(),
            "n_embedded": n_new, "n_resumed": report.resumed, "n_unchanged": len(report.unchanged),
            "kept": dict(report.kept), "removed": dict(report.removed),
            "inputs": {i: table[i].inputs for i in ids if table[i].inputs}, **dict(provenance or {})}
    if fresh:  # kept until the set is written: if that fails (locked, disk full), a rerun resumes from here
        try:
            _save_partial(side, identity, fresh)
        except OSError as err:
            log.warning("%s: could not keep the rows embedded so far (%s)", side, err)
    store = FeatureStore(store_path, mode="a")
    if write_labels and cohort.label_types:
        wanted = set(report.done)
        store.write_labels({s.subject_id: dict(s.labels) for s in cohort.subjects if s.subject_id in wanted},
                           dict(cohort.label_types))
    store.write_volume_embeddings(set_name, ids, X, full)
    side.unlink(missing_ok=True)
    return report
