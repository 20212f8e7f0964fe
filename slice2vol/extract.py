"""The caching job: cohort -> readers (read + slice) -> packed batches -> encoder -> store.

Data flow, with shapes::

    Subject --reader--> VolumeItem{plane: (S, C*k, H, W)} --packer--> (B, C*k, H, W) full batches
        --encoder.encode--> (B, D) --scatter--> SubjectFeatures{plane: (S, D)} --commit--> part segment

Readers (threads of this process on CPU, DataLoader processes on GPU: :func:`resolve_reader`) return
failures instead of raising, so one corrupt volume costs one subject. Slices of
several volumes fill each batch (the encoder never runs a ragged half batch except the very last).
On CUDA the batch is staged in pinned memory and copied with ``non_blocking=True`` while the
previous batch is still running. Completed subjects are committed to the store in atomic part
files every ``commit_every`` subjects (see :mod:`slice2vol.cache`), and the store is compacted at the
end. A restarted job skips every (subject, plane) already committed, unless its stored rows fail their
checksum or its input files changed since (size, mtime, then sha256: the *input fingerprint* stored
with the features); those are recomputed, with a log line saying why. When the recompute of a changed
input fails, the old rows are made void in the part that records the failure: they describe the old
input, so no reader may take them for the new one.

float16 stores (the default) are range-checked per batch: features that float16 would flush to zero
(|x| below ~6e-5, e.g. random-init networks) or overflow switch the whole feature set to float32 when
no feature row is stored yet (recorded in the provenance as ``dtype_fallback``), else fail those subjects
with a one-line reason; nothing is ever stored as silent zeros or inf.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from slice2vol.cache import (
    FeatureStore,
    PlaneFeatures,
    StoreLocked,
    SubjectFeatures,
    config_hash_of,
    run_context,
)
from slice2vol.config import to_dict
from slice2vol.data.io import VolumeConfig, VolumeError, fingerprint, fingerprint_changes
from slice2vol.data.manifest import Cohort, Failure, Subject, load_subject
from slice2vol.data.slicing import SliceConfig, plane_foreground, slice_volume
from slice2vol.encoders.base import state_sha256
from slice2vol.progress import bar as progress_bar
from slice2vol.runtime import checked_device, one_intra_op_thread, release_free_heap, torch_threads

log = logging.getLogger(__name__)


# -- shards ---------------------------------------------------------------------------------------
def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` -> (i, n), checked; ``None`` stays ``None``."""
    if shard is None or shard == "":
        return None
    if isinstance(shard, str):
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    else:
        i, n = (int(v) for v in shard)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return i, n


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of this process under torchrun (``RANK`` of ``WORLD_SIZE``), else None.

    SLURM array variables are deliberately *not* read: an array spec says which tasks run, not how
    many shards there are (``--array=3`` reruns one task of 8, ``--array=0-6:2`` runs four of seven),
    so the shard count must be explicit: ``--shard $SLURM_ARRAY_TASK_ID/N`` (``scripts/slurm_cache.sh``).
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:
        return parse_shard((int(env["RANK"]), int(env["WORLD_SIZE"])))
    return None


def shard_path(path: str | Path, index: int, count: int) -> Path:
    """``out.h5`` -> ``out.shard-01-of-04.h5``: every shard writes its own file."""
    path = Path(path)
    width = len(str(count - 1))
    suffix = path.suffix or ".h5"
    return path.with_name(f"{path.name[:-len(path.suffix)] if path.suffix else path.name}"
                          f".shard-{index:0{width}d}-of-{count}{suffix}")


def shard_subjects(subjects: Sequence[Subject], index: int, count: int) -> list[Subject]:
    """Round-robin over manifest order: balanced, and the same for every shard given the same manifest."""
    return list(subjects[index::count])


# -- provenance -----------------------------------------------------------------------------------
def feature_provenance(encoder: Any, encoder_key: str, encoder_kwargs: Mapping[str, Any],
                       volume_cfg: VolumeConfig, slice_cfg: SliceConfig, *, dtype: str, tokens: bool,
                       amp: str | None = None, state_hash: str | None = None) -> dict[str, Any]:
    """Provenance dict for features made by ``encoder`` (identity keys + volatile run context).

    The weights *path* is kept as ``weights_path`` (volatile): shards on different machines read the
    same checkpoint from different paths; the sha256 is what identifies it.
    """
    info = encoder.info.to_dict()
    weights = str(info.pop("weights", "random"))
    slice_dict = to_dict(slice_cfg)
    slice_dict.pop("planes")  # planes can be added to a feature set later; they do not change features
    kind = "file" if weights not in ("random", "") and not weights.startswith("hub") else weights
    return {
        "encoder": encoder_key,
        "encoder_kwargs": {k: v for k, v in dict(encoder_kwargs).items()},
        "weights": kind or "random",
        "weights_sha256": info.get("weights_sha256", ""),
        "weights_path": weights,
        "state_sha256": state_hash or state_sha256(encoder),
        "encoder_info": info,
        "volume_config": volume_identity(volume_cfg),
        "slice_config": slice_dict,
        "dtype": dtype,
        "tokens": bool(tokens),
        "amp": amp or "none",
        "inference": inference_settings(encoder),
        **run_context(),
    }


#: VolumeConfig fields added after stores existed that only refuse files (they never change the
#: features of a file they let through): recorded only when changed from their default, so a store
#: cached before the field existed keeps its feature set instead of being refused as another one
_LATER_GATES = ("min_extent_ratio", "min_voxels", "min_foreground_fraction", "max_foreground_fraction",
                "refuse_label_maps")


def volume_identity(volume_cfg: VolumeConfig) -> dict[str, Any]:
    out = to_dict(volume_cfg)
    for name in _LATER_GATES:
        if out.get(name) == VolumeConfig.__dataclass_fields__[name].default:
            out.pop(name)
    return out


def inference_settings(encoder: Any) -> dict[str, Any]:
    """How the encoder ran (volatile provenance: these change features only by float rounding);
    an encoder object that is not an :class:`Encoder` reports none of them."""
    if hasattr(encoder, "inference_settings"):
        return encoder.inference_settings()
    return {"batchnorm_folded": 0, "channels_last": False, "compiled": False}


# -- worker side ----------------------------------------------------------------------------------
@dataclass
class VolumeItem:
    """What a DataLoader worker returns for one subject.

    Attributes:
        subject_id: the subject.
        planes: plane -> (images (S, C*k, H, W) float32, indices (S,), positions (S, 3)).
        error: one-line reason when loading or slicing failed (``planes`` is then empty).
        path: file that failed, if known.
        seconds: time spent reading and slicing.
        inputs: the input fingerprint (``files``: modality -> size, mtime_ns, sha256) and how an
            oblique volume was handled (``oblique``: degrees, action), stored with the features.
    """

    subject_id: str
    planes: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = field(default_factory=dict)
    error: str | None = None
    path: str = ""
    seconds: float = 0.0
    inputs: dict[str, Any] | None = None


class VolumeSlicesDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i = the slices of subject i in the planes it still needs.

    Args:
        jobs: (subject, planes to compute) pairs.
        volume_cfg: how volumes are read.
        slice_cfg: how they are sliced (its ``planes`` are replaced per job).
    """

    def __init__(self, jobs: Sequence[tuple[Subject, tuple[str, ...]]], volume_cfg: VolumeConfig,
                 slice_cfg: SliceConfig) -> None:
        self.jobs = list(jobs)
        self.volume_cfg = volume_cfg
        self.slice_cfg = slice_cfg

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> VolumeItem:
        subject, planes = self.jobs[i]
        start = time.perf_counter()
        try:
            # hashed before reading: a file replaced meanwhile is caught by the next run's check
            files = fingerprint(subject.images)
            volume = load_subject(subject, self.volume_cfg, with_seg=False)
            sliced = slice_volume(volume, dataclasses.replace(self.slice_cfg, planes=tuple(planes)))
            empty = [p for p, s in sliced.items() if not len(s)]
            if empty:
                # a subject without a slice in a plane has no bag there: every aggregation over that
                # plane, for the whole cohort, would stop at it (a blank or corrupt volume, or a small
                # object in a large field of view)
                raise VolumeError(next(iter(subject.images.values())), no_slices_problem(volume, empty, self.slice_cfg))
            out = {p: (s.images.float().contiguous(), s.indices, s.positions) for p, s in sliced.items()}
            inputs = {"files": files, "oblique": {"degrees": volume.obliquity_deg, "action": volume.oblique_action}}
            return VolumeItem(subject.subject_id, out, seconds=time.perf_counter() - start, inputs=inputs)
        except Exception as err:  # noqa: BLE001 - anything one subject's files cause fails that subject only
            failure = Failure.of(subject, err)
            return VolumeItem(subject.subject_id, error=failure.message, path=failure.path,
                              seconds=time.perf_counter() - start)


#: a stride that leaves fewer candidate slices than this in every plane without a slice is blamed
#: for it, not the volume (``--stride 1000`` looks at slice 0 only: the edge of the field of view)
FEW_SLICES = 3


def no_slices_problem(volume: Any, planes: Sequence[str], cfg: SliceConfig) -> str:
    """Why ``planes`` of ``volume`` kept no slice: the fullest candidate slice's foreground fraction,
    or the stride when it left only a few candidates (fewer than :data:`FEW_SLICES`) in each of them."""
    mask = torch.from_numpy(volume.mask)
    foreground = {p: plane_foreground(mask, p) for p in planes}
    fullest = max(float(fg[::cfg.stride].max(initial=0.0)) for fg in foreground.values())
    where = planes[0] if len(planes) == 1 else ", ".join(planes[:-1]) + " or " + planes[-1]
    looked = {p: len(fg[::cfg.stride]) for p, fg in foreground.items()}
    if max(looked.values()) < FEW_SLICES:
        seen = ", ".join(f"{looked[p]} {p} slice(s) of {len(fg)}" for p, fg in foreground.items())
        return (f"no {where} slice has {cfg.min_foreground:.0%} foreground or more, but stride {cfg.stride} "
                f"looked at only {seen} (the fullest has {fullest:.1%}): the stride is too large for this "
                "volume; use a smaller --stride")
    return (f"no {where} slice has {cfg.min_foreground:.0%} foreground or more (min_foreground; the fullest "
            f"of the slices looked at, stride {cfg.stride}, has {fullest:.1%}): a blank or corrupt volume, or a "
            f"small object in a large field of view (lower --min-foreground)")


def _identity(item: Any) -> Any:
    return item


# -- report ---------------------------------------------------------------------------------------
@dataclass
class CacheReport:
    """What a caching job did.

    Attributes:
        store: the file written (a shard file under sharding).
        done: subjects computed by this run (complete and committed).
        skipped: subjects already complete in the store (not recomputed).
        failures: subjects that could not be cached, with the reason (manifest rows included).
        slices: slices encoded by this run.
        seconds: wall time of the job.
        encode_seconds: time inside the encoder.
        wait_seconds: time the encoding thread waited for volumes (the first volume's read included;
            large when the readers cannot keep up: raise ``num_workers``). On a GPU the device may
            still be running the batch before meanwhile.
        store_seconds: time spent writing the store (commits and the final compaction).
        feature_set: the store's feature-set hash.
        shard: (i, n) or None.
        recomputed: subject -> why it was recomputed although stored (damaged rows, changed input).
        withdrawn: subject -> planes removed from the store: their input changed since they were
            cached and this run could not cache it again (the subject is among ``failures``).
        oblique: subject -> obliquity in degrees, for oblique volumes this run resliced or snapped.
        notes: warnings worth a line in the summary (e.g. the float16 -> float32 fallback).
    """

    store: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    slices: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    wait_seconds: float = 0.0
    store_seconds: float = 0.0
    feature_set: str = ""
    shard: tuple[int, int] | None = None
    recomputed: dict[str, str] = field(default_factory=dict)
    withdrawn: dict[str, list[str]] = field(default_factory=dict)
    oblique: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        rate = self.slices / self.seconds if self.seconds else 0.0
        shard = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard else ""
        lines = [f"{self.store}{shard}: feature set {self.feature_set}; {len(self.done)} subject(s) cached, "
                 f"{len(self.skipped)} already present, {len(self.failures)} failed; {self.slices} slices "
                 f"in {self.seconds:.1f} s ({rate:.1f} slices/s, encoder busy "
                 f"{100 * self.encode_seconds / max(self.seconds, 1e-9):.0f}%, waiting for volumes "
                 f"{self.wait_seconds:.1f} s, writing the store {self.store_seconds:.1f} s)"]
        recomputed = {sid: why for sid, why in self.recomputed.items() if sid not in self.withdrawn}
        if recomputed:
            lines.append(f"{len(recomputed)} stored subject(s) recomputed:")
            lines += [f"  {sid}: {why}" for sid, why in recomputed.items()]
        if self.withdrawn:
            lines.append(f"{len(self.withdrawn)} stored subject(s) removed from the store: their input changed and "
                         "caching it again failed (a rerun caches them once their input reads):")
            lines += [f"  {sid}: {self.recomputed.get(sid, 'input changed')}" for sid in self.withdrawn]
        if self.oblique:
            lines.append(f"{len(self.oblique)} oblique volume(s) handled: "
                         + ", ".join(f"{sid} ({deg:.1f} deg)" for sid, deg in self.oblique.items()))
        lines += [f"note: {note}" for note in self.notes]
        if self.failures:
            lines.append(f"{len(self.failures)} subject(s) failed:")
            lines += [f"  {f.subject_id}: {f.message}" for f in self.failures]
        return "\n".join(lines)


# -- packing and encoding ---------------------------------------------------------------------------
class _Pending:
    """One subject in flight: its slices wait in the packer, its outputs fill up per plane."""

    def __init__(self, item: VolumeItem, dim: int, token_shape: tuple[int, ...] | None) -> None:
        self.item = item
        self.remaining = sum(len(v[1]) for v in item.planes.values())
        self.features = {p: np.empty((len(v[1]), dim), np.float32) for p, v in item.planes.items()}
        self.tokens = ({p: np.empty((len(v[1]), *token_shape), np.float32) for p, v in item.planes.items()}
                       if token_shape else None)
        self.grid: tuple[int, int] | None = None
        self.error: str | None = None

    def result(self, labels: dict | None) -> SubjectFeatures:
        planes = {}
        for p, (_, indices, positions) in self.item.planes.items():
            planes[p] = PlaneFeatures(self.features[p], indices, positions,
                                      None if self.tokens is None else self.tokens[p], self.grid)
        return SubjectFeatures(self.item.subject_id, planes, labels, self.item.inputs)


class _Encoder:
    """Runs full batches through the encoder, one batch in flight (CUDA overlap), results to numpy."""

    def __init__(self, encoder: Any, device: torch.device, batch_size: int, tokens: bool) -> None:
        self.encoder = encoder
        self.device = device
        self.batch_size = batch_size
        self.tokens = tokens
        self.cuda = device.type == "cuda"
        self._buffers: list[torch.Tensor] = []
        self._next = 0
        self.seconds = 0.0

    def staging(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A (B, C, H, W) host buffer: pinned on CUDA, two of them alternating."""
        if not self._buffers or self._buffers[0].shape[1:] != shape[1:]:
            self._buffers = [torch.empty(shape, pin_memory=self.cuda) for _ in range(2 if self.cuda else 1)]
        buf = self._buffers[self._next % len(self._buffers)]
        self._next += 1
        return buf

    @torch.inference_mode()
    def submit(self, batch: torch.Tensor) -> tuple[Any, ...]:
        start = time.perf_counter()
        x = batch.to(self.device, non_blocking=True)
        features = self.encoder.encode(x)
        tokens = grid = None
        if self.tokens:
            tokens, grid = self.encoder.tokens(x)
        if self.cuda:  # start the device -> host copies; the caller waits only when it needs them
            features = _to_pinned_host(features)
            tokens = None if tokens is None else _to_pinned_host(tokens)
            event = torch.cuda.Event()
            # this device's stream: Event.record() takes the *current* device's, GPU 0 unless set, where
            # nothing of cuda:1's is queued, and wait() then read the pinned buffer mid-copy
            event.record(torch.cuda.current_stream(self.device))
        else:
            event = None
        self.seconds += time.perf_counter() - start
        return features, tokens, grid, event

    def wait(self, handle: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray | None, Any]:
        features, tokens, grid, event = handle
        start = time.perf_counter()
        if event is not None:
            event.synchronize()
        self.seconds += time.perf_counter() - start
        return (features.float().numpy(), None if tokens is None else tokens.float().numpy(), grid)


FLOAT16_MAX = 65504.0
#: a slice's feature vector may lose at most this fraction of its norm to float16 rounding (normal
#: float16 values lose ~5e-4; values below 6.1e-5 become subnormal or zero and lose far more)
FLOAT16_MAX_REL_ERROR = 1e-2


def float16_problem(x: np.ndarray, max_rows: int | None = None) -> str | None:
    """Why ``x`` (rows = slices or tokens, any trailing shape) cannot be stored as float16, or None.

    Overflow: any ``|x| > 65504`` (would become inf). Underflow: some row whose norm float16 changes
    by more than :data:`FLOAT16_MAX_REL_ERROR` (its values sit in the subnormal range or below, e.g.
    the ~1e-8 features of random-init MobileNetV2, which float16 stores as exact zeros). All-zero rows
    are fine. ``max_rows`` checks an evenly spaced subset of rows (token blocks are large).
    """
    if not x.size:
        return None
    rows = x.reshape(len(x), -1)
    if max_rows and len(rows) > max_rows:
        rows = rows[:: -(-len(rows) // max_rows)]
    row_peak = np.abs(rows).max(axis=1)
    peak = float(row_peak.max())
    if peak > FLOAT16_MAX:
        return f"overflow float16 (max |x| = {peak:.3g} > {FLOAT16_MAX:g})"
    # float16 errs by <= 2^-11 relative on normal values and <= 2^-25 absolute below 6.1e-5, so a row
    # whose largest value exceeds this bound loses < FLOAT16_MAX_REL_ERROR: only the others need the
    # exact round trip (keeps the check at one pass over a normal batch)
    bound = np.sqrt(rows.shape[1]) * 2.0 ** -25 / (FLOAT16_MAX_REL_ERROR - 2.0 ** -11)
    doubtful = rows[(row_peak < bound) & (row_peak > 0)]
    if len(doubtful):
        rounded = doubtful.astype(np.float16).astype(np.float32)
        worst = float((np.linalg.norm(doubtful - rounded, axis=1) / np.linalg.norm(doubtful, axis=1)).max())
        if worst > FLOAT16_MAX_REL_ERROR:
            return (f"underflow float16 (max |x| = {peak:.2g}; float16 changes a slice's feature vector by "
                    f"{100 * worst:.0f}%, values below 6.1e-05 lose precision or become 0)")
    return None


class _Precision:
    """The dtype a job stores, with the per-batch range checks behind it.

    A float16 job whose features do not fit float16 switches the feature set to float32 while that is
    still possible (nothing of this feature set stored yet); otherwise the batch's subjects fail with a
    one-line reason. Never silent zeros or inf.
    """

    def __init__(self, dtype: str, provenance: dict, can_switch: bool, report: "CacheReport") -> None:
        self.dtype = dtype
        self.provenance = provenance
        self.can_switch = can_switch
        self.report = report

    def committed(self) -> None:
        self.can_switch = False  # features are stored now: the dtype of the set is fixed

    def check(self, feats: np.ndarray, tokens: np.ndarray | None, placements: Sequence[tuple]) -> None:
        """Checks one encoded batch; marks its subjects failed when it cannot be stored."""
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            self._fail(placements, f"the encoder returned NaN/Inf features for {int(bad.sum())} slice(s)")
            return
        if self.dtype != "float16":
            return
        problem = float16_problem(feats) or (float16_problem(tokens, max_rows=8) if tokens is not None else None)
        if problem is None:
            return
        if self.can_switch:
            self.dtype = "float32"
            note = {"requested": "float16", "stored": "float32", "reason": f"features {problem}"}
            self.provenance["dtype"] = "float32"
            self.provenance["dtype_fallback"] = note
            self.report.feature_set = config_hash_of(self.provenance)
            message = (f"features {problem}: storing this feature set as float32 instead of float16 "
                       "(recorded in the provenance as dtype_fallback)")
            self.report.notes.append(message)
            log.warning("%s", message)
            return
        self._fail(placements, f"features {problem}; this store already holds float16 features of this "
                               "feature set: cache into a new store with --dtype float32")

    @staticmethod
    def _fail(placements: Sequence[tuple], message: str) -> None:
        for pending, *_ in placements:
            pending.error = message
        log.warning("%s: %s", sorted({p.item.subject_id for p, *_ in placements}), message)


def _to_pinned_host(x: torch.Tensor) -> torch.Tensor:
    """Asynchronous device -> host copy (only a pinned destination makes ``non_blocking`` real)."""
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


def _probe_shapes(encoder: Any, item: VolumeItem, device: torch.device, tokens: bool
                  ) -> tuple[int, tuple[int, ...] | None]:
    """Embedding dim and token shape (T, Dt), from one real slice (encoders may not know T)."""
    images = next(v[0] for v in item.planes.values() if len(v[1]))
    with torch.inference_mode():
        x = images[:1].to(device)
        dim = int(encoder.encode(x).shape[1])
        shape = tuple(encoder.tokens(x)[0].shape[1:]) if tokens else None
    return dim, shape


# -- the job ------------------------------------------------------------------------------------------
def _check_batch_memory(batch_size: int, slice_cfg: SliceConfig) -> None:
    """Refuses, before any subject is read, a batch of slices larger than the memory left.

    The batch is held at least twice on the host (packed slices and the encoder's input, pinned
    staging on GPU), three channels each; the encoder's activations come on top, so this catches the
    absurd (a 100000-pixel side failed every subject with the allocator's words), not the tight.
    """
    from slice2vol.data.io import _fmt_bytes, available_memory

    side = slice_cfg.size
    if side is None:
        return
    need = 2 * batch_size * 3 * max(1, slice_cfg.context) * side * side * 4
    free = available_memory()
    if free is not None and need > free:
        raise ValueError(f"batch_size {batch_size} at size {side}: one batch of slices needs {_fmt_bytes(need)} "
                         f"before the encoder's activations, and {_fmt_bytes(free)} is available; lower "
                         "--batch-size or --size")


def cache_cohort(
    cohort: Cohort,
    encoder_key: str | Any,
    store_path: str | Path,
    *,
    weights: str = "random",
    encoder_kwargs: Mapping[str, Any] | None = None,
    volume_cfg: VolumeConfig | None = None,
    slice_cfg: SliceConfig | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    reader: str = "auto",
    device: str = "cpu",
    shard: str | Sequence[int] | None = None,
    save_tokens: bool = False,
    progress: bool = True,
    dtype: str = "float16",
    amp: str | None = None,
    fold_bn: bool = True,
    commit_every: int = 8,
    commit_seconds: float = 120.0,
    compact: bool = True,
    seed: int = 0,
) -> CacheReport:
    """Embeds every slice of a cohort with a 2D encoder into a feature store, resumably.

    Args:
        cohort: subjects (and labels, stored with the features).
        encoder_key: registry key, e.g. ``timm/resnet18``, or an already built :class:`Encoder`.
        store_path: the store file; under sharding the shard's own file (see :func:`shard_path`).
        weights: ``random`` (seeded with ``seed``), ``hub[:tag]`` or a local checkpoint.
        encoder_kwargs: family options (``img_size``, ``pooling``, ...); part of the feature set.
        volume_cfg, slice_cfg: reading and slicing; part of the feature set (except ``planes``).
        batch_size: slices per forward pass, packed across volumes.
        num_workers: readers of volumes (read, slice, resize) working ahead of the encoder; 0: each
            volume is read in this process when the encoder needs it. The first volume is always read
            in this process while the readers start.
        reader: ``thread`` (threads of this process), ``process`` (DataLoader worker processes) or
            ``auto``: threads for a CPU encoder, processes on a GPU (see :func:`resolve_reader`).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (``cuda`` under torchrun uses ``LOCAL_RANK``).
        shard: ``"i/n"`` / (i, n); default: from torchrun (``RANK``/``WORLD_SIZE``), else no sharding
            (SLURM array variables are not read: pass ``--shard $SLURM_ARRAY_TASK_ID/N``).
        save_tokens: also store patch tokens (S, T, Dt) for dense probes (a second forward pass).
        progress: report subjects, slices/s and ETA (:mod:`slice2vol.progress`: a bar on a terminal,
            periodic log lines otherwise).
        dtype: ``float16`` (default, half the disk) or ``float32``. Every float16 batch is range-checked:
            features float16 cannot hold switch a new feature set to float32 (``report.notes``,
            provenance ``dtype_fallback``); a rerun with ``float16`` on such a store keeps float32.
        amp: ``bf16``/``fp16`` autocast on CUDA (part of the feature set).
        fold_bn: fold BatchNorm layers into the convolutions before them (:meth:`Encoder.fold_batchnorm`;
            features change by float rounding only, so it is not part of the feature set). Applies to an
            encoder built here from a key; an encoder object passed in is never restructured.
        commit_every, commit_seconds: completed subjects are committed (crash-safe) every this many
            subjects or seconds, whichever comes first; a kill loses at most that much work.
        compact: merge the committed parts into the main file at the end.
        seed: torch seed for ``random`` weights, so shards and reruns get the same network.

    Resuming: a (subject, plane) already in the store is skipped unless its rows fail their checksum
    or the subject's input files changed since they were cached (the stored fingerprint: size and
    mtime, then sha256 when those differ); such subjects are recomputed and listed in
    ``report.recomputed`` with the reason, and the new copy replaces the old one. A subject whose input
    changed and whose recompute fails loses its old copy (``report.withdrawn``): it describes the old
    input. A later run caches it like a new subject.

    Returns:
        A :class:`CacheReport`; ``report.ok`` is False when some subject failed.

    Raises:
        StoreMismatch: the store holds features of another feature set.
        StoreLocked: another process is writing the same store (a ``RuntimeError`` too).
    """
    from slice2vol.encoders import build_encoder

    t0 = time.perf_counter()
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 slice, got {batch_size}")
    volume_cfg = volume_cfg or VolumeConfig()
    slice_cfg = slice_cfg or SliceConfig()
    _check_batch_memory(int(batch_size), slice_cfg)
    encoder_kwargs = dict(encoder_kwargs or {})
    shard_ = parse_shard(shard) if shard is not None else shard_from_env()
    store_path = Path(store_path)
    if shard_ and shard_[1] > 1:
        store_path = shard_path(store_path, *shard_)
    subjects = shard_subjects(cohort.subjects, *shard_) if shard_ else list(cohort.subjects)
    probe = FeatureStore(store_path, mode="a")  # a link stands for its target: so do its lock and parts
    holder = probe.locked_by()
    if holder:  # fail before building the encoder; the lock itself is taken below
        raise StoreLocked(f"{probe.shown}: another process is writing this store ({holder}; lock {probe.lock_path}); "
                          "wait for it to finish, or give each job its own --store or --shard")
    report = CacheReport(store_path, shard=shard_, failures=list(cohort.failures))

    dev = torch.device(checked_device(device))
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.type == "cuda" and dev.index is not None:
        # every implicit CUDA call (streams, events, a library's own allocations) then goes to this
        # GPU, not to GPU 0 (a shard on cuda:1 also opened a context on GPU 0)
        torch.cuda.set_device(dev)
    reader_ = resolve_reader(reader, dev)
    if isinstance(encoder_key, str):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random weights must be identical across shards and reruns
            encoder = build_encoder(encoder_key, weights=weights, **encoder_kwargs)
        key = encoder_key
    else:
        encoder, key = encoder_key, encoder_key.info.key
    encoder.eval()
    if hasattr(encoder, "optimize"):
        # BatchNorm is folded only into an encoder built here: a caller's object may be trained later
        encoder.optimize(amp=amp if dev.type == "cuda" else None, fold_bn=fold_bn and isinstance(encoder_key, str))
    state_hash = state_sha256(encoder)  # of the weights as built: folding records it, so it is hashed once
    encoder.to(dev)
    provenance = feature_provenance(encoder, key, encoder_kwargs, volume_cfg, slice_cfg, dtype=dtype,
                                    tokens=save_tokens, amp=amp if dev.type == "cuda" else None,
                                    state_hash=state_hash)
    if isinstance(encoder_key, str) and provenance["weights"] == "random":
        provenance["encoder_kwargs"] = {**provenance["encoder_kwargs"], "random_seed": seed}
    report.feature_set = config_hash_of(provenance)

    store = FeatureStore(store_path, mode="a")
    with store.writer_lock():
        store.clean_tmp()
        store.refresh()
        store._tolerant = True  # inconsistent plane groups are recomputed, not fatal
        _adopt_dtype_fallback(store, provenance, dtype)
        report.feature_set = config_hash_of(provenance)
        store.check_identity(provenance)
        jobs, stale, orphaned = _resume_jobs(store, subjects, slice_cfg.planes, report)
        if report.skipped or report.recomputed:
            log.info("%s: %d subject(s) already cached, %d to do (%d recomputed)", store_path,
                     len(report.skipped), len(jobs), len(report.recomputed))
        labels = {s.subject_id: s.labels for s in cohort.subjects}
        # the fallback needs a store without feature rows: one whose earlier jobs cached nothing has a
        # feature set (their record) but no row stored in its dtype
        precision = _Precision(provenance["dtype"], provenance, can_switch=not store.holds_features, report=report)
        # with compaction, the last subjects are written with the job's record and compacted in one go
        held = _run_jobs(jobs, encoder, store, provenance, labels, dict(cohort.label_types), report,
                         volume_cfg=volume_cfg, slice_cfg=slice_cfg, batch_size=batch_size,
                         num_workers=num_workers, reader=reader_, device=dev, save_tokens=save_tokens,
                         progress=progress, precision=precision, commit_every=commit_every,
                         commit_seconds=commit_seconds, hold_last=compact)
        report.done.extend(s.subject_id for s in held)
        # rows made from an input that changed describe the old scan: when caching the new one failed
        # they go, in the part that records the failure, so aggregate, export and bench cannot take
        # them for it (a subject failed here was not committed: the job's subjects are done or failed)
        done = set(report.done)
        report.withdrawn = {sid: planes for sid, planes in stale.items() if sid not in done}
        for sid in report.withdrawn:
            log.warning("%s: its input changed and could not be cached again: its old features are removed from "
                        "%s", sid, store_path)
        for sid, planes in orphaned.items():
            log.warning("%s: its input changed: its stored %s features, which this job (--planes) does not compute, "
                        "are removed from %s; cache those planes again", sid, ", ".join(planes), store_path)
        invalidated = {sid: list(planes) for sid, planes in report.withdrawn.items()}
        for sid, planes in orphaned.items():
            invalidated.setdefault(sid, []).extend(p for p in planes if p not in invalidated[sid])
        report.seconds = time.perf_counter() - t0
        report.feature_set = config_hash_of(provenance)
        finished_before = any(e.get("event") == "cache" and e.get("shard") == (list(shard_) if shard_ else None)
                              for e in store.history)
        began = time.perf_counter()
        relabel = _changed_labels(store, labels, report.skipped)
        if relabel:
            log.info("%s: labels of %d already cached subject(s) updated from the manifest (e.g. %s)", store_path,
                     len(relabel), next(iter(relabel)))
        if not report.done and not invalidated and not relabel and store.exists() and finished_before:
            # nothing new: leave the main file alone
            if compact:  # (only finish a killed run's parts)
                store.compact(drop_broken=True)
            store.close()
            report.store_seconds += time.perf_counter() - began
            return report
        event = {k: v for k, v in run_context().items() if k != "versions"}
        event.update(event="cache", shard=list(shard_) if shard_ else None, done=len(report.done),
                     skipped=len(report.skipped), slices=report.slices, seconds=round(report.seconds, 1),
                     failures=[{"subject_id": f.subject_id, "message": f.message} for f in report.failures],
                     recomputed=dict(report.recomputed), withdrawn=dict(report.withdrawn), voided_planes=dict(orphaned),
                     oblique=dict(report.oblique))
        if provenance.get("dtype_fallback"):
            event["dtype_fallback"] = provenance["dtype_fallback"]
        if relabel:
            event["relabelled"] = sorted(relabel)
            # the manifest says what the labels are now: a skipped subject kept those of its first
            # caching, and a later aggregate --label or index took them (fuzz round 16)
            store._commit_part(provenance=provenance, labels=(relabel, dict(cohort.label_types)))
        if compact:
            store.compact(history=[event], provenance=provenance, drop_broken=True, subjects=held,
                          dtype=precision.dtype, label_types=dict(cohort.label_types), invalidated=invalidated)
        else:
            store._commit_part(provenance=provenance, history=[event], invalidated=invalidated)
    store.close()
    report.store_seconds += time.perf_counter() - began
    report.seconds = time.perf_counter() - t0
    return report


def _adopt_dtype_fallback(store: FeatureStore, provenance: dict, dtype: str) -> None:
    """A float16 job on a store that an earlier float16 job had to switch to float32 stays float32."""
    if dtype != "float16" or not store.exists() or not store.feature_set:
        return
    stored = store.provenance
    if stored.get("dtype") == "float32" and stored.get("dtype_fallback"):
        candidate = {**provenance, "dtype": "float32", "dtype_fallback": stored["dtype_fallback"]}
        if config_hash_of(candidate) == store.feature_set:
            provenance.update(candidate)


def _changed_labels(store: FeatureStore, labels: Mapping[str, Mapping[str, Any]], subjects: Sequence[str]
                    ) -> dict[str, Mapping[str, Any]]:
    """subject -> its manifest labels, for the ``subjects`` whose stored labels differ (a value or a
    column changed in the manifest since they were cached); compared as stored JSON (NaN equals NaN)."""
    if not subjects or not store.exists():
        return {}
    from slice2vol.cache import _dumps  # the store's own encoding (numpy scalars as numbers)

    stored, _ = store._labels_merged()
    return {sid: labels[sid] for sid in subjects
            if sid in labels and _dumps(dict(labels[sid])) != _dumps(stored.get(sid))}


def _resume_jobs(store: FeatureStore, subjects: Sequence[Subject], planes: Sequence[str], report: CacheReport
                 ) -> tuple[list[tuple[Subject, tuple[str, ...]]], dict[str, list[str]], dict[str, list[str]]]:
    """(subject, planes to compute) for every subject not validly cached; subject -> stored planes of
    this job whose input changed since; subject -> stored planes *outside* this job (``--planes``)
    whose input changed (void whatever happens). Fills skipped/recomputed.

    A stored (subject, plane) is valid when its rows match their checksums and the subject's input
    files match the stored fingerprint. Checking the checksums reads the subjects' rows once.
    """
    stale: dict[str, list[str]] = {}
    orphaned: dict[str, list[str]] = {}
    if not store.exists():
        return [(s, tuple(planes)) for s in subjects], stale, orphaned
    for broken in store.broken:
        log.warning("%s; its subjects are recomputed", broken)
    ids = [s.subject_id for s in subjects]
    cached = [p for p in planes if p in store.planes]
    damaged = {(sid, plane): why for sid, plane, why in
               store.verify(ids, cached).damaged} if cached else {}
    jobs: list[tuple[Subject, tuple[str, ...]]] = []
    outside = [p for p in store.planes if p not in planes]
    for subject in subjects:
        sid = subject.subject_id
        todo: list[str] = []
        reasons: list[str] = []
        changed: list[str] | None = None
        for plane in planes:
            if not store.has(sid, plane):
                todo.append(plane)
                continue
            if (sid, plane) in damaged:
                todo.append(plane)
                reasons.append(f"stored {plane} rows are damaged ({damaged[sid, plane]})")
                continue
            stored = store.subject_inputs(sid, plane)
            if stored and stored.get("files"):
                if changed is None:
                    changed = fingerprint_changes(stored["files"], subject.images)
                if changed:
                    todo.append(plane)
                    stale.setdefault(sid, []).append(plane)
        # planes this job does not compute (--planes) but the store holds: made from the same input
        others = [p for p in outside if store.has(sid, p)]
        if others and changed is None:
            stored = store.subject_inputs(sid, others[0])
            if stored and stored.get("files"):
                changed = fingerprint_changes(stored["files"], subject.images)
        if changed and others:
            # they describe the old scan beside this job's new planes (a fusion would mix both): void,
            # whatever this job's outcome; a job over those planes caches them again
            orphaned[sid] = others
        if changed:
            reasons.insert(0, f"input changed since it was cached ({'; '.join(changed)})")
        if reasons:
            report.recomputed[sid] = "; ".join(reasons)
            log.warning("%s: %s; recomputing", sid, report.recomputed[sid])
        if todo:
            jobs.append((subject, tuple(todo)))
        else:
            report.skipped.append(sid)
    return jobs, stale, orphaned


READERS = ("auto", "thread", "process")


def resolve_reader(reader: str, device: torch.device) -> str:
    """``auto`` -> ``thread`` for an encoder on the CPU, ``process`` on an accelerator.

    On the CPU the encoder's intra-op threads already use every core, so a volume read costs the
    same CPU time wherever it runs; a thread of this process reads without a fork (whose
    copy-on-write and page faults the encoder pays) and without a shared-memory copy of every
    volume's slices. Numpy, zlib and torch release the GIL while they work, so the encoder's Python
    between operators waits milliseconds per volume at most. On a GPU the encoder outruns one
    reader, and processes read in parallel without sharing the GIL.
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    if reader == "auto":
        return "thread" if device.type == "cpu" else "process"
    return reader


class _VolumeItems:
    """The jobs' :class:`VolumeItem` in job order, read ahead of the encoder.

    This process always reads the first volume itself while the readers start on the rest: the
    encoder then waits for one read by its own threads instead of a worker's start-up plus its read
    (0.08 s against 0.19 s for an IXI volume on 2 cores). The rest is read by ``num_workers``
    threads of this process (``reader="thread"``, up to two volumes per thread ahead) or DataLoader
    processes (``"process"``, prefetch 2 each); with ``num_workers=0`` each volume is read here when
    the encoder needs it. Before processes fork, the heap's free pages go back to the kernel
    (:func:`slice2vol.runtime.release_free_heap`): in a process whose encoder has run already (a
    notebook, ``slice2vol bench``, a second job) they would otherwise become copy-on-write and cost
    the encoder an expensive fault per page of its next batch.
    """

    def __init__(self, jobs: Sequence[tuple[Subject, tuple[str, ...]]], volume_cfg: VolumeConfig,
                 slice_cfg: SliceConfig, num_workers: int, reader: str = "thread") -> None:
        self.first = VolumeSlicesDataset(jobs[:1], volume_cfg, slice_cfg)
        self.rest = VolumeSlicesDataset(jobs[1:], volume_cfg, slice_cfg)
        self.loader_iter = None
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[Future] = deque()
        self.submitted = 0
        workers = min(max(int(num_workers), 0), len(self.rest))
        if not workers:
            return
        if reader == "thread":
            # one intra-op thread per reader: its resizes must not start a second OpenMP team that
            # competes with the encoder's (0.948 -> 0.964 of the bare forward in bench_cache, stride 2)
            self.threads = torch.get_num_threads()
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="slice2vol-reader",
                                           initializer=one_intra_op_thread)
            self.ahead = 2 * workers
            self._submit()  # the readers start now, while this thread reads the first volume
            return
        # workers fork from this process: what it has imported they need not import again before their
        # first volume (scipy.ndimage alone is ~0.2 s)
        import nibabel  # noqa: F401
        import scipy.ndimage  # noqa: F401

        release_free_heap()
        loader = torch.utils.data.DataLoader(
            self.rest, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
            prefetch_factor=2, persistent_workers=False,
        )
        self.loader_iter = iter(loader)  # forks now; the workers read while this process reads the first

    def _submit(self) -> None:
        while self.submitted < len(self.rest) and len(self.pending) < self.ahead:
            self.pending.append(self.pool.submit(self.rest.__getitem__, self.submitted))  # type: ignore[union-attr]
            self.submitted += 1

    def __iter__(self) -> Iterator[VolumeItem]:
        if len(self.first):
            # beside reader threads, one intra-op thread: otherwise this read's OpenMP team spins
            # between its operators against the reader on the other core (first volume 0.12 -> 0.06 s
            # after an encode, 2 cores, IXI at stride 4)
            with torch_threads(1 if self.pool is not None else None):
                item = self.first[0]
            yield item
        if self.pool is not None:
            while self.pending:
                item = self.pending.popleft().result()  # an unexpected reader exception is raised here
                self._submit()
                yield item
        elif self.loader_iter is not None:
            yield from self.loader_iter
        else:
            yield from (self.rest[i] for i in range(len(self.rest)))

    def close(self) -> None:
        """Stops the readers (also after an exception halfway through); waits for a read under way."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            self.pending.clear()
            # the readers' set_num_threads(1) also set the count that threads started later begin with
            torch.set_num_threads(self.threads)
        if self.loader_iter is not None:
            shutdown = getattr(self.loader_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self.loader_iter = None


def _run_jobs(jobs, encoder, store: FeatureStore, provenance: dict, labels: dict, label_types: dict,
              report: CacheReport, *, volume_cfg, slice_cfg, batch_size: int, num_workers: int, reader: str,
              device: torch.device, save_tokens: bool, progress: bool, precision: "_Precision", commit_every: int,
              commit_seconds: float, hold_last: bool = False) -> list[SubjectFeatures]:
    """Main loop: load (workers) -> pack -> encode -> scatter -> commit; ``precision`` checks each batch.

    Returns:
        With ``hold_last``, the subjects completed since the last commit, for the caller to write
        (with the job's record, in the part it compacts); otherwise they are committed here and the
        list is empty. On an exception everything completed is committed before it propagates.
    """
    if not jobs:
        return []
    runner = _Encoder(encoder, device, batch_size, save_tokens)
    bar = progress_bar(len(jobs), desc=f"cache {provenance['encoder']}", unit="subj", enabled=progress)
    queue: deque[tuple[_Pending, str, int]] = deque()  # (subject, plane, first slice not yet batched)
    queued = 0  # slices waiting in `queue`
    completed: list[SubjectFeatures] = []
    last_commit = time.perf_counter()
    shapes: tuple[int, tuple[int, ...] | None] | None = None
    in_flight: tuple[tuple[Any, ...], list[tuple[_Pending, str, int, int]]] | None = None
    start = time.perf_counter()

    def commit(force: bool = False) -> None:
        nonlocal completed, last_commit
        if completed and (force or len(completed) >= commit_every
                          or time.perf_counter() - last_commit >= commit_seconds):
            began = time.perf_counter()
            store.commit_subjects(completed, provenance, dtype=precision.dtype, label_types=label_types)
            report.store_seconds += time.perf_counter() - began
            precision.committed()
            report.done.extend(s.subject_id for s in completed)
            log.debug("committed %d subject(s)", len(completed))
            completed, last_commit = [], time.perf_counter()

    def finish(pending: _Pending) -> None:
        if pending.error:
            report.failures.append(Failure(pending.item.subject_id, pending.item.path, pending.error))
        else:
            completed.append(pending.result(labels.get(pending.item.subject_id)))
            oblique = (pending.item.inputs or {}).get("oblique") or {}
            if oblique.get("action", "none") != "none":
                report.oblique[pending.item.subject_id] = float(oblique.get("degrees", 0.0))
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"slices/s={report.slices / max(elapsed, 1e-9):.1f}, failed={len(report.failures)}")
        commit()

    def collect(flight) -> None:
        handle, placements = flight
        feats, toks, grid = runner.wait(handle)
        if feats.shape[1] != placements[0][0].features[placements[0][1]].shape[1]:
            raise RuntimeError(f"{provenance['encoder']}: encode returned {feats.shape[1]} features, "
                               f"its EncoderInfo says embed_dim={encoder.info.embed_dim}")
        precision.check(feats, toks, placements)
        at = 0
        for pending, plane, lo, hi in placements:
            n = hi - lo
            pending.features[plane][lo:hi] = feats[at:at + n]
            if toks is not None:
                pending.tokens[plane][lo:hi] = toks[at:at + n]  # type: ignore[index]
                pending.grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
            at += n
            pending.remaining -= n
            if pending.remaining == 0:
                finish(pending)
        report.slices += at

    def launch(n: int) -> None:
        """Packs the next n queued slices into one batch and submits it."""
        nonlocal queued, in_flight
        first = queue[0][0].item.planes[queue[0][1]][0]
        buf = runner.staging((n, *first.shape[1:]))
        placements = []
        filled = 0
        while filled < n:
            pending, plane, lo = queue[0]
            images = pending.item.planes[plane][0]
            take = min(n - filled, len(images) - lo)
            buf[filled:filled + take].copy_(images[lo:lo + take])
            placements.append((pending, plane, lo, lo + take))
            filled += take
            if lo + take == len(images):
                queue.popleft()
            else:
                queue[0] = (pending, plane, lo + take)
        queued -= n
        handle = runner.submit(buf[:n])
        if in_flight is not None:  # the previous batch ran while this one was packed
            collect(in_flight)
        in_flight = (handle, placements)

    items = _VolumeItems(jobs, volume_cfg, slice_cfg, num_workers, reader)

    def arriving() -> Iterator[VolumeItem]:
        """The items, adding the time spent waiting for each to ``report.wait_seconds``."""
        stream = iter(items)
        while True:
            began = time.perf_counter()
            item = next(stream, None)
            report.wait_seconds += time.perf_counter() - began
            if item is None:
                return
            yield item

    try:
        for item in arriving():
            if item.error:
                report.failures.append(Failure(item.subject_id, item.path, item.error))
                bar.update(1)
                continue
            if shapes is None and any(len(v[1]) for v in item.planes.values()):
                # the token shape (T, Dt) is only known from a forward pass; D is in the encoder info
                shapes = (_probe_shapes(encoder, item, device, save_tokens) if save_tokens
                          else (int(encoder.info.embed_dim), None))
            pending = _Pending(item, shapes[0] if shapes else int(encoder.info.embed_dim),
                               shapes[1] if shapes else None)
            if pending.remaining == 0:  # no slice passed min_foreground: an empty but complete subject
                finish(pending)
                continue
            for plane, (_, indices, _) in item.planes.items():
                if len(indices):
                    queue.append((pending, plane, 0))
                    queued += len(indices)
            while queued >= batch_size:
                launch(batch_size)
        if queued:
            launch(queued)
        if in_flight is not None:
            collect(in_flight)
            in_flight = None
        if hold_last:
            return completed
        commit(force=True)
        return []
    except BaseException:
        # an exception (out of memory, Ctrl-C): keep what is complete, then let it propagate
        try:
            commit(force=True)
        except Exception as err:  # noqa: BLE001 - the original error matters more
            log.error("could not commit the completed subjects either: %s", " ".join(str(err).split()))
        raise
    finally:
        items.close()
        report.encode_seconds += runner.seconds
        bar.close()
