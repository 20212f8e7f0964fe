"""Figures of the benchmark: embedding maps, score bars with intervals, overlays, the cohort overview.

Every figure goes through :func:`save_figure`: a PNG at >= 150 dpi plus an SVG twin, cropped to the
drawn content (``bbox_inches="tight"``) so long titles and legends placed beside the axes are never
cut. Legends sit outside the data area. Every drawing function returns the PNG path; the SVG lies
beside it with the same stem. matplotlib runs headless (Agg). Embedding projections are cached by a
hash of the input matrix, so a rerun on unchanged embeddings does not import UMAP (whose numba
compilation costs ~10 s here).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


#: resolution of every PNG of the report (the issue asks for >= 150 dpi)
DPI = 150


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = DPI, svg: bool = True) -> tuple[Path, Path | None]:
    """Saves ``fig`` as ``<stem>.png`` (at ``dpi`` >= 150) and ``<stem>.svg``, then closes it.

    The bounding box is the drawn content (``bbox_inches="tight"``), so titles, colour bars and
    legends placed outside the axes are kept whole.

    Args:
        fig: a matplotlib Figure.
        path: target file; its suffix is replaced by ``.png`` / ``.svg``.
        dpi: PNG resolution; values under 150 are raised to 150.
        svg: also write the vector twin.

    Returns:
        (PNG path, SVG path or None).
    """
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    vector = path.with_suffix(".svg") if svg else None
    try:
        fig.savefig(png, dpi=max(int(dpi), DPI), bbox_inches="tight", pad_inches=0.08)
        if vector is not None:
            # text stays text in the SVG (editable in a paper), not outlined paths
            with plt.rc_context({"svg.fonttype": "none"}):
                fig.savefig(vector, bbox_inches="tight", pad_inches=0.08)
    finally:
        plt.close(fig)
    return png, vector


def _legend_outside(ax, **kwargs) -> None:
    """A legend to the right of ``ax``, outside the data (``save_figure`` keeps it in the crop)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  frameon=False, **kwargs)


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
        from slice2vol.eval.experiment import PROJECTIONS

        raise KeyError(f"unknown projection {method!r}; known: {', '.join(PROJECTIONS)}")
    coords = np.asarray(coords, dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, coords)
    return coords


def embedding_grid(sets: Mapping[str, tuple[Sequence[str], np.ndarray]], labels, label_types: Mapping[str, str],
                   method: str, path: str | Path, *, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """One panel per (label row, encoder column): the 2D map coloured by that label.

    Categories keep one colour across a row, and the row's legend (or colour bar) sits to the right
    of its last panel, outside the data.

    Args:
        sets: encoder name -> (subject IDs, (N, D) embeddings).
        labels: DataFrame indexed by subject ID.
        label_types: label -> ``categorical`` or ``continuous``.
        method: ``umap`` or ``tsne``.

    Returns:
        The PNG path (an SVG twin lies beside it).
    """
    plt = _plt()
    names = list(sets)
    cols = [c for c in label_types if c in labels.columns] or [None]
    fig, axes = plt.subplots(len(cols), len(names), figsize=(2.6 * len(names) + 1.4, 2.5 * len(cols)),
                             squeeze=False)
    coords_of = {name: project_2d(sets[name][1], method, seed=seed, cache_dir=cache_dir) for name in names}
    for i, col in enumerate(cols):
        if col is not None and label_types[col] == "continuous":
            values_all = labels[col].astype(float)
            vmin, vmax = float(np.nanmin(values_all)), float(np.nanmax(values_all))
        cats = sorted(labels[col].dropna().astype(str).unique()) if col is not None else []
        for j, name in enumerate(names):
            ids = list(sets[name][0])
            coords = coords_of[name]
            ax = axes[i, j]
            if col is None:
                ax.scatter(coords[:, 0], coords[:, 1], s=10)
            elif label_types[col] == "continuous":
                values = labels.reindex(ids)[col].astype(float)
                sc = ax.scatter(coords[:, 0], coords[:, 1], c=values, cmap="viridis", s=12, vmin=vmin, vmax=vmax)
                if j == len(names) - 1:
                    bar = fig.colorbar(sc, ax=ax, fraction=0.05, pad=0.03)
                    bar.set_label(col, fontsize=7)
                    bar.ax.tick_params(labelsize=6)
            else:
                values = labels.reindex(ids)[col].astype(str)
                for k, cat in enumerate(cats):
                    m = (values == cat).to_numpy()
                    ax.scatter(coords[m, 0], coords[m, 1], s=12, label=cat, color=plt.cm.tab10(k % 10))
                if j == len(names) - 1:
                    _legend_outside(ax, fontsize=7, markerscale=0.9, title=col, title_fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(col or "", fontsize=8)
    fig.suptitle(f"{method.upper()} of volume embeddings (one point per subject)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)[0]


def score_bars(rows: Sequence[Mapping], path: str | Path, *, title: str, group_key: str = "variant",
               bar_key: str = "encoder", metric_label: str = "", chance: float | None = None,
               value_key: str | None = None) -> Path:
    """Grouped bars of each row's estimate with ``ci_low``/``ci_high`` whiskers; legend beside the axes.

    Args:
        rows: result rows with an estimate (``estimate``, or the older ``point``), ``ci_low``,
            ``ci_high`` and the two keys.
        group_key: x-axis groups (e.g. task/variant).
        bar_key: bars within a group (e.g. encoder).
        chance: draw a dashed line at this value (e.g. 0.5 for AUROC).
        value_key: the estimate's key (default: ``estimate`` when present, else ``point``).

    Returns:
        The PNG path (an SVG twin lies beside it).
    """
    plt = _plt()
    groups = list(dict.fromkeys(str(r[group_key]) for r in rows))
    bars = list(dict.fromkeys(str(r[bar_key]) for r in rows))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(3.6, 1.0 + 0.45 * len(groups) * len(bars)), 3.2))
    for b, bar in enumerate(bars):
        xs, ys, lo, hi = [], [], [], []
        for g, group in enumerate(groups):
            match = [r for r in rows if str(r[group_key]) == group and str(r[bar_key]) == bar]
            if not match:
                continue
            r = match[0]
            key = value_key or ("estimate" if "estimate" in r else "point")
            y = r[key]
            if not _finite(y):
                continue
            xs.append(g + (b - (len(bars) - 1) / 2) * width)
            ys.append(y)
            lo.append(y - r["ci_low"] if _finite(r.get("ci_low")) else 0)
            hi.append(r["ci_high"] - y if _finite(r.get("ci_high")) else 0)
        ax.bar(xs, ys, width, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2.5, label=bar,
               color=plt.cm.tab10(b % 10), error_kw={"linewidth": 0.9})
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xticks(range(len(groups)))
    long_names = max((len(g) for g in groups), default=0) > 12
    ax.set_xticklabels(groups, fontsize=8, rotation=20 if long_names or len(groups) > 3 else 0,
                       ha="right" if long_names or len(groups) > 3 else "center")
    ax.set_ylabel(metric_label, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9.5)
    _legend_outside(ax, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)[0]


def score_panels(rows: Sequence[Mapping], path: str | Path, *, title: str, panel_key: str = "probe",
                 bar_key: str = "encoder", metric_label: str = "", chance: float | None = None,
                 reference: str | None = None, lower_is_better: bool = False) -> Path:
    """Horizontal bars (one row per set, sets top to bottom in ``rows`` order) with 95% whiskers,
    one panel per ``panel_key`` value; readable with a dozen sets, unlike grouped vertical bars.

    Args:
        rows: result rows with ``estimate``, ``ci_low``, ``ci_high`` and the two keys.
        reference: a set drawn darker, with a dotted line at its estimate in every panel.
        lower_is_better: said in the x label.

    Returns:
        The PNG path (an SVG twin lies beside it).
    """
    plt = _plt()
    panels = list(dict.fromkeys(str(r[panel_key]) for r in rows))
    bars = list(dict.fromkeys(str(r[bar_key]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 3.4 * len(panels), 0.9 + 0.28 * len(bars)),
                             sharey=True, squeeze=False)
    ys = np.arange(len(bars))[::-1]
    for ax, panel in zip(axes[0], panels):
        for y, bar in zip(ys, bars):
            r = next((r for r in rows if str(r[panel_key]) == panel and str(r[bar_key]) == bar), None)
            if r is None or not _finite(r.get("estimate")):
                continue
            est = r["estimate"]
            lo = est - r["ci_low"] if _finite(r.get("ci_low")) else 0
            hi = r["ci_high"] - est if _finite(r.get("ci_high")) else 0
            ax.barh(y, est, height=0.7, color="#34495e" if bar == reference else "#8fb3d9",
                    xerr=[[max(lo, 0)], [max(hi, 0)]], error_kw={"linewidth": 0.9, "capsize": 2})
            if bar == reference:
                ax.axvline(est, color="#34495e", linestyle=":", linewidth=0.9)
        if chance is not None:
            ax.axvline(chance, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(metric_label + (" (lower is better)" if lower_is_better else ""), fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(bars)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)[0]


def cohort_overview(cohort, path: str | Path, *, max_subjects: int = 8, title: str | None = None) -> Path:
    """Mid-slices (axial, coronal, sagittal) of the first subjects of a cohort with their labels.

    Where a subject has a ``lesion_mask`` map with voxels set, each plane shows the slice through
    the lesion centre instead of the middle one.

    Args:
        cohort: a :class:`slice2vol.data.Cohort` (or a manifest path).
        path: PNG target (an SVG twin is written beside it).
        max_subjects: columns shown.

    Returns:
        The PNG path.
    """
    plt = _plt()
    from slice2vol.data import SliceConfig, load_manifest, load_subject, slice_volume

    if isinstance(cohort, (str, Path)):
        cohort = load_manifest(cohort)
    shown = cohort.subjects[:max_subjects]
    fig, axes = plt.subplots(3, len(shown), figsize=(1.7 * len(shown) + 0.6, 5.6), squeeze=False)
    for col, subject in enumerate(shown):
        volume = load_subject(subject)
        planes = slice_volume(volume, SliceConfig(size=None, min_foreground=0.0))
        lesion = volume.maps.get("lesion_mask")
        for row, name in enumerate(("axial", "coronal", "sagittal")):
            plane = planes[name]
            index = len(plane) // 2
            if lesion is not None and lesion.any():  # show the slice through the lesion centre
                axis = {"sagittal": 0, "coronal": 1, "axial": 2}[name]
                centre = int(np.round(np.asarray(lesion.nonzero()[axis], dtype=float).mean()))
                positions = list(np.asarray(plane.indices))
                index = positions.index(centre) if centre in positions else index
            ax = axes[row, col]
            ax.imshow(plane.images[index, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("\n".join([subject.subject_id] + [f"{k}={v}" for k, v in subject.labels.items()]),
                             fontsize=6)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title or f"Cohort: {len(cohort)} subjects (first {len(shown)} shown)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)[0]


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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    # below the panels, outside the images
    fig.legend(handles, class_names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(class_names),
               fontsize=7, frameon=False)
    return save_figure(fig, path)[0]


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
    return save_figure(fig, path)[0]
