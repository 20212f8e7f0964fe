"""The dense probes of the benchmark, independent of the runner: feature files, segmentation CV, anomaly CV.

* :class:`ProbeSet` is one column of the probe tables: a 2D encoder with its weights, the encoder's
  random-init twin (same architecture and preprocessing, seeded random weights), or the
  raw-intensity control (:class:`~slice2vol.eval.dense.IntensityFeatures`).
* :class:`DenseFeatureFiles` extracts the dense features of every slice of every subject ONCE per
  set (the union of the levels both probes need) into ``<dir>/<subject>.npz``, keyed by content
  (set identity, probe input size, levels, plane, slice size, volume config); the segmentation and
  anomaly probes both read them, and lesioned scans re-embed only the slices a lesion changed.
* :func:`segmentation_cv` and :func:`anomaly_cv` run the subject-level cross-validation of one set
  and return per-subject numbers; the task modules (:mod:`slice2vol.eval.tasks.segmentation`,
  :mod:`slice2vol.eval.tasks.anomaly`) turn them into rows, paired tests and figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from slice2vol.eval.dense import DenseSlices, IntensityFeatures, extract_dense, select_levels

log = logging.getLogger(__name__)


# -- configuration shared by both probes --------------------------------------------------------
@dataclass
class DenseFeatureConfig:
    """How dense features are extracted for the probes (shared by segmentation and anomaly).

    Attributes:
        plane: slicing plane (every slice of it is embedded and predicted).
        slice_size: square side slices are padded to (label resolution; near the in-plane size).
        img_size: probe input size of every 2D encoder (``build_encoder(..., img_size=)``),
            independent of the caching size of the k-NN/linear tasks.
        encoder_kwargs: extra build options for the probe, e.g. ``{crop_pct: 1.0}`` so that a
            timm/torchvision encoder sees the whole slice instead of its central 87.5%.
        batch_size: slices per forward pass.
        norm: normalised transformer block outputs (the model's final norm, as DINOv2's linear
            segmentation protocol); no effect on CNNs.
        keep: keep the feature files after the last probe task (they take ~40 MB per subject
            and set at 224 px); otherwise they are removed and a rerun relies on cached results.
        channels_last: run the encoder with channels-last weights (faster CPU convolutions).
    """

    plane: str = "axial"
    slice_size: int = 128
    img_size: int = 224
    encoder_kwargs: dict = field(default_factory=dict)
    batch_size: int = 32
    norm: bool = True
    keep: bool = False
    channels_last: bool = True


@dataclass
class ProbeSet:
    """One column of the probe tables.

    Attributes:
        name: label in tables (``<encoder>``, ``<encoder>:random-init``, ``control:intensity``).
        kind: ``encoder`` (a 2D encoder), ``twin`` (its random-init twin) or ``control``.
        key, weights, kwargs: registry key, resolved weights string, build options (encoders).
        control: :class:`IntensityFeatures` keywords (controls).
        twin: name of the random-init twin of this encoder (for the gain columns), if any.
        weights_id: what the cache keys use for the weights (``sha256:...`` of a file).
    """

    name: str
    kind: str
    key: str | None = None
    weights: str = "random"
    kwargs: dict = field(default_factory=dict)
    control: dict | None = None
    twin: str | None = None
    weights_id: str = "random"

    def identity(self) -> dict:
        if self.kind == "control":
            return {"control": self.control}
        return {"key": self.key, "weights": self.weights_id, "kwargs": self.kwargs}

    def build(self, feat: DenseFeatureConfig, seed: int = 0, device: str = "cpu"):
        """The dense feature provider: a slice2vol encoder (probe input size) or the control."""
        if self.kind == "control":
            return IntensityFeatures(**(self.control or {}))
        import torch

        from slice2vol.encoders.base import build_encoder

        torch.manual_seed(seed)  # random-init twins are seeded like every random encoder of the run
        kwargs = {**self.kwargs, **feat.encoder_kwargs, "img_size": feat.img_size}
        encoder = build_encoder(self.key, weights=self.weights, **kwargs).to(device)
        # channels-last weights make PyTorch's CPU convolutions (oneDNN) run in NHWC: MobileNetV2's
        # depthwise stages about twice as fast at probe sizes; the maps are the same up to rounding
        return encoder.to(memory_format=torch.channels_last) if feat.channels_last else encoder


def content_hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# -- feature files -------------------------------------------------------------------------------
class DenseFeatureFiles:
    """Per-subject :class:`DenseSlices` of one set, extracted once, read by both probes.

    Args:
        root: folder for all sets (``<out>/cache/dense``).
        pset: the set.
        feat: extraction settings.
        levels: level selectors to extract (the union of what the probes use).
        volume_identity: JSON-able description of the volume loading (part of the key).
        seed, device: for building the encoder.
    """

    def __init__(self, root: Path, pset: ProbeSet, feat: DenseFeatureConfig, levels: Sequence, volume_identity: Any,
                 seed: int = 0, device: str = "cpu") -> None:
        self.pset, self.feat, self.levels, self.seed, self.device = pset, feat, list(levels), seed, device
        ident = {"set": pset.identity(), "plane": feat.plane, "slice_size": feat.slice_size, "norm": feat.norm,
                 "img_size": feat.img_size if pset.kind != "control" else None,
                 "encoder_kwargs": feat.encoder_kwargs if pset.kind != "control" else None,
                 "levels": [str(v) for v in self.levels], "volume": volume_identity, "seed": seed, "format": 1}
        self.dir = Path(root) / f"{_safe(pset.name)}-{content_hash(ident)}"
        self._encoder = None
        self.extract_s = 0.0
        self.n_extracted = 0

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = self.pset.build(self.feat, self.seed, self.device)
        return self._encoder

    def path(self, subject_id: str) -> Path:
        return self.dir / f"{_safe(subject_id)}.npz"

    def ensure(self, subjects: Sequence[Any], load: Callable[[Any], Any], progress: bool = False) -> list[str]:
        """Extracts every subject whose file is missing; returns the IDs that failed (logged)."""
        from slice2vol.progress import track

        todo = [s for s in subjects if not self.path(s.subject_id).exists()]
        failures = []
        for subject in track(todo, desc=f"dense features {self.pset.name}", unit="vol", enabled=progress):
            try:
                t0 = time.time()
                ds = self.extract(load(subject))
                ds.save(self.path(subject.subject_id))
                self.extract_s += time.time() - t0
                self.n_extracted += len(ds)
            except (OSError, ValueError, RuntimeError) as err:
                log.warning("%s: %s: dense features failed (%s)", self.pset.name, subject.subject_id, err)
                failures.append(subject.subject_id)
        return failures

    def extract(self, volume, rows: np.ndarray | None = None, levels: Sequence | None = None) -> DenseSlices:
        """Dense features of ``volume`` (e.g. a lesioned copy), optionally only some slices/levels."""
        return extract_dense(self.encoder, volume, self.feat.plane, self.feat.slice_size,
                             self.levels if levels is None else levels, rows=rows,
                             batch_size=self.feat.batch_size, norm=self.feat.norm)

    def load(self, subject_id: str) -> DenseSlices:
        return DenseSlices.load(self.path(subject_id))

    def positions(self, selectors: Sequence) -> list[int]:
        """Positions among the extracted levels of the levels ``selectors`` pick in the encoder's
        full ``feature_info()`` (so ``last`` or an index means the same as for the encoder)."""
        info = self.encoder.feature_info()
        extracted = [info[i].index for i in select_levels(info, self.levels)]
        wanted = [info[i].index for i in select_levels(info, selectors)]
        missing = [w for w in wanted if w not in extracted]
        if missing:
            raise ValueError(f"{self.pset.name}: levels {missing} are not among the extracted {extracted}")
        return [extracted.index(w) for w in wanted]

    def remove(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def select(ds: DenseSlices, positions: Sequence[int]) -> DenseSlices:
    """``ds`` restricted to the stored levels at ``positions``."""
    return dataclasses.replace(ds, maps=[ds.maps[j] for j in positions], scales=[ds.scales[j] for j in positions],
                               levels=[ds.levels[j] for j in positions])


# -- segmentation -------------------------------------------------------------------------------
@dataclass
class SegProbeSettings:
    """The probe part of the segmentation config (see :class:`slice2vol.eval.segmentation.SegConfig`).

    Attributes:
        variants: name -> level selectors; each variant is its own linear probe (DINOv2: ``linear``
            = the last layer, a multi-layer variant = several levels concatenated).
        primary_variant: the variant of the paired tests and the summary.
        train_stride: training pixels come from every ``train_stride``-th slice of the training
            subjects (all slices of a test subject are predicted).
        per_class: pixels drawn per class per training slice (:func:`sample_training_pixels`).
        max_train_values: cap on training pixels x feature width per fold (memory and time of the
            L-BFGS fit); pixels beyond it are dropped uniformly at random.
        l2, max_iter, balance: :class:`~slice2vol.eval.segmentation.LinearSegProbe`.
        hd95: variants that get the 95th-percentile Hausdorff distance: ``primary``, ``all``, ``none``
            (it costs about as much as the prediction itself).
    """

    variants: dict = field(default_factory=lambda: {"multilayer": ["stride:4", "stride:8", "stride:16"],
                                                    "linear": ["last"]})
    primary_variant: str = "multilayer"
    train_stride: int = 3
    per_class: int = 100
    max_train_values: int = 40_000_000
    l2: float = 1e-4
    max_iter: int = 60
    balance: str = "sqrt"
    hd95: str = "primary"

    def __post_init__(self) -> None:
        # each failed only after every set's dense features were extracted (a primary variant that is
        # not a variant ended the run as "error: multilayer")
        from slice2vol.config import check_real, check_whole

        where = "segmentation.probe"
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(f"{where}.variants must name at least one variant (name: [levels]), got {self.variants!r}")
        for name, levels in self.variants.items():
            if not isinstance(levels, (list, tuple)) or not levels:
                raise ValueError(f"{where}.variants.{name} must be a non-empty list of levels, got {levels!r}")
        if self.primary_variant not in self.variants:
            raise ValueError(f"{where}.primary_variant {self.primary_variant!r} is not one of the variants "
                             f"{list(self.variants)}")
        for name, low in (("train_stride", 1), ("per_class", 1), ("max_train_values", 1), ("max_iter", 1)):
            check_whole(f"{where}.{name}", getattr(self, name), low)
        check_real(f"{where}.l2", self.l2, 0.0)
        if self.balance not in ("none", "sqrt", "inverse"):
            raise ValueError(f"{where}.balance must be none, sqrt or inverse, got {self.balance!r}")
        if self.hd95 not in ("primary", "all", "none"):
            raise ValueError(f"{where}.hd95 must be primary, all or none, got {self.hd95!r}")


def segmentation_cv(files: DenseFeatureFiles, subjects: Sequence[Any], load: Callable[[Any], Any],
                    lut: np.ndarray, n_classes: int, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                    probe: SegProbeSettings, seed: int = 0, example: int | None = 0,
                    permute_labels: bool = False, progress: bool = False) -> dict:
    """Subject-level cross-validated dense linear probe of one set.

    Args:
        files: the set's feature files (already extracted for ``subjects``).
        subjects: cohort subjects (with ``subject_id``), in the order of the fold positions.
        load: subject -> :class:`~slice2vol.data.io.Volume` (for the truth on the original grid).
        lut: raw label -> class (0..K).
        folds: (train positions, test positions) per fold; every subject is tested once.
        example: position of the subject whose middle slice is returned for the overlay figure.
        permute_labels: shuffle the training pixels' classes (a negative control: Dice must fall
            to what the class frequencies alone give).

    Returns:
        ``{variant: {"dice": (N, K), "hd95": (N, K), "n_train": [per fold], "levels": [...]}}``
        plus ``"example"`` (image, truth and per-variant prediction of one slice) and ``"timing_s"``.
    """
    from slice2vol.data.slicing import PLANES
    from slice2vol.eval.segmentation import (LinearSegProbe, apply_lut, class_slices, predict_volume,
                                             sample_training_pixels, segmentation_scores)
    from slice2vol.progress import track

    t0 = time.time()
    variants = {name: files.positions(sel) for name, sel in probe.variants.items()}
    n = len(subjects)
    rng = np.random.default_rng(seed)
    # one pixel sample per subject, read for every variant (the same pixels for every level set)
    samples: dict[str, list] = {v: [None] * n for v in variants}
    for i, subject in enumerate(track(subjects, desc=f"seg samples {files.pset.name}", unit="vol",
                                      enabled=progress)):
        ds = files.load(subject.subject_id)
        classes = class_slices(ds, lut)
        rows = np.arange(0, len(ds), max(probe.train_stride, 1))
        sub_rng = np.random.default_rng([seed, i])
        for v, pos in variants.items():
            samples[v][i] = sample_training_pixels(select(ds, pos), classes, rows, probe.per_class,
                                                   np.random.default_rng(sub_rng.integers(1 << 31)))
    out: dict[str, Any] = {v: {"dice": np.full((n, n_classes), np.nan), "hd95": np.full((n, n_classes), np.nan),
                               "n_train": [], "loss": []} for v in variants}
    axis = PLANES[files.feat.plane]
    ex = None
    pending: list = []
    scorer = ThreadPoolExecutor(max_workers=1)

    def collect(i, v, future):
        out[v]["dice"][i], out[v]["hd95"][i] = future.result()

    for train, test in folds:
        probes = {}
        for v in variants:
            X = np.concatenate([samples[v][i][0] for i in train])
            y = np.concatenate([samples[v][i][1] for i in train])
            w = np.concatenate([samples[v][i][2] for i in train])
            if permute_labels:
                perm = rng.permutation(len(y))
                y, w = y[perm], w[perm]
            cap = max(int(probe.max_train_values // max(X.shape[1], 1)), 1000)
            if len(y) > cap:
                keep = np.sort(rng.choice(len(y), cap, replace=False))
                X, y, w = X[keep], y[keep], w[keep]
            probes[v] = LinearSegProbe(n_classes, l2=probe.l2, max_iter=probe.max_iter,
                                       balance=probe.balance).fit(X, y, w)
            out[v]["n_train"].append(int(len(y)))
            out[v]["loss"].append(float(probes[v].loss_))
            del X, y, w
        for i in test:
            volume = load(subjects[i])
            truth = apply_lut(volume.seg, lut)
            ds = files.load(subjects[i].subject_id)
            preds = {}
            for v, pos in variants.items():
                pred = predict_volume(probes[v], select(ds, pos), volume.shape)
                want_hd = probe.hd95 == "all" or (probe.hd95 == "primary" and v == probe.primary_variant)
                # Dice/HD95 (MONAI; its KD-tree search releases the GIL) in a worker thread while the
                # next prediction runs: the scores were a fifth of the task, on one core
                pending.append((i, v, scorer.submit(segmentation_scores, pred, truth, n_classes, volume.spacing,
                                                    hd95=want_hd)))
                preds[v] = pred
            while len(pending) > 2 * len(variants):   # bounded: a few volumes' class maps in flight
                collect(*pending.pop(0))
            if example is not None and i == example:
                ex = _overlay(volume, truth, preds, axis)
    try:
        while pending:
            collect(*pending.pop(0))
    finally:
        scorer.shutdown(wait=True, cancel_futures=True)
    for v, pos in variants.items():
        out[v]["levels"] = [dataclasses.asdict(files.load(subjects[0].subject_id).levels[j]) for j in pos]
    out["example"] = ex
    out["timing_s"] = round(time.time() - t0, 2)
    return out


def _overlay(volume, truth: np.ndarray, preds: dict, axis: int) -> dict:
    """The middle brain slice along ``axis`` in display orientation (superior/anterior up)."""
    brain = np.argwhere(truth > 0)
    mid = int(np.median(brain[:, axis])) if len(brain) else volume.shape[axis] // 2

    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.flipud(np.take(a, mid, axis=axis).T))

    return {"image": cut(volume.data[0]).astype(np.float32), "truth": cut(truth).astype(np.int16),
            "pred": {v: cut(p).astype(np.int16) for v, p in preds.items()}, "slice": mid}


# -- anomaly detection --------------------------------------------------------------------------
def anomaly_cv(files: DenseFeatureFiles, subjects: Sequence[Any], load: Callable[[Any], Any],
               folds: Sequence[tuple[np.ndarray, np.ndarray]], scorer, lesions, sweep=None, *, fpr: float = 0.01,
               min_lesion_voxels: int = 5, levels: Sequence | None = None, seed: int = 0, n_boot: int = 1000,
               n_bins: int = 2000, example: int | None = 0, progress: bool = False) -> dict:
    """PatchCore-style anomaly detection of simulated lesions with one set, subject-level CV.

    Per fold, a memory bank of healthy brain patches of the training subjects (the union of their
    k-centre coresets, :func:`~slice2vol.eval.anomaly.subject_patches`) scores the held-out
    subjects' healthy scans and the same scans with simulated lesions; only the slices a lesion
    changed are re-embedded. The lesions of subject ``i`` are drawn with ``rng([seed, i])`` (main
    setting) and ``rng([seed, 1000 + k, i])`` (sweep setting ``k``): the same for every set.

    Args:
        scorer: :class:`~slice2vol.eval.anomaly.PatchScorerConfig`.
        lesions: :class:`~slice2vol.eval.lesions.LesionConfig` of the main setting.
        sweep: :class:`~slice2vol.eval.lesions.SweepConfig` or None. The sweep scores only the
            slice through each lesion's centre (what a slice-wise encoder sees of it).
        fpr: voxel false-positive rate on the fold's held-out healthy scans that sets the
            lesion-wise detection threshold.
        min_lesion_voxels: a slice cuts a lesion (slice-level positive) with at least this many.
        levels: level selectors (default ``scorer.levels``; controls pass their own).

    Returns:
        dict with per-subject arrays (``pixel_auroc``, ``healthy``/``lesioned`` subject scores,
        ``detected``/``n_lesions``), ``pixel_pooled`` (estimate and bootstrap interval over
        subjects), ``slice`` (scores, truth, owner), ``sweep`` (setting -> per-subject pixel AUROC
        and detection), ``thresholds`` per fold, ``example`` and ``timing_s``.
    """
    from slice2vol.data.slicing import PLANES
    from slice2vol.eval.anomaly import (PatchMemoryBank, cells_to_volume, lesion_detection, subject_patches,
                                        subject_score, voxel_auroc)
    from slice2vol.eval.lesions import LesionSampler, brain_mask, central_slice, changed_slices, sweep_settings
    from slice2vol.progress import track

    t0 = time.time()
    scfg, main_lesions = scorer, lesions
    sweep = sweep_settings(sweep) if sweep is not None else []
    levels_sel = list(levels if levels is not None else scfg.levels)
    pos = files.positions(levels_sel)
    axis = PLANES[files.feat.plane]
    n = len(subjects)
    parts = []
    for i, subject in enumerate(track(subjects, desc=f"memory bank {files.pset.name}", unit="vol",
                                      enabled=progress)):
        parts.append(subject_patches(select(files.load(subject.subject_id), pos), scfg, seed=seed + i))
    res: dict[str, Any] = {
        "pixel_auroc": np.full(n, np.nan), "healthy": np.full(n, np.nan), "lesioned": np.full(n, np.nan),
        "detected": np.zeros(n, int), "n_lesions": np.zeros(n, int), "thresholds": [], "bank_size": [],
        "n_rescored_slices": np.zeros(n, int),
        "sweep": {name: {"pixel_auroc": np.full(n, np.nan), "detected": np.zeros(n, int)} for name, _ in sweep},
    }
    slice_scores, slice_truth, slice_owner = [], [], []
    pooled_scores, pooled_truth, pooled_owner = [], [], []
    ex = None
    for train, test in folds:
        bank = PatchMemoryBank(scfg).fit([parts[i] for i in train])
        res["bank_size"].append(int(bank.index_.ntotal))
        healthy_vox, pending = [], []
        for i in test:
            volume = load(subjects[i])
            brain = brain_mask(volume)
            ds = select(files.load(subjects[i].subject_id), pos)
            if len(ds) != volume.shape[axis]:
                raise ValueError(f"{subjects[i].subject_id}: features cover {len(ds)} of {volume.shape[axis]} slices")
            cells_h = bank.score_cells(ds)
            vox_h = cells_to_volume(cells_h, ds, volume.shape)
            healthy_vox.append(vox_h[brain])
            # main setting: re-embed only the slices the lesions changed
            lesions_of = LesionSampler(volume)   # one brain erosion per subject for all its lesion draws
            sick, lesion = lesions_of.draw(np.random.default_rng([seed, i]), main_lesions)
            rows = changed_slices(volume.data, sick.data, axis)
            cells_l = cells_h.copy()
            if len(rows):
                cells_l[rows] = bank.score_cells(files.extract(sick, rows=rows, levels=levels_sel))
            vox_l = cells_to_volume(cells_l, ds, volume.shape)
            res["n_rescored_slices"][i] = len(rows)
            res["pixel_auroc"][i] = voxel_auroc(vox_l, lesion, brain)
            res["healthy"][i] = subject_score(vox_h, brain, scfg.subject_score)
            res["lesioned"][i] = subject_score(vox_l, brain, scfg.subject_score)
            pooled_scores.append(vox_l[brain])
            pooled_truth.append(lesion[brain])
            pooled_owner.append(np.full(int(brain.sum()), i))
            other = tuple(a for a in range(3) if a != axis)
            hit = np.flatnonzero(lesion.sum(axis=other) >= min_lesion_voxels)
            for vox, truth in ((vox_h, False), (vox_l, True)):
                masked = np.where(brain, vox, -np.inf)
                # (len(hit), -1) cannot be reshaped when no slice qualifies (a small lesion on a coarse or
                # thick-slice grid): that subject then adds no slice-level rows, and the task goes on
                plane_size = int(np.prod([masked.shape[a] for a in other]))
                peaks = np.moveaxis(masked, axis, 0)[hit].reshape(len(hit), plane_size).max(1, initial=-np.inf)
                slice_scores.append(peaks)
                slice_truth.append(np.full(len(hit), truth))
                slice_owner.append(np.full(len(hit), i))
            sweep_peaks = {}
            for k, (name, lcfg) in enumerate(sweep):
                sick_k, lesion_k = lesions_of.draw(np.random.default_rng([seed, 1000 + k, i]), lcfg)
                z = central_slice(lesion_k, axis)
                ds_z = files.extract(sick_k, rows=np.array([z]), levels=levels_sel)
                vox_z = np.take(cells_to_volume(bank.score_cells(ds_z), ds_z, volume.shape), z, axis=axis)
                brain_z, lesion_z = np.take(brain, z, axis=axis), np.take(lesion_k, z, axis=axis)
                res["sweep"][name]["pixel_auroc"][i] = voxel_auroc(vox_z, lesion_z, brain_z)
                sweep_peaks[name] = float(vox_z[lesion_z].max()) if lesion_z.any() else -np.inf
            pending.append((i, vox_l, lesion, sweep_peaks))
            if example is not None and i == example:
                ex = _lesion_example(volume, sick, lesion, vox_l, axis)
        # detection threshold: the (1 - fpr) quantile of held-out HEALTHY brain voxel scores of this fold
        threshold = float(np.quantile(np.concatenate(healthy_vox), 1 - fpr))
        res["thresholds"].append(threshold)
        for i, vox_l, lesion, sweep_peaks in pending:
            res["detected"][i], res["n_lesions"][i] = lesion_detection(vox_l, lesion, threshold)
            for name, peak in sweep_peaks.items():
                res["sweep"][name]["detected"][i] = int(peak > threshold)  # as lesion_detection: above, not at
        del pending, healthy_vox
    scores, truth, owner = map(np.concatenate, (pooled_scores, pooled_truth, pooled_owner))
    res["pixel_pooled"] = _pooled_auroc(scores, truth, owner, n, n_bins, n_boot, seed,
                                        tests=[np.asarray(test) for _, test in folds])
    res["slice"] = {"scores": np.concatenate(slice_scores), "truth": np.concatenate(slice_truth),
                    "owner": np.concatenate(slice_owner)}
    res["example"] = ex
    res["timing_s"] = round(time.time() - t0, 2)
    return res


def _pooled_auroc(scores: np.ndarray, truth: np.ndarray, owner: np.ndarray, n: int, n_bins: int, n_boot: int,
                  seed: int, tests: Sequence[np.ndarray] = ()) -> dict:
    """Exact pooled voxel AUROC, a subject-bootstrap interval from per-subject histograms, and the
    pooled AUROC of each test fold (``tests``: subject positions per fold) for the fold mean/sd."""
    from slice2vol.eval.anomaly import BinnedAUROC
    from slice2vol.eval.metrics import _binary_auc

    truth = truth.astype(bool)
    point = _binary_auc(truth, scores)
    fold_values = []
    for test in tests:
        sel = np.isin(owner, test)
        fold_values.append(float(_binary_auc(truth[sel], scores[sel])) if sel.any() else math.nan)
    binned = BinnedAUROC.from_samples(scores, n_bins)
    pos = np.zeros((n, len(binned.edges)))
    neg = np.zeros((n, len(binned.edges)))
    for i in np.unique(owner):
        sel = owner == i
        pos[i] = binned.histogram(scores[sel & truth])
        neg[i] = binned.histogram(scores[sel & ~truth])
    rng = np.random.default_rng(seed)
    present = np.unique(owner)
    boots = []
    for _ in range(n_boot):
        idx = present[rng.integers(0, len(present), len(present))]
        boots.append(BinnedAUROC.auroc(pos[idx].sum(0), neg[idx].sum(0)))
    b = np.asarray([v for v in boots if np.isfinite(v)])
    lo, hi = (float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))) if len(b) else (np.nan, np.nan)
    return {"estimate": float(point), "binned": BinnedAUROC.auroc(pos.sum(0), neg.sum(0)), "ci_low": lo,
            "ci_high": hi, "fold_values": fold_values}


def _lesion_example(volume, sick, lesion: np.ndarray, scores: np.ndarray, axis: int) -> dict:
    from slice2vol.eval.lesions import central_slice

    z = central_slice(lesion, axis) if lesion.any() else volume.shape[axis] // 2

    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.flipud(np.take(a, z, axis=axis).T))

    return {"healthy": cut(volume.data[0]).astype(np.float32), "lesioned": cut(sick.data[0]).astype(np.float32),
            "lesion": cut(lesion).astype(np.uint8), "scores": cut(scores).astype(np.float32), "slice": z}
