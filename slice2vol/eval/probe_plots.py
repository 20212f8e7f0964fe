"""Figures of the dense probes: Dice bars with controls, overlays, AUROC bars, sweep heat maps, lesions.

Every function takes plain arrays/rows (what the task modules cache), draws one figure and saves
it with :func:`slice2vol.eval.plots.save_figure` (PNG at >= 150 dpi plus SVG); it returns the
(PNG, SVG) paths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from slice2vol.eval.plots import _plt, save_figure

#: colours of the set kinds, so that controls look like controls in every figure
KIND_COLOURS = {"encoder": "#1f77b4", "twin": "#9ecae1", "control": "#bdbdbd", "other": "#ff7f0e"}


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(v)


def grouped_bars(rows: Sequence[Mapping], path: str | Path, *, groups: Sequence[str], sets: Sequence[str],
                 kinds: Mapping[str, str], title: str, ylabel: str, group_key: str = "label",
                 chance: float | None = None, ylim: tuple[float, float] | None = None):
    """Bars of ``estimate`` with [ci_low, ci_high] whiskers: one group per ``groups`` value, one bar per set.

    Args:
        rows: dicts with ``encoder``, ``group_key``, ``estimate``, ``ci_low``, ``ci_high``.
        kinds: set -> ``encoder``/``twin``/``control`` (colour and hatch).
    """
    plt = _plt()
    lookup = {(r["encoder"], r[group_key]): r for r in rows}
    width = 0.8 / max(len(sets), 1)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(groups) * max(len(sets), 2) * 0.45 + 1.5), 3.6))
    palette = plt.get_cmap("tab10")
    enc_index = 0
    for j, name in enumerate(sets):
        kind = kinds.get(name, "other")
        if kind == "encoder":
            colour = palette(enc_index % 10)
            enc_index += 1
        else:
            colour = KIND_COLOURS.get(kind, KIND_COLOURS["other"])
        xs, ys, err_lo, err_hi = [], [], [], []
        for g, group in enumerate(groups):
            r = lookup.get((name, group))
            if r is None or not _finite(r.get("estimate")):
                continue
            xs.append(g + (j - (len(sets) - 1) / 2) * width)
            ys.append(r["estimate"])
            lo, hi = r.get("ci_low"), r.get("ci_high")
            err_lo.append(r["estimate"] - lo if _finite(lo) else 0.0)
            err_hi.append(hi - r["estimate"] if _finite(hi) else 0.0)
        ax.bar(xs, ys, width * 0.92, color=colour, label=name, hatch="//" if kind == "twin" else None,
               edgecolor="#444444" if kind != "encoder" else None, linewidth=0.5)
        ax.errorbar(xs, ys, yerr=[err_lo, err_hi], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # no bar (every set skipped): matplotlib's 2-line warning otherwise
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def segmentation_overlays(image: np.ndarray, truth: np.ndarray, predictions: Mapping[str, np.ndarray],
                          classes: Sequence[str], path: str | Path, *, title: str):
    """The ground truth and each set's prediction of one slice, coloured by class over the image."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    panels = [("truth", truth)] + list(predictions.items())
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    cmap = ListedColormap(plt.get_cmap("tab10").colors[: max(len(classes), 1)])
    for ax, (name, labels) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", interpolation="nearest")
        masked = np.ma.masked_where(labels == 0, labels - 1)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=max(len(classes) - 1, 1), alpha=0.45, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(classes))]
    fig.legend(handles, classes, loc="lower center", ncol=len(classes), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def sweep_heatmaps(grids: Mapping[str, np.ndarray], contrasts: Sequence[float], radii: Sequence[float],
                   path: str | Path, *, title: str, metric: str = "pixel AUROC", vmin: float = 0.5,
                   vmax: float = 1.0):
    """One heat map per set: ``metric`` at every (contrast, radius) of the difficulty sweep.

    Args:
        grids: set -> (len(contrasts), len(radii)) values.
    """
    plt = _plt()
    names = list(grids)
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.7 * rows), squeeze=False)
    im = None
    for k, (ax, name) in enumerate(zip(axes.flat, names)):
        grid = np.asarray(grids[name], dtype=float)
        im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(len(radii)))
        ax.set_xticklabels([f"{r:g}" for r in radii], fontsize=7)
        ax.set_yticks(range(len(contrasts)))
        ax.set_yticklabels([f"{c:g}" for c in contrasts], fontsize=7)
        ax.set_xlabel("lesion radius (mm)", fontsize=8)
        if k % cols == 0:  # first column only: the label ran into the neighbouring panel
            ax.set_ylabel("|contrast|", fontsize=8)
        ax.set_title(name, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=metric)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def lesion_examples(healthy: np.ndarray, lesioned: np.ndarray, lesion: np.ndarray, scores: Mapping[str, np.ndarray],
                    path: str | Path, *, title: str):
    """Healthy and lesioned slice, the lesion outline, and each set's voxel anomaly scores."""
    plt = _plt()
    panels = 3 + len(scores)
    cols = min(panels, 5)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.7 * rows), squeeze=False)
    flat = list(axes.flat)
    flat[0].imshow(healthy, cmap="gray", vmin=0, vmax=1)
    flat[0].set_title("healthy", fontsize=8)
    flat[1].imshow(lesioned, cmap="gray", vmin=0, vmax=1)
    flat[1].set_title("with simulated lesions", fontsize=8)
    flat[2].imshow(lesioned, cmap="gray", vmin=0, vmax=1)
    if lesion.any():
        flat[2].contour(lesion.astype(float), levels=[0.5], colors="red", linewidths=0.8)
    flat[2].set_title("lesion mask", fontsize=8)
    for ax, (name, s) in zip(flat[3:], scores.items()):
        ax.imshow(lesioned, cmap="gray", vmin=0, vmax=1)
        shown = np.ma.masked_where(s <= 0, s)
        ax.imshow(shown, cmap="magma", alpha=0.6)
        if lesion.any():
            ax.contour(lesion.astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(name, fontsize=8)
    for ax in flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
