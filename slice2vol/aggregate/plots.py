"""Plots of aggregator attention: which slices mattered, per plane."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def plot_attention(
    attention: Sequence[dict[str, np.ndarray]],
    coords: Sequence[dict[str, np.ndarray]],
    out_dir: str | Path,
    *,
    labels: Sequence | None = None,
    title: str = "",
    plane_names: Sequence[str] | None = None,
) -> list[Path]:
    """One PNG per plane: each subject's slice weights against slice position.

    Weights are shown relative to uniform attention (weight x number of slices in the bag, so
    1 = "an average slice"), which makes bags of different lengths comparable. With ``labels``,
    the per-class mean curve (on a common 2 mm position grid) is drawn over the thin lines.

    Args:
        attention: per subject, ``plane -> (S,)`` weights (optionally ``"planes" -> (P,)``).
        coords: per subject, ``plane -> (S,)`` slice position (mm, centred).
        out_dir: where ``attention_<plane>.png`` (and ``attention_planes.png``) are written.
        labels: optional (N,) class of each subject for colouring.
        title: figure title prefix.
        plane_names: the planes, in order, of ``"planes"`` weights (fusion with plane attention).

    Returns:
        The written paths.
    """
    from matplotlib.figure import Figure  # no pyplot: works under any backend, no global state

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    total = [sum(len(w) for k, w in a.items() if k != "planes") for a in attention]
    planes = [p for p in ("axial", "coronal", "sagittal") if any(p in a for a in attention)]
    classes = list(dict.fromkeys(labels)) if labels is not None else [None]
    colours = {c: f"C{i}" for i, c in enumerate(classes)}
    for plane in planes:
        fig = Figure(figsize=(6, 3.5), dpi=110)
        ax = fig.add_subplot()
        curves: dict = {c: [] for c in classes}
        lo = min(coords[i][plane].min() for i, a in enumerate(attention) if plane in a)
        hi = max(coords[i][plane].max() for i, a in enumerate(attention) if plane in a)
        grid = np.arange(np.floor(lo), np.ceil(hi) + 2, 2.0)
        for i, a in enumerate(attention):
            if plane not in a:
                continue
            c = coords[i][plane]
            rel = a[plane] * total[i]
            cls = labels[i] if labels is not None else None
            ax.plot(c, rel, color=colours[cls], alpha=0.15, lw=0.7)
            curves[cls].append(np.interp(grid, c, rel, left=np.nan, right=np.nan))
        for cls, rows in curves.items():
            if rows:
                stack = np.stack(rows)
                count = np.isfinite(stack).sum(0)
                mean = np.where(count > 0, np.nansum(stack, 0) / np.maximum(count, 1), np.nan)
                ax.plot(grid, mean, color=colours[cls], lw=2,
                        label=f"mean ({cls})" if cls is not None else f"mean (n={len(rows)})")
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="uniform")
        ax.set_xlabel(f"{plane} slice position (mm, centred)")
        ax.set_ylabel("attention x slices")
        ax.set_title(f"{title} {plane}".strip())
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = out_dir / f"attention_{plane}.png"
        fig.savefig(path)
        paths.append(path)
    plane_w = [a["planes"] for a in attention if "planes" in a]
    if plane_w:
        fig = Figure(figsize=(4, 3), dpi=110)
        ax = fig.add_subplot()
        w = np.stack(plane_w)
        names = list(plane_names) if plane_names is not None else [str(i) for i in range(w.shape[1])]
        ax.bar(range(w.shape[1]), w.mean(0), yerr=w.std(0), capsize=3)
        ax.set_xticks(range(w.shape[1]), names)
        ax.set_ylabel("plane attention (mean ± sd)")
        ax.set_title(f"{title} planes".strip())
        fig.tight_layout()
        path = out_dir / "attention_planes.png"
        fig.savefig(path)
        paths.append(path)
    return paths
