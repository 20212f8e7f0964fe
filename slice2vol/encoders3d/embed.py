"""Embedding a cohort with a 3D encoder into a feature store (one vector per subject).

:func:`embed_cohort3d` loads every subject as the encoder asks (:meth:`Encoder3D.volume_config`: raw
intensities in RAS), embeds it (whole volume or sliding windows) and writes one set of volume
embeddings with :meth:`slice2vol.cache.FeatureStore.write_volume_embeddings`, where the benchmark reads
it like aggregated 2D features. The set's provenance is the encoder's :class:`Encoder3DInfo` (key,
weights, sha256 of the weights file and of the loaded parameters, the authors' preprocessing) plus the
embedding options and the per-volume time.

A subject that fails (unreadable file, a volume the network cannot take) is recorded in
``report.failures`` and the others go on. Finished rows are kept every ``commit_every`` subjects in a
side file ``<store>.<set>.partial.npz`` (plain arrays and a JSON string, no pickle), so a killed job
resumes where it stopped when run again with the same encoder and options; the file is removed once
the set is written.
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

from slice2vol.data.io import VolumeConfig
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
        done: subjects embedded (in cohort order).
        failures: subjects that could not be embedded, with the reason.
        embed_dim: D.
        resumed: subjects taken over from an interrupted run.
        seconds_per_volume: mean embedding time per volume (preprocess + network), loading excluded.
        load_seconds_per_volume: mean loading time per volume.
    """

    name: str
    store: Path
    done: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    embed_dim: int = 0
    resumed: int = 0
    seconds_per_volume: float = 0.0
    load_seconds_per_volume: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        line = (f"{self.store}: wrote {self.name!r}, {len(self.done)} subjects x {self.embed_dim} "
                f"({self.seconds_per_volume:.2f} s/volume")
        line += f", {self.resumed} resumed)" if self.resumed else ")"
        return "\n".join([line] + [f"  failed: {f}" for f in self.failures])


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of the loaded parameters and buffers (the 2D caching job's definition)."""
    from slice2vol.encoders.base import state_sha256 as _state_sha256

    return _state_sha256(module)


def embedding_provenance(encoder: Encoder3D, window: SlidingWindow | None, volume_cfg: VolumeConfig,
                         state_hash: str | None = None) -> dict[str, Any]:
    """What identifies a 3D embedding set: encoder, weights (file and loaded parameters), options."""
    from slice2vol.config import to_dict

    info = encoder.info
    return {
        "kind": "native-3d", "encoder": info.key, "encoder_key": info.key, "weights": info.weights,
        "weights_sha256": info.weights_sha256, "state_sha256": state_hash or state_sha256(encoder),
        "encoder_info": info.to_dict(), "embed_dim": int(info.embed_dim),
        "mode": "sliding" if window is not None else "whole",
        "sliding_window": None if window is None else {**asdict(window), "roi_size": list(
            window.roi_size or info.input_size or [])},
        "volume_config": to_dict(volume_cfg),
    }


def partial_path(store_path: str | Path, name: str) -> Path:
    store_path = Path(store_path)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return store_path.with_name(f"{store_path.name}.{safe}.partial.npz")


def _identity(prov: Mapping[str, Any]) -> str:
    return json.dumps(prov, sort_keys=True, default=str)


def _load_partial(path: Path, identity: str) -> tuple[list[str], list[np.ndarray]]:
    if not path.exists():
        return [], []
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["identity"]) != identity:
                log.warning("%s: made with another encoder or options; starting again", path)
                return [], []
            return [str(i) for i in data["ids"]], list(np.asarray(data["X"], dtype=np.float32))
    except (OSError, KeyError, ValueError) as err:
        log.warning("%s: unreadable partial embeddings (%s); starting again", path, err)
        return [], []


def _save_partial(path: Path, identity: str, ids: list[str], rows: list[np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, dtype=str), X=np.stack(rows).astype(np.float32), identity=np.asarray(identity))
    tmp.replace(path)


def embed_cohort3d(encoder: Encoder3D, cohort: Cohort, store_path: str | Path, set_name: str, *,
                   progress: bool = True, sliding_window: SlidingWindow | Mapping | bool | None = None,
                   volume_config: VolumeConfig | None = None, write_labels: bool = True,
                   provenance: Mapping[str, Any] | None = None, commit_every: int = 8,
                   resume: bool = True) -> Embed3DReport:
    """Embeds every subject of ``cohort`` and writes the set ``set_name`` into the store.

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
        commit_every: keep finished rows in the partial file every N subjects (0: never).
        resume: take over the rows of an interrupted run with the same encoder and options.

    Returns:
        :class:`Embed3DReport`.

    Raises:
        ValueError: no subject could be embedded (the store is left unchanged).
    """
    from slice2vol.cache import FeatureStore
    from slice2vol.progress import track

    window = SlidingWindow.parse(sliding_window)
    volume_cfg = volume_config or encoder.volume_config()
    encoder = encoder.eval()
    prov = embedding_provenance(encoder, window, volume_cfg)
    identity = _identity({**prov, "subjects": cohort.ids})
    side = partial_path(store_path, set_name)
    report = Embed3DReport(set_name, Path(store_path), embed_dim=int(encoder.info.embed_dim))
    done: dict[str, np.ndarray] = {}
    if resume:
        ids, rows = _load_partial(side, identity)
        done = dict(zip(ids, rows))
        report.resumed = len(done)
    embed_s, load_s, n_new = 0.0, 0.0, 0
    todo = [s for s in cohort.subjects if s.subject_id not in done]
    since_commit = 0
    for subject in track(todo, desc=f"embed {set_name}", unit="vol", enabled=progress):
        t0 = time.perf_counter()
        try:
            volume = load_subject(subject, volume_cfg, with_seg=False)
        except Exception as err:  # noqa: BLE001 - whatever one subject's files raise fails that subject only
            report.failures.append(Failure.of(subject, err))
            log.warning("skipping %s", report.failures[-1].message)
            continue
        t1 = time.perf_counter()
        try:
            x = encoder.embed_volume(volume, window).numpy().astype(np.float32)
        except (ValueError, RuntimeError) as err:  # e.g. a volume too small for the network
            message = " ".join(str(err).split())[:300]
            source = subject.images[next(iter(subject.images))] if subject.images else ""
            report.failures.append(Failure(subject.subject_id, str(source), f"{source}: {message}"))
            log.warning("%s: embedding failed: %s", subject.subject_id, message)
            continue
        if not np.isfinite(x).all():
            report.failures.append(Failure(subject.subject_id, "", f"{subject.subject_id}: non-finite embedding"))
            continue
        load_s += t1 - t0
        embed_s += time.perf_counter() - t1
        n_new += 1
        done[subject.subject_id] = x
        since_commit += 1
        if commit_every and since_commit >= commit_every:
            order = [s.subject_id for s in cohort.subjects if s.subject_id in done]
            _save_partial(side, identity, order, [done[i] for i in order])
            since_commit = 0
    if not done:
        raise ValueError(f"{cohort.source or 'cohort'}: no subject could be embedded with {encoder.info.key} "
                         f"({len(report.failures)} failures; first: {report.failures[0] if report.failures else '-'})")
    report.done = [s.subject_id for s in cohort.subjects if s.subject_id in done]
    X = np.stack([done[i] for i in report.done]).astype(np.float32)
    report.embed_dim = int(X.shape[1])
    report.seconds_per_volume = embed_s / max(n_new, 1)
    report.load_seconds_per_volume = load_s / max(n_new, 1)
    full = {**prov, "n_failures": len(report.failures), "failures": [str(f) for f in report.failures],
            "seconds_per_volume": round(report.seconds_per_volume, 4),
            "load_seconds_per_volume": round(report.load_seconds_per_volume, 4),
            "device": str(encoder.device), "torch_threads": torch.get_num_threads(), **dict(provenance or {})}
    store = FeatureStore(store_path, mode="a")
    if write_labels and cohort.label_types:
        wanted = set(report.done)
        store.write_labels({s.subject_id: dict(s.labels) for s in cohort.subjects if s.subject_id in wanted},
                           dict(cohort.label_types))
    store.write_volume_embeddings(set_name, report.done, X, full)
    side.unlink(missing_ok=True)
    return report
