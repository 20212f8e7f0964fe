"""Pictures of a query and its neighbours: three orthogonal mid-slices each, similarity and labels.

``write_gallery`` writes a self-contained HTML page (PNG strips embedded as base64) or, for a
``.png`` path, one matplotlib figure. Slices are shown in the package's display convention
(:mod:`slice2vol.data.slicing`): superior/anterior at the top, patient left on the left, with the
physical aspect ratio of the voxels.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PANEL_PLANES = ("sagittal", "coronal", "axial")
PANEL_HEIGHT = 128


@dataclass
class Tile:
    """One row of the gallery: a subject's picture and caption."""

    title: str
    caption: str
    strip: np.ndarray  # (H, W) uint8
    is_query: bool = False


def mid_slices(volume: Any) -> list[np.ndarray]:
    """Three (rows, cols) float slices through the largest cross-sections of the head, in display orientation.

    Along each axis the slice with the largest (smoothed) head-mask area: for a field of view that
    includes the neck, the box centre or the centre of mass falls below the brain, while the
    widest axial section of a head is at the level of the ventricles.

    Args:
        volume: a :class:`slice2vol.data.io.Volume` (first channel is shown).

    Returns:
        [sagittal, coronal, axial] 2D arrays, each resized to :data:`PANEL_HEIGHT` rows with the
        physical aspect ratio.
    """
    from slice2vol.data.slicing import PLANES

    data = volume.data[0]
    mask = volume.mask if volume.mask is not None and volume.mask.any() else data > 0
    centre = [_largest_section(mask, axis) for axis in range(3)]
    spacing = volume.spacing
    panels = []
    for plane in PANEL_PLANES:
        axis = PLANES[plane]
        plane_2d = np.take(data, int(centre[axis]), axis=axis)  # (a, b): the other RAS axes in order
        rest = [i for i in range(3) if i != axis]
        # rows = later RAS axis flipped (superior/anterior on top), cols = earlier axis
        display = plane_2d.T[::-1]
        row_mm, col_mm = spacing[rest[1]], spacing[rest[0]]
        panels.append(_resize(display, PANEL_HEIGHT, row_mm, col_mm))
    return panels


def _largest_section(mask: np.ndarray, axis: int, window: int = 5) -> int:
    """Index of the slice along ``axis`` with the largest smoothed foreground area."""
    area = mask.sum(axis=tuple(i for i in range(3) if i != axis)).astype(float)
    if not area.any():
        return mask.shape[axis] // 2
    smooth = np.convolve(area, np.ones(window) / window, mode="same")
    best = np.flatnonzero(smooth >= smooth.max() - 1e-9)
    return int(best[len(best) // 2])


def _resize(image: np.ndarray, height: int, row_mm: float, col_mm: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    rows, cols = image.shape
    width = max(1, round(height * (cols * col_mm) / (rows * row_mm)))
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0].numpy()


def strip(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Panels side by side, intensities scaled to uint8 by the 1st-99.5th percentile of the whole."""
    values = np.concatenate([p.ravel() for p in panels])
    lo, hi = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    scale = 255.0 / max(hi - lo, 1e-8)
    height = max(p.shape[0] for p in panels)
    parts = []
    for i, panel in enumerate(panels):
        img = np.clip((panel - lo) * scale, 0, 255).astype(np.uint8)
        parts.append(np.pad(img, ((0, height - img.shape[0]), (0, 0))))
        if i < len(panels) - 1:
            parts.append(np.zeros((height, gap), np.uint8))
    return np.concatenate(parts, axis=1)


def placeholder(text_width: int = 3 * PANEL_HEIGHT) -> np.ndarray:
    """A grey strip for a subject whose image cannot be read."""
    img = np.full((PANEL_HEIGHT, text_width), 40, np.uint8)
    img[::8, :] = 60
    return img


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def caption(row: Mapping[str, Any], label_columns: Sequence[str]) -> str:
    parts = []
    for col in label_columns:
        value = row.get(col)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            value = "n/a"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{col} {value}")
    return ", ".join(parts)


def tiles_for(results: pd.DataFrame, query_name: str, query_volume: Any, neighbour_volume,
              label_columns: Sequence[str], query_labels: Mapping[str, Any] | None = None) -> list[Tile]:
    """Builds gallery rows: the query first, then each neighbour.

    Args:
        results: one query's rows of :meth:`Index.search` (rank, subject_id, similarity, labels).
        query_name: shown as the query's title.
        query_volume: its :class:`Volume`, or None (placeholder).
        neighbour_volume: callable subject_id -> Volume or None.
        label_columns: label columns to print.
        query_labels: labels of the query when known.
    """
    tiles = [Tile(f"query: {query_name}", caption(query_labels or {}, label_columns) if query_labels else "",
                  strip(mid_slices(query_volume)) if query_volume is not None else placeholder(), True)]
    for row in results.to_dict("records"):
        volume = neighbour_volume(row["subject_id"])
        tiles.append(Tile(f"#{row['rank']} {row['subject_id']}  similarity {row['similarity']:.4f}",
                          caption(row, label_columns),
                          strip(mid_slices(volume)) if volume is not None else placeholder()))
    return tiles


def write_html(tiles: Sequence[Tile], out: Path, title: str, subtitle: str = "") -> Path:
    rows = []
    for tile in tiles:
        data = base64.b64encode(png_bytes(tile.strip)).decode("ascii")
        cls = ' class="query"' if tile.is_query else ""
        rows.append(
            f'<tr{cls}><td class="t"><b>{html.escape(tile.title)}</b><br>{html.escape(tile.caption)}</td>'
            f'<td><img alt="{html.escape(tile.title)}: sagittal, coronal, axial mid-slices" '
            f'src="data:image/png;base64,{data}"></td></tr>')
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; background: #111; color: #ddd; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td {{ padding: 6px 10px; border-bottom: 1px solid #333; }}
td.t {{ min-width: 20em; vertical-align: middle; font-size: 0.95em; }}
tr.query td {{ background: #2a2a40; }} img {{ display: block; image-rendering: auto; }}
small {{ color: #999; }}
</style></head><body>
<h2>{html.escape(title)}</h2><p><small>{html.escape(subtitle)}</small></p>
<p><small>Each row: sagittal, coronal, axial slice through the largest cross-section of the head
(superior/anterior up, patient left on the left).</small></p>
<table>
{chr(10).join(rows)}
</table></body></html>
"""
    out.write_text(page)
    return out


def _clip(text: str, width: int = 64) -> str:
    """One line of at most ``width`` characters for the PNG's text column (the HTML keeps it whole):
    a 70,000-character subject ID pushed the images off the figure."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def write_png(tiles: Sequence[Tile], out: Path, title: str, subtitle: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    width = max(t.strip.shape[1] for t in tiles)
    fig_w = (width + 330) / 100
    fig, axes = plt.subplots(len(tiles), 1, figsize=(fig_w, 1.45 * len(tiles) + 0.6), squeeze=False)
    fig.patch.set_facecolor("black")
    for ax, tile in zip(axes[:, 0], tiles):
        ax.imshow(tile.strip, cmap="gray", vmin=0, vmax=255, interpolation="none")
        ax.set_xlim(-330, width)
        ax.set_axis_off()
        color = "#ffd27f" if tile.is_query else "white"
        ax.text(-320, tile.strip.shape[0] / 2, f"{_clip(tile.title)}\n{_clip(tile.caption)}", color=color,
                fontsize=8, va="center", ha="left", family="monospace")
    fig.suptitle(f"{_clip(title, 120)}\n{_clip(subtitle, 120)}", color="white", fontsize=9)
    with warnings.catch_warnings():
        # cosmetic: a layout matplotlib cannot tighten is still a readable figure (it printed two lines)
        warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
        fig.tight_layout()
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)
    return out


def write_gallery(index: Any, results: pd.DataFrame, out: str | Path, *, query_name: str,
                  query_images: Any = None, query_labels: Mapping[str, Any] | None = None) -> Path:
    """Writes the gallery of one query's neighbours.

    Args:
        index: the :class:`~slice2vol.retrieval.index.Index` searched (for image paths, labels,
            volume config).
        results: that query's rows of ``Index.search``.
        out: ``.html`` (self-contained) or ``.png``.
        query_name: title of the query row.
        query_images: the query's NIfTI file(s) or an already loaded Volume, or None.
        query_labels: labels of the query when it is an indexed subject.
    """
    from slice2vol.config import from_dict
    from slice2vol.data.io import VolumeConfig, VolumeError, load_volume

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    volume_cfg = from_dict(VolumeConfig, (index.provenance.get("pipeline") or {}).get("volume_cfg") or {})

    unreadable: set[str] = set()

    def load(images: Any, subject_id: str | None = None) -> Any:
        if images is None:
            return None
        if hasattr(images, "data") and hasattr(images, "mask"):
            return images
        key = repr(images)
        if key in unreadable:  # the query is often its own first neighbour: one warning per file
            return None
        try:
            return load_volume(images, volume_cfg, subject_id=subject_id)
        except VolumeError as err:
            unreadable.add(key)
            log.warning("gallery: %s", err)
            return None

    missing = [s for s in results["subject_id"] if index.image_paths(s) is None]
    if missing:
        log.warning("gallery: no image path recorded for %d neighbour(s) (build the index with "
                    "--manifest to show them)", len(missing))
    labels = [c for c in index.labels.columns]
    tiles = tiles_for(results, query_name, load(query_images), lambda s: load(index.image_paths(s), s),
                      labels, query_labels)
    title = f"{len(results)} nearest neighbours of {query_name}"
    subtitle = index.describe()
    if out.suffix.lower() == ".png":
        return write_png(tiles, out, title, subtitle)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{out}: gallery must be .html or .png")
    return write_html(tiles, out, title, subtitle)
