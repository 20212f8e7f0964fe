"""Dense segmentation probe: a linear 1x1 classifier on frozen multi-level feature maps, scored in 3D.

How much spatial anatomy do a 2D encoder's feature maps hold? DINOv2's linear segmentation
protocol, on every slice of one plane: each chosen level's map is bilinearly upsampled to the label
resolution, the levels are concatenated and standardised, and a linear map to K+1 classes is fitted
with a (class-weighted) cross-entropy (:class:`LinearSegProbe`, multinomial logistic regression by
L-BFGS on a class-stratified pixel sample of the training subjects' slices). Every slice of a test
subject is predicted and put back on the volume's own voxel grid (:func:`predict_volume`), and
Dice and the 95th-percentile Hausdorff distance are computed per structure per subject with
MONAI's metrics (:func:`segmentation_scores`), so the score is comparable with any 3D method.

Structures are sets of label values of the segmentation (e.g. DLMUSE single regions); for DLMUSE,
:func:`muse_structures` expands composite indices (601 GM, 604 WM, 509 ventricles) with the IXI
``labels/list_MUSE_mapping_derived.csv`` table. The cross-validation loop lives in
:func:`slice2vol.eval.dense_bench.segmentation_cv`; geometry and features in :mod:`slice2vol.eval.dense`.
"""

from __future__ import annotations

import csv
import dataclasses
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.eval.dense_bench import DenseFeatureConfig, SegProbeSettings


@dataclass
class SegConfig:
    """The ``segmentation:`` block of an experiment.

    Attributes:
        structures: class name -> label values of the segmentation map that form it (integers), or,
            with ``mapping_csv`` set, a composite index (e.g. ``{"gm": [601]}``) expanded by the table.
        mapping_csv: DLMUSE ``list_MUSE_mapping_derived.csv`` (composite index, name, single labels...).
        features: how dense features are extracted (plane, slice size, probe input size); shared
            with the anomaly probe, which reuses the same feature files when both agree.
        probe: the linear probe (variants, pixel sampling, L-BFGS, HD95).
        n_folds: subject-level folds (one repeat; every subject is predicted once).
        encoders: names of the experiment's 2D encoders to probe (None: all).
        twins: add the random-init twin of every pretrained encoder that has none in the list.
        controls: name -> :class:`~slice2vol.eval.dense.IntensityFeatures` keywords.
        max_subjects: evaluate at most this many subjects (first ones of the cohort), None for all.
        epochs: ignored (the probe is fitted by L-BFGS, see ``probe.max_iter``); kept so that
            configs written for the earlier token probe still load.
    """

    structures: dict = field(default_factory=lambda: {"csf": [1], "gm": [2], "wm": [3], "ventricles": [4]})
    mapping_csv: str | None = None
    features: DenseFeatureConfig = field(default_factory=DenseFeatureConfig)
    probe: SegProbeSettings = field(default_factory=SegProbeSettings)
    n_folds: int = 4
    encoders: list[str] | None = None
    twins: bool = True
    controls: dict = field(default_factory=lambda: {"intensity": {"patch": 5, "stride": 1, "coords": True}})
    max_subjects: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        from slice2vol.config import check_whole

        if not isinstance(self.structures, dict) or not self.structures:
            # an empty map ran every encoder and then reported "every task was skipped" with no reason
            raise ValueError(f"segmentation.structures must name at least one structure (name: [labels]), "
                             f"got {self.structures!r}")
        for name, labels in self.structures.items():
            if (not isinstance(labels, (list, tuple)) or not labels
                    or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in labels)):
                # a negative label indexed the look-up table from its end (-1 meant label 255)
                raise ValueError(f"segmentation.structures.{name} must be a non-empty list of label values "
                                 f"(whole numbers >= 0), got {labels!r}")
        check_whole("segmentation.n_folds", self.n_folds, 2)
        check_whole("segmentation.max_subjects", self.max_subjects, 0, none_ok=True)  # 0: all


def read_composite_mapping(path: str | Path) -> dict[int, list[int]]:
    """DLMUSE derived mapping CSV -> composite index -> single-region labels."""
    out: dict[int, list[int]] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue
            out[int(row[0])] = [int(v) for v in row[2:] if v.strip()]
    return out


def muse_structures(structures: Mapping[str, Sequence[int]], mapping_csv: str | Path) -> dict[str, list[int]]:
    """Expands composite indices to single labels; an index absent from the table is kept as is."""
    table = read_composite_mapping(mapping_csv)
    return {name: sorted({lab for idx in ids for lab in table.get(int(idx), [int(idx)])})
            for name, ids in structures.items()}


def label_lut(structures: Mapping[str, Sequence[int]], max_label: int | None = None) -> np.ndarray:
    """Look-up table raw label -> class index (0 = everything else, 1..K in ``structures`` order).

    Raises:
        ValueError: a label assigned to two structures (classes must not overlap).
    """
    top = max([max(v) for v in structures.values() if len(v)] + [max_label or 0]) + 1
    lut = np.zeros(top, dtype=np.int64)
    names = list(structures)
    for k, (name, labels) in enumerate(structures.items(), start=1):
        for lab in labels:
            if lut[lab] not in (0, k):
                raise ValueError(f"segmentation.structures: label {lab} is in two structures "
                                 f"({names[lut[lab] - 1]!r} and {name!r}); a voxel can be in one class only")
            lut[lab] = k
    return lut


def apply_lut(seg: np.ndarray | torch.Tensor, lut: np.ndarray):
    """Maps a label array through ``lut``; labels beyond the table become 0."""
    if isinstance(seg, torch.Tensor):
        t = torch.as_tensor(lut, device=seg.device)
        s = seg.long().clamp(0, len(lut) - 1)
        return torch.where(seg < len(lut), t[s], torch.zeros_like(s))
    s = np.clip(seg.astype(np.int64), 0, len(lut) - 1)
    return np.where(seg < len(lut), lut[s], 0)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of classes 1..K between two integer maps of the same shape -> (K,) (NaN if both empty)."""
    out = np.full(n_classes, np.nan)
    for k in range(1, n_classes + 1):
        p, t = pred == k, truth == k
        denom = p.sum() + t.sum()
        if denom:
            out[k - 1] = 2.0 * np.logical_and(p, t).sum() / denom
    return out


def place_in_box(maps: torch.Tensor, box: tuple[int, int, int, int], full: int) -> torch.Tensor:
    """(S, K, h, w) maps of the token field of view -> (S, K, full, full); outside is background."""
    top, left, h, w = box
    s, k = maps.shape[:2]
    out = maps.new_zeros((s, k, full, full))
    out[:, 0] = 1.0  # background outside the encoder's field of view
    out[:, :, top:top + h, left:left + w] = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    return out


# -- the dense linear probe on multi-level features (DINOv2 linear segmentation protocol) -------
def class_slices(ds, lut: np.ndarray) -> np.ndarray:
    """(S, h, w) int64 class maps of ``ds``'s slices inside its box (0 = background)."""
    if ds.labels is None:
        raise ValueError("these dense features were extracted without labels (the volume has no segmentation)")
    top, left, h, w = ds.box
    return apply_lut(ds.labels[:, top:top + h, left:left + w], lut)


def sample_training_pixels(ds, classes: np.ndarray, rows: np.ndarray, per_class: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-stratified pixel sample of some slices, weighted back to every pixel.

    From each slice in ``rows`` up to ``per_class`` pixels of each class present are drawn without
    replacement; a sample's weight is (pixels of its class in that slice) / (pixels drawn of it),
    so a weighted loss on the sample is an unbiased estimate of the loss on every pixel of those
    slices, with far fewer samples of the abundant background.

    Args:
        ds: :class:`~slice2vol.eval.dense.DenseSlices`.
        classes: (S, h, w) class maps in box coordinates (:func:`class_slices`).
        rows: slice positions to sample.

    Returns:
        X (N, D) float32 features, y (N,) int64 classes, weight (N,) float32.
    """
    pixels, ys, ws, kept = [], [], [], []
    for r in rows:
        flat = classes[r].reshape(-1)
        chosen, cls, wt = [], [], []
        for c in np.unique(flat):
            where = np.flatnonzero(flat == c)
            take = rng.choice(where, size=min(per_class, len(where)), replace=False)
            chosen.append(take)
            cls.append(np.full(len(take), c))
            wt.append(np.full(len(take), len(where) / len(take), dtype=np.float32))
        if chosen:
            pixels.append(np.concatenate(chosen))
            ys.append(np.concatenate(cls))
            ws.append(np.concatenate(wt))
            kept.append(r)
    if not kept:
        return np.zeros((0, ds.dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    from slice2vol.eval.dense import sample_features

    X = sample_features(ds, np.asarray(kept), pixels)
    return X, np.concatenate(ys).astype(np.int64), np.concatenate(ws)


class LinearSegProbe:
    """Linear per-pixel classifier on (upsampled, concatenated) frozen features: a 1x1 conv.

    DINOv2's linear segmentation head: features of each level bilinearly upsampled to the label
    resolution, concatenated, standardised, and a linear map to K+1 classes trained with
    cross-entropy. Here the map is fitted by full-batch L-BFGS (multinomial logistic regression
    with an L2 penalty, convex, so no learning-rate schedule to tune) on a class-stratified pixel
    sample (:func:`sample_training_pixels`). Because upsampling is linear, prediction applies each
    level's slice of the weights at its own resolution and upsamples only the K+1 logit maps.

    Args:
        n_classes: K structures (class 0 is everything else).
        l2: penalty on the weights of standardised features, per sample weight unit.
        max_iter: L-BFGS iterations.
        balance: class weights on top of the sample weights: ``none`` (pixel frequencies),
            ``sqrt`` (inverse square root of class frequency, the usual compromise for small
            structures) or ``inverse`` (fully balanced).

    Example:
        >>> probe = LinearSegProbe(3).fit(X, y, w)           # X (N, D)
        >>> logits = probe.predict_maps(dense_slices)        # (S, 4, h, w) in box coordinates
    """

    def __init__(self, n_classes: int, l2: float = 1e-4, max_iter: int = 100, balance: str = "sqrt") -> None:
        if balance not in ("none", "sqrt", "inverse"):
            raise ValueError(f"balance must be none, sqrt or inverse, got {balance!r}")
        self.n_classes = n_classes
        self.l2 = l2
        self.max_iter = max_iter
        self.balance = balance

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "LinearSegProbe":
        """Fits on pixel features X (N, D), classes y (N,) in 0..K, optional weights (N,)."""
        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        w = torch.ones(len(y)) if sample_weight is None else torch.as_tensor(np.asarray(sample_weight, np.float32))
        if len(y) == 0:
            raise ValueError("no training pixels")
        k = self.n_classes + 1
        freq = torch.zeros(k).index_add_(0, y, w)
        freq = freq / freq.sum()
        if self.balance == "none":
            cw = torch.ones(k)
        else:
            power = 0.5 if self.balance == "sqrt" else 1.0
            cw = torch.where(freq > 0, freq.clamp_min(1e-12) ** -power, torch.zeros(k))
        w = w * cw[y]
        w = w / w.sum()
        self.class_weight_ = (cw / cw[freq > 0].mean()).numpy()
        self.mean_ = X.mean(0)
        std = X.std(0)
        # relative floor: random-init nets give features of order 1e-8 that still vary
        self.std_ = torch.where(std > float(std.max()) * 1e-6, std, torch.ones_like(std))
        Z = (X - self.mean_) / self.std_
        weight = torch.zeros(X.shape[1], k, requires_grad=True)
        bias = torch.zeros(k, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=self.max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def objective():
            logits = Z @ weight + bias
            return (F.cross_entropy(logits, y, reduction="none") * w).sum() + self.l2 * (weight ** 2).sum()

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            self.loss_ = float(objective())
            self.weight_ = weight.detach() / self.std_[:, None]            # on raw features
            self.bias_ = bias.detach() - self.mean_ @ self.weight_
        self.n_iter_ = int(opt.state[opt._params[0]].get("n_iter", 0))
        return self

    def pixel_logits(self, X: np.ndarray) -> np.ndarray:
        """(N, D) pixel features -> (N, K+1) logits."""
        return (torch.as_tensor(np.asarray(X, np.float32)) @ self.weight_ + self.bias_).numpy()

    @torch.no_grad()
    def predict_maps(self, ds, rows: np.ndarray | None = None, batch: int = 32) -> torch.Tensor:
        """Logits (S, K+1, h, w) on ``ds``'s box grid for the slice positions ``rows`` (default all)."""
        rows = np.arange(len(ds)) if rows is None else np.asarray(rows)
        h, w = ds.box[2], ds.box[3]
        out = torch.empty(len(rows), self.n_classes + 1, h, w)
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            acc = self.bias_.view(1, -1, 1, 1).expand(len(part), -1, h, w).clone()
            col = 0
            for j, lv in enumerate(ds.levels):
                wj = self.weight_[col:col + lv.channels]          # (C_l, K+1)
                col += lv.channels
                logits = torch.einsum("schw,ck->skhw", ds.level(j, part), wj)
                acc += F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            out[start:start + len(part)] = acc
        return out


def predict_volume(probe: LinearSegProbe, ds, volume_shape: Sequence[int]) -> np.ndarray:
    """Class map (X, Y, Z) int64 on the volume's grid from every slice in ``ds``.

    Each slice's class probabilities (background outside the encoder's box) are resampled
    bilinearly to the volume's in-plane grid, as :func:`slice2vol.data.slices_to_grid` does, and
    arg-maxed there; the labels are then placed on the volume grid. A slice absent from ``ds`` is
    background.
    """
    from slice2vol.data.slicing import slices_to_grid

    top, left, height, width = ds.content_box
    labels = []
    for start in range(0, len(ds), 32):
        rows = np.arange(start, min(start + 32, len(ds)))
        proba = place_in_box(probe.predict_maps(ds, rows).softmax(1), ds.box, ds.slice_size)
        crop = proba[:, :, top:top + height, left:left + width]
        if (height, width) != tuple(ds.grid_shape):
            crop = F.interpolate(crop, size=tuple(ds.grid_shape), mode="bilinear", align_corners=False)
        # numpy's argmax over the class axis: torch's CPU argmax over a short dim 1 of (S, K+1, H, W)
        # is ~9x slower and was a tenth of the IXI segmentation task
        labels.append(torch.from_numpy(np.argmax(crop.numpy(), axis=1)))
    pred = torch.cat(labels)[:, None].float()                                   # (S, 1, rows, cols)
    ps = ds.plane_slices()
    ps = dataclasses.replace(ps, content_box=(0, 0, *ds.grid_shape))
    return slices_to_grid(pred, ps, volume_shape, mode="nearest-exact")[0].round().long().numpy()


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing: Sequence[float],
                        hd95: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Dice and 95th-percentile Hausdorff distance (mm) of classes 1..K, with MONAI's metrics.

    Args:
        pred, truth: (X, Y, Z) integer class maps.
        spacing: voxel size in mm.
        hd95: compute the Hausdorff distance (else NaN; it costs about as much as the prediction).

    Returns:
        dice (K,), hd95 (K,): NaN where the structure is absent from the truth; an empty
        prediction of a present structure gives Dice 0 and HD95 inf (MONAI's convention).
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance

    k = n_classes + 1
    p = F.one_hot(torch.as_tensor(pred, dtype=torch.long), k).permute(3, 0, 1, 2)[None].float()
    t = F.one_hot(torch.as_tensor(truth, dtype=torch.long), k).permute(3, 0, 1, 2)[None].float()
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)[0].numpy().astype(np.float64)
    present = np.isin(np.arange(1, k), np.unique(truth))
    hd = np.full(n_classes, np.nan)
    if hd95 and present.any():
        import warnings

        with warnings.catch_warnings():  # MONAI warns (and returns inf/nan) for empty predictions
            warnings.simplefilter("ignore")
            vals = compute_hausdorff_distance(p, t, include_background=False, percentile=95,
                                              spacing=list(map(float, spacing)))[0].numpy()
        hd = np.where(present, vals, np.nan).astype(np.float64)
        empty_pred = ~np.isin(np.arange(1, k), np.unique(pred))
        hd[present & empty_pred] = np.inf
    dice[~present] = np.nan
    return dice, hd
