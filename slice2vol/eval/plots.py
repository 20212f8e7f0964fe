"""Figures of the benchmark: embedding maps, score bars with intervals, segmentation overlays.

Every function writes one PNG and returns its path; matplotlib runs headless (Agg). Embedding
projections are cached by a hash of the input matrix, so a rerun on unchanged embeddings does not
import UMAP (whose numba compilation costs ~10 s here).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def project_2d(x: np.ndarray, method: str, *, seed: int = 0, cache_dir: str | Path | None = None) -> np.ndarray:
    """(N, D) embeddings -> (N, 2) UMAP or t-SNE coordinates of the L2-normalised, standardised rows."""
    x = np.asarray(x, dtype=np.float32)
    key = hashlib.sha1(x.tobytes() + f"{method}{seed}{x.shape}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{method}-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    n = len(x)
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    z = (z - z.mean(0)) / np.maximum(z.std(0), 1e-8)
    z = np.nan_to_num(z)
    if n < 4 or float(z.std()) == 0.0:
        # degenerate input (sklearn's t-SNE crashes on constant rows): nothing to project
        return np.zeros((n, 2), dtype=np.float32)
    if method == "umap":
        import umap

        coords = umap.UMAP(n_neighbors=max(2, min(15, n - 1)), random_state=seed, n_jobs=1,
                           init="random" if n < 10 else "spectral").fit_transform(z)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        coords = TSNE(perplexity=max(2.0, min(30.0, (n - 1) / 3)), random_state=seed, init="pca").fit_transform(z)
    else:
        raise KeyError(f"unknown projection {method!r}; known: umap, tsne")
    coords = np.asarray(coords, dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, coords)
    return coords


def embedding_grid(sets: Mapping[str, tuple[Sequence[str], np.ndarray]], labels, label_types: Mapping[str, str],
                   method: str, path: str | Path, *, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """One panel per (label row, encoder column): the 2D map coloured by that label.

    Args:
        sets: encoder name -> (subject IDs, (N, D) embeddings).
        labels: DataFrame indexed by subject ID.
        label_types: label -> ``categorical`` or ``continuous``.
        method: ``umap`` or ``tsne``.
    """
    plt = _plt()
    names = list(sets)
    cols = [c for c in label_types if c in labels.columns] or [None]
    fig, axes = plt.subplots(len(cols), len(names), figsize=(3.2 * len(names), 3.0 * len(cols)), squeeze=False)
    for j, name in enumerate(names):
        ids, x = sets[name]
        coords = project_2d(x, method, seed=seed, cache_dir=cache_dir)
        for i, col in enumerate(cols):
            ax = axes[i, j]
            if col is None:
                ax.scatter(coords[:, 0], coords[:, 1], s=12)
            else:
                values = labels.reindex(list(ids))[col]
                if label_types[col] == "continuous":
                    sc = ax.scatter(coords[:, 0], coords[:, 1], c=values.astype(float), cmap="viridis", s=14)
                    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
                else:
                    cats = sorted(values.dropna().astype(str).unique())
                    for k, cat in enumerate(cats):
                        m = (values.astype(str) == cat).to_numpy()
                        ax.scatter(coords[m, 0], coords[m, 1], s=14, label=cat, color=plt.cm.tab10(k % 10))
                    ax.legend(fontsize=6, markerscale=0.8, loc="best")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(col or "", fontsize=9)
    fig.suptitle(f"{method.upper()} of volume embeddings (one point per subject)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)


def score_bars(rows: Sequence[Mapping], path: str | Path, *, title: str, group_key: str = "variant",
               bar_key: str = "encoder", metric_label: str = "", chance: float | None = None) -> Path:
    """Grouped bars of ``point`` with ``ci_low``/``ci_high`` whiskers.

    Args:
        rows: result rows with ``point``, ``ci_low``, ``ci_high`` and the two keys.
        group_key: x-axis groups (e.g. task/variant).
        bar_key: bars within a group (e.g. encoder).
        chance: draw a dashed line at this value (e.g. 0.5 for AUROC).
    """
    plt = _plt()
    groups = list(dict.fromkeys(str(r[group_key]) for r in rows))
    bars = list(dict.fromkeys(str(r[bar_key]) for r in rows))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.5 * len(groups) * len(bars)), 3.4))
    for b, bar in enumerate(bars):
        xs, ys, lo, hi = [], [], [], []
        for g, group in enumerate(groups):
            match = [r for r in rows if str(r[group_key]) == group and str(r[bar_key]) == bar]
            if not match:
                continue
            r = match[0]
            xs.append(g + (b - (len(bars) - 1) / 2) * width)
            ys.append(r["point"])
            lo.append(r["point"] - r["ci_low"] if _finite(r.get("ci_low")) else 0)
            hi.append(r["ci_high"] - r["point"] if _finite(r.get("ci_high")) else 0)
        ax.bar(xs, ys, width, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, label=bar,
               color=plt.cm.tab10(b % 10))
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8, rotation=15 if len(groups) > 3 else 0)
    ax.set_ylabel(metric_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def segmentation_overlay(image: np.ndarray, truth: np.ndarray, predictions: Mapping[str, np.ndarray],
                         class_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Ground truth and each encoder's prediction over one slice.

    Args:
        image: (H, W) slice in [0, 1].
        truth: (H, W) class indices (0 = background).
        predictions: encoder -> (H, W) class indices.
        class_names: names of classes 1..K.
    """
    plt = _plt()
    from matplotlib.colors import ListedColormap

    colours = [plt.cm.tab10(k % 10) for k in range(len(class_names))]
    cmap = ListedColormap(colours)
    panels = [("ground truth", truth), *predictions.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.1), squeeze=False)
    for ax, (name, lab) in zip(axes[0], panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        shown = np.ma.masked_where(lab == 0, lab - 1)
        ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(class_names) - 0.5, alpha=0.45, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    fig.legend(handles, class_names, loc="lower center", ncol=len(class_names), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(plt, fig, path)


def lesion_example(healthy: np.ndarray, lesioned: np.ndarray, lesion: np.ndarray, path: str | Path,
                   *, title: str = "") -> Path:
    """Healthy slice, the same slice with simulated lesions, and the lesion outline."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(8, 3))
    axes[0].imshow(healthy, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("held-out healthy", fontsize=8)
    axes[1].imshow(lesioned, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("simulated lesions", fontsize=8)
    axes[2].imshow(lesioned, cmap="gray", vmin=0, vmax=1)
    axes[2].contour(lesion.astype(float), levels=[0.5], colors="r", linewidths=0.8)
    axes[2].set_title("lesion mask", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, path)
