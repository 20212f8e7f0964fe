"""Dense probe: a linear (1x1-conv) head on frozen patch tokens, scored by 3D Dice.

How much spatial anatomy do a 2D encoder's patch tokens hold? Tokens of the training subjects'
slices (one plane) are standardised with training statistics, a linear map to K+1 classes is
trained with cross-entropy on logits bilinearly upsampled to the label slice (as DINOv2's linear
segmentation probe), and the test subjects' predictions are put back onto the original voxel grid
with :func:`slice2vol.data.slices_to_grid` before Dice is computed per structure per subject, so
the score is comparable with any 3D method.

Structures are sets of label values of the segmentation (e.g. DLMUSE single regions); for DLMUSE,
:func:`muse_structures` expands composite indices (601 GM, 604 WM, 509 ventricles) with the IXI
``labels/list_MUSE_mapping_derived.csv`` table.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SegConfig:
    """Attributes:
    structures: class name -> label values of the segmentation map that form it (integers), or,
        with ``mapping_csv`` set, a composite index (e.g. ``{"GM": [601]}``) expanded by the table.
    mapping_csv: DLMUSE ``list_MUSE_mapping_derived.csv`` (composite index, name, single labels...).
    plane: slicing plane for the probe.
    stride: keep every stride-th slice of that plane.
    size: slice side in pixels (slices are resized to it before the encoder).
    epochs, lr, weight_decay, batch_size: head training.
    label_scale: labels are compared at ``label_scale`` x the token grid during training (memory).
    max_subjects: evaluate at most this many subjects (first ones of the cohort), None for all.
    encoder_kwargs: overrides of each encoder's build options for the probe (e.g. a larger
        ``img_size`` for a finer token grid).
    """

    structures: dict = field(default_factory=lambda: {"csf": [1], "gm": [2], "wm": [3], "ventricles": [4]})
    mapping_csv: str | None = None
    plane: str = "axial"
    stride: int = 2
    size: int = 112
    epochs: int = 40
    lr: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 64
    label_scale: int = 4
    max_subjects: int | None = None
    encoder_kwargs: dict = field(default_factory=dict)


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
    for k, (name, labels) in enumerate(structures.items(), start=1):
        for lab in labels:
            if lut[lab] not in (0, k):
                raise ValueError(f"label {lab} is in two structures ({name!r} and another)")
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


def token_box(info, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the slice region the encoder's token grid covers.

    A ``shorter``-side resize followed by a centre crop (timm ``crop_pct``) sees only the centre of
    a square slice; ``squash`` and ``longest`` see all of it.
    """
    resize = getattr(info, "resize", "squash")
    if resize == "shorter":
        height, width = info.input_size
        resize_size = getattr(info, "resize_size", None) or max(height, width)
        h = int(round(size * height / resize_size))
        w = int(round(size * width / resize_size))
        return (size - h) // 2, (size - w) // 2, h, w
    return 0, 0, size, size


class DenseLinearProbe:
    """1x1-conv head (tokens -> K+1 class logits) trained on standardised frozen tokens.

    Example:
        >>> probe = DenseLinearProbe(n_classes=4).fit(tokens, grid, labels)  # tokens (S, T, D)
        >>> proba = probe.predict_proba(tokens_test, grid, out_size=(112, 112))  # (S, 5, 112, 112)
    """

    def __init__(self, n_classes: int, epochs: int = 40, lr: float = 0.01, weight_decay: float = 1e-4,
                 batch_size: int = 64, seed: int = 0) -> None:
        self.n_classes = n_classes
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed

    def _grid(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = (tokens - self.mean_) / self.std_
        s, _, d = x.shape
        return x.transpose(1, 2).reshape(s, d, grid[0], grid[1])  # (S, D, gh, gw)

    def fit(self, tokens: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor) -> "DenseLinearProbe":
        """Trains the head.

        Args:
            tokens: (S, T, D) training tokens, T = gh * gw.
            grid: (gh, gw).
            labels: (S, h, w) int class maps (0..K) covering the token grid's field of view.
        """
        gen = torch.Generator().manual_seed(self.seed)
        tokens = tokens.float()
        flat = tokens.reshape(-1, tokens.shape[-1])
        self.mean_ = flat.mean(0)
        std = flat.std(0)
        # relative floor: random-init nets give tokens of order 1e-8 that still vary
        self.std_ = std.clamp_min(max(float(std.max()) * 1e-6, 1e-30))
        d = tokens.shape[-1]
        self.head_ = torch.nn.Conv2d(d, self.n_classes + 1, 1)
        torch.nn.init.normal_(self.head_.weight, std=0.01, generator=gen)
        torch.nn.init.zeros_(self.head_.bias)
        opt = torch.optim.AdamW(self.head_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n = len(tokens)
        labels = labels.long()
        # balanced class weights: small structures (ventricles) would otherwise be ignored
        counts = torch.bincount(labels.flatten(), minlength=self.n_classes + 1).float()
        weight = (counts.sum() / counts.clamp_min(1)) ** 0.5
        weight = weight / weight.mean()
        self.losses_: list[float] = []
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                logits = self.head_(self._grid(tokens[idx], grid))
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, labels[idx], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self.losses_.append(total / n)
        return self

    @torch.no_grad()
    def predict_proba(self, tokens: torch.Tensor, grid: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
        """(S, T, D) tokens -> (S, K+1, *out_size) class probabilities."""
        logits = self.head_(self._grid(tokens.float(), grid))
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.softmax(1)


def labels_in_box(labels: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crops (S, H, W) label slices to ``box`` and resamples them (nearest) to ``size``."""
    top, left, h, w = box
    crop = labels[:, top:top + h, left:left + w].float()[:, None]
    return F.interpolate(crop, size=size, mode="nearest-exact")[:, 0].long()


def place_in_box(maps: torch.Tensor, box: tuple[int, int, int, int], full: int) -> torch.Tensor:
    """(S, K, h, w) maps of the token field of view -> (S, K, full, full); outside is background."""
    top, left, h, w = box
    s, k = maps.shape[:2]
    out = maps.new_zeros((s, k, full, full))
    out[:, 0] = 1.0  # background outside the encoder's field of view
    out[:, :, top:top + h, left:left + w] = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    return out
