"""Streaming SSL data for real cohorts: volumes prepared once to per-subject HDF5 files, read crop by crop.

Memory stays flat in the cohort size: preparation holds one volume at a time, and training reads
only the voxels of the crops (or slices) it needs from chunked HDF5 datasets — nothing of the
cohort is kept in memory but a few open file handles.

Layout (``<cache_dir>/<prep key>/``, the key hashes everything that shapes a prepared volume):

* ``<subject>.h5``: ``image`` (C, X, Y, Z) chunked, ``mask`` (X, Y, Z) uint8 chunked, and per plane
  ``fg_<plane>`` (n_slices,) float32, the head fraction of each slice; attribute ``fingerprint``
  (source paths, sizes and mtimes) so a changed file is prepared again;
* ``failures.json``: subjects that could not be loaded, with the one-line reason.

Files are written to a temporary name and renamed, so a killed preparation leaves only complete
files; a rerun prepares what is missing. Under DDP each rank prepares its share of the subjects
(``cache_dir`` must then be on a file system every rank sees).

Sampling is keyed: :class:`SeededSamples` turns a global sample number into (subject, crop) with a
generator seeded from (seed, number), and :class:`StepBatches` hands each rank its numbers for each
step, so the global batch of a step is the same for any world size, worker count or restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from slice2vol.config import config_hash, to_dict
from slice2vol.data.manifest import Cohort, Failure, load_subject
from slice2vol.data.slicing import PLANES, _plane_view, plane_foreground
from slice2vol.ssl.data import prepare_volume

log = logging.getLogger(__name__)

PREP_VERSION = 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike ``hash``)."""
    blob = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def prep_key(data_cfg) -> str:
    """Hash of what shapes a prepared volume: volume config, grid, storage dtype, format version."""
    return config_hash({"volume": to_dict(data_cfg.volume), "volume_size": data_cfg.volume_size,
                        "dtype": data_cfg.cache_dtype, "version": PREP_VERSION})


def _safe_name(subject_id: str) -> str:
    """A file name for a subject ID (IDs may hold '/', spaces...); a short hash keeps it unique."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", subject_id)[:80]
    return f"{stem}-{hashlib.sha1(subject_id.encode()).hexdigest()[:8]}.h5"


def fingerprint(subject) -> str:
    """Source files of a subject with their sizes and modification times (JSON)."""
    parts = []
    for name, path in sorted(subject.images.items()):
        try:
            st = os.stat(path)
            parts.append([name, str(path), st.st_size, st.st_mtime_ns])
        except OSError:
            parts.append([name, str(path), None, None])
    return json.dumps(parts)


def _chunks(shape: Sequence[int], side: int = 32) -> tuple[int, ...]:
    return tuple(min(n, side) for n in shape)


def write_prepared(path: Path, image: torch.Tensor, mask: torch.Tensor, dtype: str, fp: str) -> None:
    """Writes one prepared subject atomically (temporary file renamed over ``path``)."""
    import h5py

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    arr = image.to(getattr(torch, dtype)).numpy()
    m = mask.numpy().astype(np.uint8)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=arr, chunks=(arr.shape[0], *_chunks(arr.shape[1:])))
        f.create_dataset("mask", data=m, chunks=_chunks(m.shape))
        for plane in PLANES:
            f.create_dataset(f"fg_{plane}", data=plane_foreground(mask, plane))
        f.attrs["fingerprint"] = fp
        f.attrs["version"] = PREP_VERSION
    os.replace(tmp, path)


def _is_current(path: Path, fp: str) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("fingerprint") == fp and "fg_axial" in f
    except OSError:  # truncated or unreadable: prepare again
        return False


@dataclass
class PrepareReport:
    """What :func:`prepare_cohort` did on this rank."""

    directory: Path
    prepared: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def prepare_cohort(cohort: Cohort, data_cfg, cache_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> PrepareReport:
    """Prepares this rank's share of the subjects (``subjects[rank::world_size]``) that are missing or stale.

    Args:
        cohort: subjects to prepare.
        data_cfg: :class:`~slice2vol.ssl.config.DataConfig` (volume config, grid, dtype).
        cache_dir: root folder; files go to ``cache_dir/<prep_key(data_cfg)>/``.
        rank, world_size: the share of this process.

    Returns:
        A :class:`PrepareReport`; subjects that fail to load are recorded, not raised.
    """
    from slice2vol.progress import track

    directory = Path(cache_dir) / prep_key(data_cfg)
    directory.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(directory)
    mine = cohort.subjects[rank::world_size]
    for subject in track(mine, desc="preparing volumes", unit="subj", enabled=progress):
        path = directory / _safe_name(subject.subject_id)
        fp = fingerprint(subject)
        if path.exists() and _is_current(path, fp):
            report.reused.append(subject.subject_id)
            continue
        try:
            volume = load_subject(subject, data_cfg.volume, with_seg=False)
        except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
            report.failures.append(Failure.of(subject, err))
            log.warning("skipping %s", report.failures[-1].message)
            continue
        image, mask = prepare_volume(volume, data_cfg.volume_size)
        write_prepared(path, image, mask, data_cfg.cache_dtype, fp)
        report.prepared.append(subject.subject_id)
    part = directory / f"failures-{rank:05d}-of-{world_size:05d}.json"
    part.write_text(json.dumps([[f.subject_id, str(f.path), f.message] for f in report.failures]))
    return report


def collect_failures(directory: Path, world_size: int) -> list[Failure]:
    """Failures recorded by every rank of the last preparation with ``world_size`` processes."""
    out = []
    for rank in range(world_size):
        part = directory / f"failures-{rank:05d}-of-{world_size:05d}.json"
        if part.exists():
            out += [Failure(sid, path, message) for sid, path, message in json.loads(part.read_text())]
    return out


class PreparedVolumes:
    """A volume source reading prepared subjects from their HDF5 files (see the module docstring).

    Files are opened lazily and kept in a small per-process LRU, so the object can be handed to
    DataLoader workers (each opens its own handles after the fork).

    Args:
        directory: ``cache_dir/<prep key>``.
        ids: subjects to serve, in order (each must have a prepared file).
        max_open: open files kept per process.
    """

    def __init__(self, directory: str | Path, ids: Sequence[str], max_open: int = 16,
                 failures: Sequence[Failure] = ()) -> None:
        self.directory = Path(directory)
        self.ids = list(ids)
        self.failures = list(failures)
        self.paths = [self.directory / _safe_name(s) for s in self.ids]
        missing = [s for s, p in zip(self.ids, self.paths) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.directory}: {len(missing)} subject(s) not prepared, e.g. {missing[:3]}")
        if not self.ids:
            raise ValueError(f"{self.directory}: no prepared subject to train on")
        self.max_open = max_open
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._channels: int | None = None
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # h5py handles do not cross processes
        return state

    def _file(self, i: int):
        import h5py

        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        f = self._open.get(i)
        if f is None:
            f = h5py.File(self.paths[i], "r")
            self._open[i] = f
            if len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
        else:
            self._open.move_to_end(i)
        return f

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    @property
    def in_channels(self) -> int:
        if self._channels is None:
            self._channels = int(self._file(0)["image"].shape[0])
        return self._channels

    def shape(self, i: int) -> tuple[int, ...]:
        if i not in self._shapes:
            self._shapes[i] = tuple(int(n) for n in self._file(i)["image"].shape[1:])
        return self._shapes[i]

    def read_image(self, i: int, box: tuple[slice, ...]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._file(i)["image"][(slice(None), *box)], dtype=np.float32))

    def read_mask(self, i: int, box: tuple[slice, ...]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._file(i)["mask"][box]).astype(bool))

    def read_slice(self, i: int, plane: str, index: int) -> torch.Tensor:
        axis = PLANES[plane]
        box = [slice(None)] * 3
        box[axis] = slice(index, index + 1)
        slab = torch.from_numpy(np.asarray(self._file(i)["image"][(slice(None), *box)], dtype=np.float32))
        return _plane_view(slab, plane)[:, 0]

    def slice_foreground(self, i: int, plane: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._file(i)[f"fg_{plane}"]))


class SeededSamples(torch.utils.data.Dataset):
    """Map-style dataset: global sample number -> one training sample, reproducibly.

    With ``k = sampler.per_subject`` (1 unless ``data.crops_per_subject`` says otherwise), samples
    ``g`` with the same ``g // k`` share a subject: slot ``g // k`` belongs to epoch ``slot // N``
    (N subjects) and takes position ``slot % N`` of that epoch's permutation (every subject once per
    epoch); each crop/slice is drawn by a generator seeded from ``(seed, g)``, so the ``k`` samples of
    a subject are different crops of it.

    Args:
        sampler: a :class:`~slice2vol.ssl.data.CropDataset` or ``SliceDataset`` (``draw(i, generator)``).
        seed: the run's seed.
    """

    def __init__(self, sampler, seed: int) -> None:
        self.sampler, self.seed = sampler, int(seed)
        self._epoch: tuple[int, list[int]] | None = None

    def subject_of(self, g: int) -> int:
        n = len(self.sampler.bank)
        slot = g // getattr(self.sampler, "per_subject", 1)
        epoch = slot // n
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, -1, epoch))
            self._epoch = (epoch, torch.randperm(n, generator=gen).tolist())
        return self._epoch[1][slot % n]

    def __getitem__(self, g: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, g))
        return self.sampler.draw(self.subject_of(g), gen)


class StepBatches(torch.utils.data.Sampler):
    """The sample numbers of this rank's micro-batches for steps ``start_step .. end_step - 1``.

    Step ``s``, micro-batch ``a``, rank ``r``, position ``j``:
    ``g = ((s * accumulate + a) * world_size + r) * batch_size + j``; the global batch of a step is
    therefore the same set of samples for any ``world_size`` with the same global batch.
    """

    def __init__(self, start_step: int, end_step: int, batch_size: int, accumulate: int = 1, rank: int = 0,
                 world_size: int = 1) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("accumulate", accumulate, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if value < low:  # accumulate 0 yielded nothing: a training loop waited for ever
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        self.start_step, self.end_step = start_step, end_step
        self.batch_size, self.accumulate, self.rank, self.world_size = batch_size, accumulate, rank, world_size

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for s in range(self.start_step, self.end_step):
            for a in range(self.accumulate):
                first = ((s * self.accumulate + a) * self.world_size + self.rank) * b
                yield list(range(first, first + b))


def _worker_init(_: int) -> None:
    # one intra-op thread per loader process: the workers must not fight the training threads
    torch.set_num_threads(1)


def make_loader(sampler, seed: int, start_step: int, end_step: int, batch_size: int, *, accumulate: int = 1,
                rank: int = 0, world_size: int = 1, num_workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's micro-batches (B, C, *size) in step order."""
    batches = StepBatches(start_step, end_step, batch_size, accumulate, rank, world_size)
    kwargs = {}
    if num_workers > 0:
        kwargs = {"worker_init_fn": _worker_init, "persistent_workers": False, "prefetch_factor": 4}
    return torch.utils.data.DataLoader(SeededSamples(sampler, seed), batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=pin_memory, **kwargs)
