"""Volume embeddings of a native-3D encoder, written into the feature store like any other set.

Two ways to embed a volume (loaded with the training run's volume config when known):

* ``whole``: the head, cropped to its bounding box, is fitted (aspect ratio kept, zero-padded) into
  ``input_size`` and encoded in one pass — what a CNN trained on crops of the same grid expects;
* ``sliding``: the volume is fitted into the training grid (``volume_size``), tiled with windows of
  ``input_size`` (``overlap`` between neighbours), windows with too little head are skipped and
  the window embeddings are mean-pooled — the exact input distribution of crop-based pretraining.

The result is one (N, D) set per name in :class:`slice2vol.cache.FeatureStore`, with the manifest
labels stored alongside, so the benchmark evaluates it exactly like aggregated 2D features.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from slice2vol.config import to_dict
from slice2vol.data.io import Volume, VolumeConfig
from slice2vol.data.manifest import Cohort, Failure, load_subject
from slice2vol.encoders3d.base import Encoder3D, Encoder3DInfo, SlidingWindow
from slice2vol.ssl.data import fit_to_grid, prepare_volume
from slice2vol.ssl.trainer import check_checkpoint, list_checkpoints, load_checkpoint

__all__ = ["CheckpointEncoder3D", "ExportReport", "check_checkpoint", "embed_cohort", "embed_volume", "list_checkpoints", "load_encoder",
           "windows"]

log = logging.getLogger(__name__)


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """A trained encoder from an SSL checkpoint (``<run>/last``), in eval mode.

    The module maps (B, C, *spatial) -> (B, embed_dim); its ``slice2vol_meta`` attribute holds the
    checkpoint meta (method, config, sha256 of the weights) that :func:`embed_cohort` uses for
    preprocessing and provenance.
    """
    from slice2vol.encoders.base import sha256_file

    model, cfg, meta = load_checkpoint(path, map_location)  # checks meta.json (check_checkpoint)
    encoder = model.encoder.eval()
    meta["weights_sha256"] = sha256_file(meta["encoder_file"])
    meta["key"] = f"ssl{cfg.spatial_dims}d/{cfg.method}"
    encoder.slice2vol_meta = meta
    return encoder


@dataclass
class ExportReport:
    """Outcome of :func:`embed_cohort`."""

    name: str
    store: Path
    done: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    embed_dim: int = 0


def windows(shape: Sequence[int], size: Sequence[int], overlap: float = 0.5) -> list[tuple[slice, ...]]:
    """Window boxes of ``size`` covering ``shape`` (last window flush with the end), stride ``size * (1 - overlap)``."""
    if not 0 <= overlap < 1:  # negative leaves voxels uncovered; 1 gives a window per voxel
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap!r}")
    axes = []
    for n, s in zip(shape, size):
        if s >= n:
            axes.append([0])
            continue
        stride = max(1, int(s * (1 - overlap)))
        starts = list(range(0, n - s + 1, stride))
        if starts[-1] != n - s:
            starts.append(n - s)
        axes.append(starts)
    return [tuple(slice(a, a + s) for a, s in zip(corner, size)) for corner in itertools.product(*axes)]


@torch.no_grad()
def embed_volume(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor | None = None, *,
                 window: Sequence[int], overlap: float = 0.5, min_foreground: float = 0.05,
                 batch_size: int = 8, device: str | torch.device = "cpu") -> torch.Tensor:
    """Sliding-window embedding of one volume.

    Args:
        model: (B, C, *window) -> (B, D).
        image: (C, X, Y, Z); zero-padded up to ``window`` where smaller.
        mask: (X, Y, Z) head mask; windows with a smaller head fraction than ``min_foreground`` are
            skipped (the most-foreground window is always kept).
        window: window size.

    Returns:
        (D,) mean of the window embeddings.
    """
    pad = []
    for n, s in reversed(list(zip(image.shape[1:], window))):
        extra = max(0, s - n)
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        image = torch.nn.functional.pad(image, pad)
        mask = None if mask is None else torch.nn.functional.pad(mask[None].float(), pad)[0] > 0.5
    boxes = windows(image.shape[1:], window, overlap)
    if mask is not None:
        fg = torch.tensor([float(mask[b].float().mean()) for b in boxes])
        keep = [b for b, f in zip(boxes, fg) if f >= min_foreground] or [boxes[int(fg.argmax())]]
        boxes = keep
    feats = []
    for start in range(0, len(boxes), batch_size):
        crops = torch.stack([image[(slice(None), *b)] for b in boxes[start:start + batch_size]]).float()
        feats.append(model(crops.to(device)).float().cpu())
    return torch.cat(feats).mean(0)


def check_options(input_size: Sequence[int], overlap: float, batch_size: int) -> None:
    """Refuses an input/window size below 1 voxel, an overlap outside [0, 1) or a batch size below 1, once,
    before any volume is read (with :class:`SlidingWindow`'s checks, under this module's option names).

    Raises:
        ValueError: one line naming the option (``input_size``, ``overlap``, ``batch_size``).
    """
    try:
        SlidingWindow(roi_size=tuple(input_size), overlap=overlap, sw_batch_size=batch_size)
    except (TypeError, ValueError) as err:
        message = str(err)
        for theirs, ours in (("sliding_window.roi_size must be 3 window sizes", "input_size must be 3 sizes"),
                             ("sliding_window.overlap", "overlap"), ("sliding_window.sw_batch_size", "batch_size")):
            message = message.replace(theirs, ours)
        raise ValueError(message) from None


def _settings(model: torch.nn.Module, name: str, mode: str, volume_cfg: VolumeConfig | None,
              volume_size: Sequence[int] | None, input_size: Sequence[int]
              ) -> tuple[VolumeConfig, tuple[int, ...] | None, tuple[int, ...]]:
    """Loading options, SSL grid and input size of a trained encoder: those given, else the
    training run's (its checkpoint meta), else a head-cropped volume on its own grid. A model with
    a fixed input size (ViT/MAE) in ``whole`` mode always gets that size."""
    if mode not in ("whole", "sliding"):
        raise ValueError(f"mode must be 'whole' or 'sliding', got {mode!r}")
    meta = getattr(model, "slice2vol_meta", {}) or {}
    data_cfg = (meta.get("config") or {}).get("data", {})
    if volume_cfg is None:
        from slice2vol.config import from_dict

        volume_cfg = from_dict(VolumeConfig, data_cfg["volume"]) if "volume" in data_cfg else \
            VolumeConfig(crop_foreground=True)
    if volume_size is None and data_cfg.get("volume_size"):
        volume_size = tuple(data_cfg["volume_size"])
    input_size = tuple(int(s) for s in input_size)
    fixed = getattr(model, "fixed_size", None)
    if fixed is not None and tuple(fixed) != input_size:
        log.warning("%s: encoder needs input %s; using it instead of %s", name, tuple(fixed), input_size)
        input_size = tuple(fixed)
    return volume_cfg, (tuple(int(v) for v in volume_size) if volume_size else None), input_size


class CheckpointEncoder3D(Encoder3D):
    """A trained SSL encoder (:func:`load_encoder`) as an :class:`~slice2vol.encoders3d.Encoder3D`.

    :func:`slice2vol.encoders3d.embed_cohort3d` can then embed it like a registered 3D encoder: a
    rerun embeds only the subjects whose input files changed, an interrupted run resumes, rows of
    subjects that fail or are absent are kept, and a set made with other settings is refused
    unless replaced. One volume is embedded at a time, as :func:`embed_cohort` does it per mode
    (``whole``: fitted into ``input_size``, one pass; ``sliding``: fitted into the SSL grid, tiled,
    mean of the windows' embeddings). The mode, window and grid are part of ``info`` and thus of
    the set's identity.

    Args:
        model: from :func:`load_encoder`; (B, C, *input_size) -> (B, D).
        input_size, mode, overlap, min_foreground, batch_size, volume_cfg, volume_size: as in
            :func:`embed_cohort` (``batch_size``: windows per pass in ``sliding`` mode).
        name: what a warning about the input size names (default: the checkpoint's key).
    """

    def __init__(self, model: torch.nn.Module, input_size: Sequence[int], *, mode: str = "whole",
                 overlap: float = 0.5, min_foreground: float = 0.05, batch_size: int = 4,
                 volume_cfg: VolumeConfig | None = None, volume_size: Sequence[int] | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        check_options(input_size, overlap, batch_size)
        meta = getattr(model, "slice2vol_meta", {}) or {}
        key = meta.get("key", type(model).__name__)
        self._volume_cfg, self.volume_size, size = _settings(model, name or key, mode, volume_cfg, volume_size,
                                                             input_size)
        self.model = model.eval()
        self.mode, self.overlap, self.min_foreground = mode, float(overlap), float(min_foreground)
        self.batch_size = int(batch_size)
        sliding = mode == "sliding"
        grid = f"fitted into {list(self.volume_size)}" if self.volume_size else "on its loaded grid"
        self.info = Encoder3DInfo(
            key=key, embed_dim=int(getattr(model, "embed_dim", 0)), source="slice2vol pretrain",
            weights=str(meta.get("checkpoint", "")), weights_sha256=str(meta.get("weights_sha256", "")),
            in_chans=int(getattr(model, "in_channels", 1) or 1),
            input_size=size,
            crop=(f"head bounding box {grid}, windows of {list(size)} (overlap {overlap:g}, head >= "
                  f"{min_foreground:g}), mean of their embeddings" if sliding else
                  f"head bounding box fitted into {list(size)} (aspect kept, zero-padded)"),
            intensity=f"the training run's ({self._volume_cfg.normalize})",
            checkpoint=str(meta.get("checkpoint", "")),
            extra={"method": meta.get("method"), "ssl_config_hash": meta.get("config_hash"),
                   "train_step": meta.get("step"), "mode": mode, "overlap": self.overlap if sliding else None,
                   "min_foreground": self.min_foreground if sliding else None,
                   "volume_size": list(self.volume_size) if self.volume_size else None},
        )

    def volume_config(self) -> VolumeConfig:
        return self._volume_cfg

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """Volume (C, X, Y, Z) -> (1, C, *input_size), the ``whole`` mode's input."""
        data = torch.from_numpy(np.ascontiguousarray(volume.data, dtype=np.float32))
        return fit_to_grid(data, volume.spacing, self.info.input_size)[None]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *input_size) -> (B, D) float32."""
        return self.model(x).float()

    @torch.inference_mode()
    def embed_volume(self, volume: Volume, sliding_window: Any = None) -> torch.Tensor:
        """One volume -> (D,) float32 on CPU, in this encoder's ``mode``."""
        if sliding_window:
            raise ValueError(f"{self.info.key}: an SSL checkpoint slides its own windows (mode='sliding'); "
                             "MONAI sliding-window options do not apply")
        if self.mode == "whole":
            return self.encode(self.preprocess(volume).to(self.device))[0].cpu()
        image, mask = prepare_volume(volume, self.volume_size)
        return embed_volume(self.model, image, mask, window=self.info.input_size, overlap=self.overlap,
                            min_foreground=self.min_foreground, batch_size=self.batch_size, device=self.device)


def embed_cohort(model: torch.nn.Module, cohort: Cohort, store_path: str | Path, name: str, *,
                 input_size: Sequence[int] = (96, 96, 96), mode: str = "whole",
                 volume_cfg: VolumeConfig | None = None, volume_size: Sequence[int] | None = None,
                 overlap: float = 0.5, min_foreground: float = 0.05, batch_size: int = 4,
                 device: str | torch.device = "cpu", provenance: dict[str, Any] | None = None,
                 write_labels: bool = True, progress: bool = True) -> ExportReport:
    """Embeds every subject of ``cohort`` with a 3D encoder and writes the set ``name`` to the store.

    Args:
        model: ``embed_dim`` attribute, (B, C, X, Y, Z) -> (B, embed_dim); from :func:`load_encoder`
            it also carries the checkpoint meta used for defaults and provenance.
        cohort: subjects to embed (failures are recorded, the others written).
        store_path: the ``.h5`` feature store (created if needed).
        name: volume-embedding set name, e.g. ``ssl3d/simclr``.
        input_size: network input (``whole``) or window (``sliding``) size. A model with a fixed
            input size (ViT/MAE) in ``whole`` mode always gets that size.
        mode: ``whole`` or ``sliding``.
        volume_cfg: loading options; default: the training run's (head-cropped), else
            ``VolumeConfig(crop_foreground=True)``.
        volume_size: grid the volume is fitted into before sliding windows; default: the training
            run's ``data.volume_size`` (``None`` keeps the loaded grid).
        overlap, min_foreground: sliding windows (see :func:`embed_volume`).
        batch_size: volumes (whole) or windows (sliding) per forward pass.
        provenance: extra provenance keys.
        write_labels: also store the cohort's labels (so the benchmark finds targets in the store).

    Returns:
        :class:`ExportReport` with the subjects written and the failures.
    """
    from slice2vol.cache import FeatureStore
    from slice2vol.progress import track

    meta = getattr(model, "slice2vol_meta", {}) or {}
    # the per-volume preparation (whole: fitted into the input; sliding: windows on the SSL grid) is the
    # adapter's, so that `slice2vol embed --checkpoint` and this function embed a volume the same way
    encoder = CheckpointEncoder3D(model.to(device), input_size, mode=mode, overlap=overlap,
                                  min_foreground=min_foreground, batch_size=batch_size, volume_cfg=volume_cfg,
                                  volume_size=volume_size, name=name)
    volume_cfg, volume_size, input_size = encoder.volume_config(), encoder.volume_size, encoder.info.input_size
    model = encoder.model
    report = ExportReport(name, Path(store_path), embed_dim=int(getattr(model, "embed_dim", 0)))
    rows: list[np.ndarray] = []
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            X = model(torch.stack([img for _, img in pending]).to(device)).float().cpu().numpy()
        for (sid, _), x in zip(pending, X):
            report.done.append(sid)
            rows.append(x)
        pending.clear()

    for subject in track(cohort.subjects, desc=f"embed {name}", unit="subj", enabled=progress):
        try:
            volume = load_subject(subject, volume_cfg, with_seg=False)
        except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
            report.failures.append(Failure.of(subject, err))
            log.warning("skipping %s", report.failures[-1].message)
            continue
        if mode == "whole":  # batched across volumes here
            pending.append((subject.subject_id, encoder.preprocess(volume)[0]))
            if len(pending) >= batch_size:
                flush()
        else:
            report.done.append(subject.subject_id)
            rows.append(encoder.embed_volume(volume).numpy())
    flush()
    if not rows:
        raise ValueError(f"{cohort.source}: no subject could be embedded ({len(report.failures)} failures)")
    X = np.stack(rows).astype(np.float32)
    report.embed_dim = X.shape[1]
    prov = {
        "encoder": meta.get("key", type(model).__name__), "kind": "native-3d", "method": meta.get("method"),
        "checkpoint": meta.get("checkpoint"), "weights_sha256": meta.get("weights_sha256", ""),
        "ssl_config_hash": meta.get("config_hash"), "train_step": meta.get("step"),
        "mode": mode, "input_size": list(input_size), "overlap": overlap if mode == "sliding" else None,
        "volume_size": list(volume_size) if volume_size else None, "volume_config": to_dict(volume_cfg),
        "embed_dim": int(X.shape[1]), "n_failures": len(report.failures), **(provenance or {}),
    }
    store = FeatureStore(store_path, mode="a")
    if write_labels and cohort.label_types:
        done = set(report.done)
        records = {s.subject_id: dict(s.labels) for s in cohort.subjects if s.subject_id in done}
        store.write_labels(records, dict(cohort.label_types))
    store.write_volume_embeddings(name, report.done, X, prov)
    return report
