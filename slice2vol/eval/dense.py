"""Dense (per-pixel) features of 2D encoders for the segmentation and anomaly probes.

This module owns the geometry that links a volume, its slices, an encoder's intermediate feature
maps and a per-pixel prediction back on the volume's own voxel grid:

1. every slice of one plane is cut from the volume (:func:`slice2vol.data.slice_volume`, keeping
   the physical aspect ratio) and zero-padded to a square of ``slice_size`` pixels: the *label
   resolution* of the probe (``slice_size`` close to the volume's in-plane size keeps labels exact);
2. the encoder preprocesses each slice to its own input size (the *probe input size*, chosen with
   ``build_encoder(key, weights, img_size=...)`` independently of the caching size) and returns
   the feature maps of the selected levels through ``Encoder.feature_maps`` (CONTRACTS section 1):
   level ``l`` has stride ``s_l`` and a grid of ``input / s_l`` cells per side;
3. a level's map covers :func:`token_box` of the padded slice (all of it unless the encoder's
   preprocessing centre-crops), so a pixel centre ``(i + 0.5) / h`` of that box sits at the same
   relative position in every level's map; bilinear sampling there (``grid_sample``,
   ``align_corners=False``) equals ``F.interpolate(..., mode="bilinear")`` of the whole map;
4. per-slice predictions in box coordinates are padded back to the square slice and put back on
   the volume grid with :func:`slice2vol.data.slices_to_grid`.

Maps are kept as float16 with a per-channel scale (so random-init networks, whose activations can be
of order 1e-8, keep their precision), which halves memory and lets :class:`DenseSlices` be written
to ``.npz`` (never pickle) and reused by both probes.

The raw-intensity control (:class:`IntensityFeatures`) implements the same ``feature_info`` /
``feature_maps`` interface, so the probes run on it exactly as on an encoder.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.data.slicing import PLANES, PlaneSlices, SliceConfig, slice_volume

log = logging.getLogger(__name__)


@dataclass
class Level:
    """A feature level (same fields as ``slice2vol.encoders.base.FeatureLevel``).

    Attributes:
        index: position in the encoder's ``feature_info()`` (0 = shallowest).
        name: the library's module name (or a control's own name).
        channels: C_l.
        stride: input pixels per cell along H and W.
    """

    index: int
    name: str
    channels: int
    stride: int


def _as_level(level: Any) -> Level:
    return Level(int(level.index), str(level.name), int(level.channels), int(level.stride))


def select_levels(info: Sequence[Any], selectors: Sequence[int | str]) -> list[int]:
    """Indices into ``info`` (an encoder's ``feature_info()``) picked by ``selectors``.

    Selectors: an int (position, negative from the end), ``"last"``, ``"last:N"`` (the N deepest
    levels), ``"stride:S"`` (the deepest level whose stride is S, e.g. the end of a CNN stage), or
    ``"name:NAME"``. Order follows ``info`` and duplicates are dropped.

    Raises:
        ValueError: a selector that matches nothing, naming the levels there are.
    """
    info = [_as_level(lv) for lv in info]
    if not info:
        raise ValueError("the encoder reports no feature levels")
    n = len(info)
    chosen: set[int] = set()
    for sel in selectors:
        text = str(sel)
        picked: list[int]
        if isinstance(sel, (int, np.integer)) or text.lstrip("-").isdigit():
            i = int(text)
            if not -n <= i < n:
                raise ValueError(f"level {i} out of range: the encoder has {n} levels")
            picked = [i % n]
        elif text == "last":
            picked = [n - 1]
        elif text.startswith("last:"):
            picked = list(range(max(n - int(text[5:]), 0), n))
        elif text.startswith("stride:"):
            stride = int(text[7:])
            picked = [i for i, lv in enumerate(info) if lv.stride == stride][-1:]
        elif text.startswith("name:"):
            picked = [i for i, lv in enumerate(info) if lv.name == text[5:]]
        else:
            raise ValueError(f"unknown level selector {sel!r}: use an index, 'last', 'last:N', 'stride:S' or "
                             "'name:NAME'")
        if not picked:
            have = ", ".join(f"{lv.index}:{lv.name}(stride {lv.stride})" for lv in info)
            raise ValueError(f"level selector {sel!r} matches no level; levels: {have}")
        chosen.update(picked)
    return sorted(chosen)


def token_box(info: Any, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the square ``size`` slice that an encoder's input covers.

    A ``shorter``-side resize followed by a centre crop (timm ``crop_pct`` < 1, torchvision's
    ``resize_size``) sees only the centre of a square slice; ``squash`` and ``longest`` see all of
    it (``longest`` pads a square image nowhere).
    """
    resize = getattr(info, "resize", "squash")
    if resize == "shorter":
        height, width = info.input_size
        resize_size = getattr(info, "resize_size", None) or max(height, width)
        h = int(round(size * height / resize_size))
        w = int(round(size * width / resize_size))
        return (size - h) // 2, (size - w) // 2, h, w
    return 0, 0, size, size


# -- per-volume dense features ------------------------------------------------------------------
@dataclass
class DenseSlices:
    """Feature maps of slices of one plane of one volume, with the geometry to map them back.

    Attributes:
        plane: slicing plane.
        indices: (S,) slice index along the plane's RAS axis.
        maps: per level, (S, C_l, h_l, w_l) float16 maps divided by ``scales``.
        scales: per level, (C_l,) float32: true features = ``maps * scales[:, None, None]``.
        levels: the :class:`Level` of each map.
        box: (top, left, height, width) of the square slice the maps cover (:func:`token_box`).
        slice_size: side of the padded square slice (label resolution).
        content_box: the volume slice inside the padded square (from :class:`PlaneSlices`).
        grid_shape: in-plane (rows, cols) of the volume.
        labels: optional (S, slice_size, slice_size) int32 segmentation slices (raw label values).
        mask: optional (S, slice_size, slice_size) bool brain-mask slices (the segmentation's
            non-zero voxels, else the head mask), for the anomaly probe.
        spacing: (X, Y, Z) voxel size of the volume in mm.
        n_slices: slices of the plane in the whole volume.
        brain_box: (z0, z1, r0, r1, c0, c1) extent in mm of the brain (the mask above, over the
            whole volume) along the plane's axis (slice index x spacing) and the display rows and
            columns (voxel centre x spacing): the frame of position-aware anomaly scoring.
    """

    plane: str
    indices: np.ndarray
    maps: list[np.ndarray]
    scales: list[np.ndarray]
    levels: list[Level]
    box: tuple[int, int, int, int]
    slice_size: int
    content_box: tuple[int, int, int, int]
    grid_shape: tuple[int, int]
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    n_slices: int = 0
    brain_box: tuple | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def dim(self) -> int:
        return int(sum(lv.channels for lv in self.levels))

    def level(self, j: int, rows: np.ndarray | slice | None = None) -> torch.Tensor:
        """Level ``j`` as float32 (S', C_l, h_l, w_l) for the slice rows ``rows`` (default all)."""
        m = self.maps[j] if rows is None else self.maps[j][rows]
        return torch.from_numpy(np.asarray(m, dtype=np.float32)) * torch.from_numpy(self.scales[j])[None, :, None, None]

    def plane_slices(self, rows: np.ndarray | None = None) -> PlaneSlices:
        """A :class:`PlaneSlices` with the geometry (no images) for :func:`slices_to_grid`."""
        idx = self.indices if rows is None else self.indices[rows]
        return PlaneSlices(plane=self.plane, images=torch.zeros(0), indices=idx, positions=np.zeros((len(idx), 3)),
                           foreground=np.zeros(len(idx), np.float32), labels=None, grid_shape=self.grid_shape,
                           content_box=self.content_box)

    def subset(self, rows: np.ndarray) -> "DenseSlices":
        """The slices at positions ``rows`` (same scales)."""
        return dataclasses.replace(self, indices=self.indices[rows], maps=[m[rows] for m in self.maps],
                                   labels=None if self.labels is None else self.labels[rows],
                                   mask=None if self.mask is None else self.mask[rows])

    # -- npz round trip (no pickle) -------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"plane": self.plane, "levels": [dataclasses.asdict(lv) for lv in self.levels], "box": list(self.box),
                "slice_size": self.slice_size, "content_box": list(self.content_box),
                "grid_shape": list(self.grid_shape), "spacing": list(self.spacing), "n_slices": self.n_slices,
                "brain_box": None if self.brain_box is None else list(self.brain_box)}
        arrays = {"indices": self.indices, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for j, (m, s) in enumerate(zip(self.maps, self.scales)):
            arrays[f"map{j}"], arrays[f"scale{j}"] = m, s
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.mask is not None:
            arrays["mask"] = self.mask
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DenseSlices":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            n = len(meta["levels"])
            return cls(plane=meta["plane"], indices=z["indices"], maps=[z[f"map{j}"] for j in range(n)],
                       scales=[z[f"scale{j}"] for j in range(n)], levels=[Level(**lv) for lv in meta["levels"]],
                       box=tuple(meta["box"]), slice_size=int(meta["slice_size"]),
                       content_box=tuple(meta["content_box"]), grid_shape=tuple(meta["grid_shape"]),
                       labels=z["labels"] if "labels" in z.files else None,
                       mask=z["mask"] if "mask" in z.files else None, spacing=tuple(meta["spacing"]),
                       n_slices=int(meta["n_slices"]),
                       brain_box=None if meta.get("brain_box") is None else tuple(meta["brain_box"]))


def brain_box(volume: Any, plane: str) -> tuple[float, ...] | None:
    """(z0, z1, r0, r1, c0, c1) mm extent of the brain (segmentation non-zero, else the head mask)
    in the frame of a plane's slices: through-plane index x spacing, display row/column centres."""
    from slice2vol.data.slicing import _IN_PLANE, _plane_view

    seg = getattr(volume, "seg", None)
    brain = seg > 0 if seg is not None and (seg > 0).any() else np.asarray(volume.mask, bool)
    if not brain.any():
        return None
    view = _plane_view(torch.from_numpy(np.ascontiguousarray(brain)), plane).numpy()   # (n, rows, cols)
    z = np.flatnonzero(view.any((1, 2)))
    r = np.flatnonzero(view.any((0, 2)))
    c = np.flatnonzero(view.any((0, 1)))
    sz = volume.spacing[PLANES[plane]]
    r_axis, c_axis = _IN_PLANE[plane]
    sr, sc = volume.spacing[r_axis], volume.spacing[c_axis]
    return (float(z[0] * sz), float(z[-1] * sz), float((r[0] + 0.5) * sr), float((r[-1] + 0.5) * sr),
            float((c[0] + 0.5) * sc), float((c[-1] + 0.5) * sc))


def _to_half(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -65000, 65000).astype(np.float16)


def _quantize(maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(S, C, h, w) float32 -> float16 maps scaled per channel to max |x| = 1, and the (C,) scales.

    In float32 torch (random-init features of ~1e-8 are normal float32 numbers, so the per-channel
    scaling loses nothing): the float64 round trip through numpy cost a tenth of the extraction.
    """
    maps = maps.float()
    scale = maps.abs().amax(dim=(0, 2, 3))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (maps / scale[None, :, None, None]).clamp_(-65000, 65000).half().numpy(), scale.numpy()


def slice_config(plane: str, slice_size: int, context: int = 1) -> SliceConfig:
    """Every slice of ``plane`` (no stride, no foreground filter) padded to ``slice_size``."""
    return SliceConfig(planes=(plane,), stride=1, min_foreground=0.0, context=context, size=slice_size)


def _feature_maps(encoder: Any, images: torch.Tensor, levels: list[int], batch_size: int,
                  slice_coords: np.ndarray | None, norm: bool) -> list[torch.Tensor]:
    fn = encoder.feature_maps
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"levels": levels, "batch_size": batch_size}
    if slice_coords is not None and "slice_coords" in params:
        kwargs["slice_coords"] = slice_coords
    if "norm" in params:  # transformer blocks: the model's final norm, as DINOv2's linear probe
        kwargs["norm"] = norm
    return fn(images, **kwargs)


def extract_dense(encoder: Any, volume: Any, plane: str, slice_size: int, levels: Sequence[int | str],
                  *, rows: np.ndarray | None = None, batch_size: int = 32, context: int = 1,
                  keep_labels: bool = True, norm: bool = True) -> DenseSlices:
    """Dense features of the slices of one plane of a volume.

    Args:
        encoder: anything with ``feature_info()``, ``feature_maps(images, levels, batch_size)`` and
            ``info`` (a slice2vol ``Encoder`` or :class:`IntensityFeatures`).
        volume: :class:`~slice2vol.data.io.Volume`, data (C, X, Y, Z) in [0, 1].
        plane: ``axial``, ``coronal`` or ``sagittal``.
        slice_size: padded square slice side (label resolution).
        levels: level selectors (:func:`select_levels`).
        rows: only these slice indices along the plane (default: every slice).
        context: 2.5D stack depth (as :class:`SliceConfig`).
        keep_labels: keep the segmentation slices (raw label values) when the volume has one.
        norm: ask for normalised transformer block outputs (``feature_maps(norm=True)``, DINOv2's
            linear segmentation protocol); CNN stages have no such norm.

    Returns:
        :class:`DenseSlices` with one map per selected level.
    """
    info = [_as_level(lv) for lv in encoder.feature_info()]
    chosen = select_levels(info, levels)
    n_slices = volume.shape[PLANES[plane]]
    if rows is None:
        ps = slice_volume(volume, slice_config(plane, slice_size, context))[plane]
        keep = np.arange(len(ps))
    else:
        # slice only the asked slices (plus their 2.5D neighbours): a sub-volume has the same
        # in-plane geometry, so its slices are those of the whole volume
        rows = np.asarray(rows, dtype=np.int64)
        half = context // 2
        span = np.unique(np.clip((rows[:, None] + np.arange(-half, half + 1)[None]).ravel(), 0, n_slices - 1))
        axis = PLANES[plane]
        sub = dataclasses.replace(volume, data=np.take(volume.data, span, axis=axis + 1),
                                  mask=np.take(volume.mask, span, axis=axis),
                                  seg=None if volume.seg is None else np.take(volume.seg, span, axis=axis))
        ps = slice_volume(sub, slice_config(plane, slice_size, context))[plane]
        ps.indices = span
        keep = np.searchsorted(span, rows)
    images = ps.images[torch.as_tensor(keep)] if rows is not None else ps.images
    coords = (ps.indices[keep] + 0.5) / n_slices
    maps = _feature_maps(encoder, images, [info[i].index for i in chosen], batch_size, coords, norm)
    if len(maps) != len(chosen):
        raise ValueError(f"feature_maps returned {len(maps)} maps for {len(chosen)} requested levels")
    stored, scales = [], []
    for m in maps:
        q, s = _quantize(m.detach().float().cpu())
        stored.append(q)
        scales.append(s)
    keep_t = torch.as_tensor(keep)
    labels = mask = None
    if ps.labels is not None:
        seg_slices = ps.labels[keep_t].numpy()
        # int32 as the volume keeps them: int16 wrapped labels above 32767 (70051 became 4515, background)
        labels = seg_slices.astype(np.int32) if keep_labels else None
        mask = seg_slices > 0
    if mask is None or not mask.any():  # no segmentation: the head mask, sliced the same way
        head = dataclasses.replace(volume, seg=np.asarray(volume.mask, dtype=np.int64))
        every = slice_volume(head, slice_config(plane, slice_size, 1))[plane].labels.numpy() > 0
        mask = every[ps.indices[keep]]
    return DenseSlices(plane=plane, indices=ps.indices[keep].astype(np.int64), maps=stored, scales=scales,
                       levels=[info[i] for i in chosen], box=token_box(encoder.info, slice_size),
                       slice_size=slice_size, content_box=tuple(ps.content_box), grid_shape=tuple(ps.grid_shape),
                       labels=labels, mask=mask, spacing=tuple(float(v) for v in volume.spacing),
                       n_slices=int(n_slices), brain_box=brain_box(volume, plane))


# -- sampling features at pixel centres ---------------------------------------------------------
def box_pixel_grid(box: tuple[int, int, int, int]) -> torch.Tensor:
    """Normalised (x, y) centres of every pixel of the box, shape (h, w, 2), for ``grid_sample``."""
    _, _, h, w = box
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1)


def sample_features(ds: DenseSlices, rows: np.ndarray, pixels: list[np.ndarray]) -> np.ndarray:
    """Features of chosen pixels, every level bilinearly upsampled and concatenated.

    Args:
        ds: dense features.
        rows: (R,) slice positions in ``ds``.
        pixels: R arrays of flat pixel indices into the (h, w) box (``y * w + x``).

    Returns:
        (sum of len(pixels), D) float32, in the order of ``rows`` then ``pixels``. Equal to reading
        ``F.interpolate(level, (h, w), mode="bilinear")`` at those pixels, without building it.
    """
    _, _, h, w = ds.box
    grid = box_pixel_grid(ds.box).reshape(-1, 2)
    counts = [len(p) for p in pixels]
    total = sum(counts)
    out = np.empty((total, ds.dim), dtype=np.float32)
    if total == 0:
        return out
    width = max(counts)
    # one (R, 1, width, 2) sampling grid, padded with the box centre; padded columns are dropped
    pts = torch.zeros(len(rows), 1, width, 2)
    for r, p in enumerate(pixels):
        pts[r, 0, :len(p)] = grid[torch.as_tensor(p, dtype=torch.long)]
    col = 0
    for j in range(len(ds.levels)):
        fmap = ds.level(j, rows)
        vals = F.grid_sample(fmap, pts, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]
        start = 0
        for r, c in enumerate(counts):
            out[start:start + c, col:col + fmap.shape[1]] = vals[r, :, :c].T.numpy()
            start += c
        col += fmap.shape[1]
    return out


def upsample_levels(ds: DenseSlices, rows: np.ndarray | None = None, size: tuple[int, int] | None = None,
                    levels: Sequence[int] | None = None) -> torch.Tensor:
    """Levels bilinearly upsampled to ``size`` (default the box) and concatenated: (S, D, h, w).

    The explicit form of what :func:`sample_features` reads at single pixels (memory-hungry: for
    tests, figures and small volumes).
    """
    size = size or (ds.box[2], ds.box[3])
    js = range(len(ds.levels)) if levels is None else levels
    return torch.cat([F.interpolate(ds.level(j, rows), size=size, mode="bilinear", align_corners=False) for j in js],
                     dim=1)


# -- the raw-intensity control ------------------------------------------------------------------
@dataclass
class _ControlInfo:
    key: str
    input_size: tuple[int, int]
    resize: str = "squash"
    weights: str = "none"
    weights_sha256: str = ""


class IntensityFeatures:
    """Raw intensities as a dense "encoder": the probes' control.

    Levels (on the slice's own pixel grid, or every ``stride``-th pixel):

    * ``patch``: the raw ``patch x patch`` intensity neighbourhood centred on each output cell
      (``patch**2`` channels, zero beyond the slice; the middle channel of a 2.5D stack), so the
      feature keeps the pattern (a dark blob in bright tissue), not only the mean;
    * ``coords``: normalised in-slice row and column, and the slice's position along the plane's
      axis (3 channels in [0, 1]).

    Args:
        patch: odd neighbourhood side in pixels.
        stride: output stride (1 = every pixel; s = one cell every s pixels, the patch centred on it).
        coords: include the ``coords`` level.
    """

    def __init__(self, patch: int = 5, stride: int = 1, coords: bool = True) -> None:
        if patch < 1 or patch % 2 == 0:
            raise ValueError(f"patch must be an odd number >= 1, got {patch}")
        self.patch, self.stride, self.coords = patch, stride, coords
        self.info = _ControlInfo(key=f"control/intensity_p{patch}_s{stride}" + ("_xyz" if coords else ""),
                                 input_size=(0, 0))

    def feature_info(self) -> list[Level]:
        levels = [Level(0, f"patch{self.patch}", self.patch ** 2, self.stride)]
        if self.coords:
            levels.append(Level(1, "coords", 3, self.stride))
        return levels

    def feature_maps(self, images: torch.Tensor, levels: Sequence[int] | None = None, batch_size: int = 32,
                     slice_coords: np.ndarray | None = None) -> list[torch.Tensor]:
        """Raw slices (B, C, H, W) in [0, 1] -> [(B, C_l, H // stride, W // stride)] for ``levels``."""
        levels = list(range(len(self.feature_info()))) if levels is None else list(levels)
        x = images.float()
        x = x[:, x.shape[1] // 2:x.shape[1] // 2 + 1]  # the middle channel (2.5D centre): width independent of C
        b, _, h, w = x.shape
        s = self.stride
        gh, gw = h // s, w // s
        out = []
        for lv in levels:
            if lv == 0:
                fmap = _cell_patches(x, self.patch, s)
            elif lv == 1 and self.coords:
                ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
                xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
                gy, gx = torch.meshgrid(ys, xs, indexing="ij")
                z = torch.as_tensor(np.full(b, 0.5) if slice_coords is None else slice_coords, dtype=torch.float32)
                fmap = torch.stack([gy.expand(b, gh, gw), gx.expand(b, gh, gw), z[:, None, None].expand(b, gh, gw)], 1)
            else:
                raise ValueError(f"{self.info.key}: no level {lv}")
            out.append(fmap)
        return out


def _cell_patches(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, k*k, H // s, W // s): the k x k pixels centred on each cell's centre
    (pixel ``(i + 0.5) * s - 0.5``; bilinear when that falls between pixels), zero outside."""
    b, _, h, w = x.shape
    gh, gw = h // s, w // s
    off = torch.arange(k, dtype=torch.float32) - k // 2
    py = ((torch.arange(gh, dtype=torch.float32) + 0.5) * s - 0.5)[:, None] + off[None]   # (gh, k)
    px = ((torch.arange(gw, dtype=torch.float32) + 0.5) * s - 0.5)[:, None] + off[None]   # (gw, k)
    ny = ((py + 0.5) / h * 2 - 1).reshape(-1)                                             # rows (i, a)
    nx = ((px + 0.5) / w * 2 - 1).reshape(-1)                                             # cols (j, c)
    grid = torch.stack(torch.meshgrid(nx, ny, indexing="xy"), -1)[None]                   # (1, gh*k, gw*k, 2)
    vals = F.grid_sample(x, grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                         align_corners=False)                                              # (B, 1, gh*k, gw*k)
    return vals.reshape(b, gh, k, gw, k).permute(0, 2, 4, 1, 3).reshape(b, k * k, gh, gw)


def describe_levels(levels: Sequence[Any], img_size: int | None) -> str:
    """'features.3 (s4, 24 ch, 56x56) + ...' for tables and logs."""
    parts = []
    for lv in levels:
        lv = _as_level(lv)
        grid = f", {img_size // lv.stride}x{img_size // lv.stride}" if img_size else ""
        parts.append(f"{lv.name} (s{lv.stride}, {lv.channels} ch{grid})")
    return " + ".join(parts)
