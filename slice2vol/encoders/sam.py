"""Segment Anything image encoders (``sam/vit_b``, ``sam/vit_l``, ``sam/vit_h``) and MedSAM (``medsam/vit_b``).

Only the image encoder is built (``segment_anything.modeling.ImageEncoderViT`` with the arguments of
``build_sam.py``); prompt encoder and mask decoder are not needed for slice features.

Outputs:
  * ``tokens``: the neck output (B, 256, g, g) as (B, g * g, 256), grid (g, g), g = img_size / 16
    (64 x 64 at 1024 px) — what ``SamPredictor.features`` holds.
  * ``encode``: the mean of those tokens (256-d; ``pooling="max"`` for the max). With SAM's
    longest-side resize a non-square slice leaves padded rows/columns (the mean colour) that the mean
    includes; slices cut with ``SliceConfig(size=...)`` are square, so nothing is padded.

Preprocessing, batched, reproducing each official per-image recipe:
  * SAM (``SamPredictor.set_image``): longest side to ``img_size`` (PIL bilinear through torchvision,
    i.e. antialiased), pixel mean/std (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) on the
    0-255 scale (= ImageNet's on [0, 1]), zero padding at the bottom/right to a square.
  * MedSAM (``MedSAM_Inference.py`` in bowang-lab/MedSAM): grey replicated to 3 channels, squashed to
    ``img_size`` x ``img_size`` with ``skimage.transform.resize(order=3, anti_aliasing=True)`` — reproduced
    exactly as one separable matrix per axis (:func:`spline_resize_matrix`) — clipped to the image's own
    range, then per-image min-max to [0, 1]; no mean/std (the encoder is called directly, bypassing
    ``Sam.preprocess``). The script's ``astype(np.uint8)`` after the resize is not copied: it floors an
    8-bit image and would quantise float slices.

Input size (``img_size=``, a multiple of 16, default 1024): the encoder is built for that size; it costs
972 / 227 / 69 GFLOPs per slice at 1024 / 512 / 256 px for vit_b. Loading 1024-px weights at another
size resizes the absolute position embedding (1, 64, 64, C) bicubically (antialiased, as timm and
open_clip do) to (1, g, g, C), and the relative-position tables of the global-attention blocks
(2 * 64 - 1, head_dim) linearly to (2g - 1, head_dim) — the same interpolation SAM's ``get_rel_pos``
applies on the fly to mismatched tables. Windowed blocks keep their 14 x 14 windows and tables.
The networks were trained at 1024 px only, so reduced sizes are an approximation to measure, not a
free speed-up.

Weights: ``random`` (SAM's own init: zero position tables); ``hub`` = Meta's checkpoints from
dl.fbaipublicfiles.com, via the torch hub cache (``$TORCH_HOME/hub/checkpoints``); MedSAM's is only on
Google Drive, so ``hub`` uses a ``medsam_vit_b.pth`` placed in that cache or fails with instructions;
or a local file: a full ``Sam`` state dict as ``sam_model_registry[arch](checkpoint=PATH)`` reads (Meta's
``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``) or the image encoder's alone. Files are read with
``weights_only=True`` (``build_sam.py`` itself unpickles them unsafely).
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.encoders.base import (
    ENCODERS,
    Encoder,
    EncoderInfo,
    FeatureLevel,
    WeightsUnavailable,
    apply_preprocess_overrides,
    assign_state_dict,
    load_state_dict,
    ordered_levels,
    parse_weights,
    require_hub,
    sha256_file,
    square_size,
)
from slice2vol.encoders.weights import PretrainedSpec, resolve_pretrained

# build_sam.py: encoder width, depth, heads, global-attention block indexes
SAM_ARCHS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
SAM_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
MEDSAM_FILE = "medsam_vit_b.pth"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
PATCH = 16
NECK_CHANS = 256
POOLINGS = ("mean", "max")


class SAMEncoder(Encoder):
    """A SAM ``ImageEncoderViT`` behind :class:`Encoder`; MedSAM's own preprocessing when ``intensity='minmax'``.

    Args:
        image_encoder: ``segment_anything.modeling.ImageEncoderViT``.
        info: resolved encoder facts.
        pooling: ``mean`` or ``max`` over the (g, g) neck map.
        micro_batch: images per encoder call; larger batches are split (see :func:`default_micro_batch`).
    """

    def __init__(self, image_encoder: nn.Module, info: EncoderInfo, pooling: str = "mean",
                 micro_batch: int = 1) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.info = info
        self.pooling = pooling
        self.micro_batch = max(1, int(micro_batch))

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> neck map (B, 256, g, g), ``micro_batch`` images at a time."""
        if x.shape[0] <= self.micro_batch:
            return self.image_encoder(x)
        return torch.cat([self.image_encoder(chunk) for chunk in x.split(self.micro_batch)])

    def interpolations(self) -> tuple[str, ...]:
        """MedSAM's own resize: skimage's ``cubic-spline`` or a torch kernel; SAM: the base ones."""
        if self.info.intensity != "minmax":
            return super().interpolations()
        return ("cubic-spline", "bicubic", "bilinear", "nearest")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """SAM: the base longest-side path. MedSAM: skimage's cubic-spline resize, clip to the input range, min-max."""
        if self.info.intensity != "minmax":
            return super().preprocess(x)
        x = self.adapt_channels(x.float())
        lo = x.amin((1, 2, 3), keepdim=True)
        hi = x.amax((1, 2, 3), keepdim=True)
        height, width = self.info.input_size
        if tuple(x.shape[-2:]) != (height, width):
            if self.info.interpolation == "cubic-spline":
                rows = spline_resize_matrix(x.shape[-2], height).to(x.device)
                cols = spline_resize_matrix(x.shape[-1], width).to(x.device)
                x = rows @ x @ cols.T  # (H, h) @ (B, C, h, w) @ (w, W)
            else:  # a user override (bicubic / bilinear / nearest)
                mode = "nearest-exact" if self.info.interpolation == "nearest" else self.info.interpolation
                shrink = height < x.shape[-2] or width < x.shape[-1]
                x = F.interpolate(x, size=(height, width), mode=mode,
                                  antialias=shrink and mode != "nearest-exact")
            x = torch.maximum(torch.minimum(x, hi), lo)  # skimage resize(clip=True)
            lo = x.amin((1, 2, 3), keepdim=True)
            hi = x.amax((1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        mean = torch.tensor(self.info.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        feature_map = self._neck(x)  # (B, 256, g, g)
        return feature_map.flatten(2).transpose(1, 2), (feature_map.shape[-2], feature_map.shape[-1])

    # -- dense features: the encoder's blocks and its neck ---------------------------------------
    def feature_info(self) -> list[FeatureLevel]:
        """``blocks.<i>`` (ViT width channels) then ``neck`` (256, what ``SamPredictor.features``
        holds), all at stride 16 (the patch size)."""
        if getattr(self, "_feature_levels", None) is None:
            encoder = self.image_encoder
            width = int(encoder.patch_embed.proj.out_channels)
            levels = [FeatureLevel(i, f"blocks.{i}", width, PATCH) for i in range(len(encoder.blocks))]
            levels.append(FeatureLevel(len(levels), "neck", NECK_CHANS, PATCH))
            self._feature_levels = levels
        return list(self._feature_levels)

    def forward_intermediates(self, x: torch.Tensor, levels: Sequence[int] | int | None = None, *,
                              norm: bool = False) -> list[torch.Tensor]:
        """Outputs of ``ImageEncoderViT``'s own forward, caught by forward hooks on the requested
        blocks (their (B, g, g, C) output as (B, C, g, g)) and the neck; ``micro_batch`` images per
        call. SAM has no final norm, so ``norm`` has no effect."""
        chosen = self.resolve_levels(levels)
        info = self.feature_info()

        def compute(unique: list[int]) -> list[torch.Tensor]:
            modules = dict(self.image_encoder.named_modules())
            parts: dict[int, list[torch.Tensor]] = {i: [] for i in unique}
            handles = []
            for i in unique:
                def hook(_module, _inputs, output, i=i):
                    parts[i].append(output if info[i].name == "neck" else output.permute(0, 3, 1, 2))
                target = self.image_encoder.neck if info[i].name == "neck" else modules[info[i].name]
                handles.append(target.register_forward_hook(hook))
            try:
                for chunk in x.split(self.micro_batch):
                    self.image_encoder(chunk)
            finally:
                for handle in handles:
                    handle.remove()
            return [torch.cat(parts[i]) for i in unique]

        return ordered_levels(chosen, compute)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self._neck(x)
        if self.pooling == "max":
            return feature_map.amax((-2, -1))
        return feature_map.mean((-2, -1))


def _mirror(index: torch.Tensor, n: int) -> torch.Tensor:
    """scipy.ndimage's ``mirror`` boundary: reflect about the edge pixel centres (-1 -> 1, n -> n - 2)."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.abs() % period
    return torch.where(index >= n, period - index, index)


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    return torch.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)))


@lru_cache(maxsize=32)
def spline_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 matrix doing, along one axis, what ``skimage.transform.resize(order=3,
    anti_aliasing=True, mode='reflect')`` does: a Gaussian of sigma ``(n_in / n_out - 1) / 2`` when
    shrinking, the cubic B-spline prefilter, then cubic B-spline sampling at pixel centres, all with
    scipy's ``mirror`` boundary. Applied separably to rows and columns it matches skimage to ~1e-13 in
    float64 (one matrix product per axis, so it runs batched on any device).
    """
    dtype = torch.float64
    factor = n_in / n_out
    index = torch.arange(n_in)
    smooth = torch.eye(n_in, dtype=dtype)
    sigma = max(0.0, (factor - 1) / 2)
    if sigma > 0:  # ndi.gaussian_filter(mode='mirror', truncate=4)
        radius = int(4.0 * sigma + 0.5)
        offsets = torch.arange(-radius, radius + 1)
        weights = torch.exp(-0.5 * offsets.to(dtype) ** 2 / sigma ** 2)
        smooth = torch.zeros(n_in, n_in, dtype=dtype)
        smooth.index_put_((index[:, None].expand(-1, len(offsets)).reshape(-1),
                           _mirror(index[:, None] + offsets[None], n_in).reshape(-1)),
                          (weights / weights.sum()).repeat(n_in), accumulate=True)
    prefilter = torch.eye(n_in, dtype=dtype)
    if n_in > 1:  # spline coefficients c solve (c[k-1] + 4 c[k] + c[k+1]) / 6 = f[k], mirrored at the ends
        system = torch.diag(torch.full((n_in,), 2 / 3, dtype=dtype))
        for step in (-1, 1):
            system.index_put_((index, _mirror(index + step, n_in)), torch.full((n_in,), 1 / 6, dtype=dtype),
                              accumulate=True)
        prefilter = torch.linalg.inv(system)
    coords = (torch.arange(n_out, dtype=dtype) + 0.5) * factor - 0.5  # ndi.zoom(grid_mode=True)
    taps = torch.floor(coords).long()[:, None] + torch.arange(-1, 3)[None]
    sample = torch.zeros(n_out, n_in, dtype=dtype)
    sample.index_put_((torch.arange(n_out)[:, None].expand_as(taps).reshape(-1), _mirror(taps, n_in).reshape(-1)),
                      _cubic_bspline(coords[:, None] - taps.to(dtype)).reshape(-1), accumulate=True)
    return (sample @ prefilter @ smooth).float()


ATTENTION_BUDGET = 4 << 30  # bytes of global-attention scores held per encoder call


def default_micro_batch(img_size: int, num_heads: int, budget: int = ATTENTION_BUDGET) -> int:
    """Images per encoder call so the global-attention blocks stay within ``budget`` bytes.

    Why: SAM's global blocks materialise fp32 scores (B * heads, g^2, g^2) about three times over
    (scores, + decomposed rel-pos, softmax): at 1024 px that is 12 x 4096^2 x 4 B x 3 ~ 2.4 GB per
    image for vit_b, so a batch of 32 would need ~77 GB. One image at 1024 px, 28 at 512 px.
    """
    tokens = (img_size // PATCH) ** 2
    return max(1, budget // (3 * 4 * num_heads * tokens ** 2))


def resize_position_tables(state: dict[str, torch.Tensor], image_encoder: nn.Module) -> list[str]:
    """Resizes ``pos_embed`` and ``*.rel_pos_h/w`` in ``state`` to ``image_encoder``'s shapes, in place.

    Returns:
        Names of the resized tensors.
    """
    own = image_encoder.state_dict()
    resized = []
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        grid = tuple(own["pos_embed"].shape[1:3])
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False,
                            antialias=True)
        state["pos_embed"] = pos.permute(0, 2, 3, 1).contiguous()
        resized.append("pos_embed")
    for name, table in list(state.items()):
        if name.endswith(("rel_pos_h", "rel_pos_w")) and name in own and table.shape != own[name].shape:
            length = own[name].shape[0]
            # exactly segment_anything's get_rel_pos interpolation
            table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1).float(), size=length,
                                  mode="linear")
            state[name] = table.reshape(-1, length).permute(1, 0).contiguous()
            resized.append(name)
    return resized


def _hub_checkpoint(key: str, family: str, arch: str, local_hint: str) -> Path:
    """Meta's SAM checkpoint from the torch hub cache or dl.fbaipublicfiles.com; MedSAM from the cache only."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if family == "medsam":
        path = cache / MEDSAM_FILE
        if path.exists():
            return path
        raise WeightsUnavailable(
            f"{key}: MedSAM's checkpoint ({MEDSAM_FILE}) is distributed through the Google Drive link in "
            f"https://github.com/bowang-lab/MedSAM (README) and cannot be downloaded automatically. Download it "
            f"and pass a local checkpoint instead: {local_hint}, or place it at {path}")
    url = SAM_URLS[arch]
    path = cache / url.rsplit("/", 1)[1]
    if path.exists():
        return path
    require_hub(key, url, local_hint, host=url)
    cache.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


def build_sam(family: str, arch: str, weights: str | Path | None = "random", *, img_size: int = 1024,
              pooling: str = "mean", embed_dim: int | None = None, depth: int | None = None,
              num_heads: int | None = None, global_attn_indexes: tuple[int, ...] | None = None,
              window_size: int = 14, micro_batch: int | None = None, **overrides: Any) -> SAMEncoder:
    """Builds ``sam/<arch>`` or ``medsam/<arch>``.

    Args:
        family: ``sam`` or ``medsam`` (preprocessing and where hub weights come from).
        arch: ``vit_b``, ``vit_l`` or ``vit_h``.
        weights: ``random``, ``hub`` or a local checkpoint.
        img_size: square input side, a multiple of 16 (see module docstring).
        pooling: ``mean`` or ``max`` of the neck map for ``encode``.
        embed_dim, depth, num_heads, global_attn_indexes, window_size: architecture overrides
            (tests build 2-block encoders); default ``build_sam.py``'s.
        micro_batch: images per encoder call (memory bound, not speed: one 1024-px image is ~1 TFLOP);
            default :func:`default_micro_batch`.
        **overrides: ``mean``, ``std``, ``interpolation``, ``channel_mode``.
    """
    from segment_anything.modeling import ImageEncoderViT

    key = f"{family}/{arch}"
    if pooling not in POOLINGS:
        raise ValueError(f"{key}: pooling must be one of {POOLINGS}, got {pooling!r}")
    img_size = square_size(key, img_size)  # a whole number 1-MAX_SIZE (a string or 1e5 crashed below)
    if img_size % PATCH or img_size < PATCH:
        raise ValueError(f"{key}: img_size must be a positive multiple of {PATCH}, got {img_size}")
    kind, ref = parse_weights(weights, pretrained=True)
    if kind == "hub" and ref:
        raise ValueError(f"{key}: SAM checkpoints have no tags; use weights='hub'")
    origin: dict[str, str] = {}
    if kind == "pretrained":  # $SLICE2VOL_WEIGHTS or the torch hub cache, never a download
        filename = MEDSAM_FILE if family == "medsam" else SAM_URLS[arch].rsplit("/", 1)[1]
        spec_w = PretrainedSpec(
            key=key, files=(filename,), torch_hub=True,
            description="MedSAM (SAM ViT-B fine-tuned on 1.5M medical image-mask pairs)" if family == "medsam"
            else f"Segment Anything {arch} (SA-1B)", dataset="MedSAM" if family == "medsam" else "SA-1B",
            url="https://github.com/bowang-lab/MedSAM (Google Drive link in its README)" if family == "medsam"
            else SAM_URLS[arch])
        resolved = resolve_pretrained(spec_w, ref)
        kind, ref, origin = "file", str(resolved.path), resolved.provenance()
    spec = dict(SAM_ARCHS[arch])
    for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                        ("global_attn_indexes", global_attn_indexes)):
        if value is not None:
            spec[name] = value
    local_hint = f"weights='/path/to/{MEDSAM_FILE if family == 'medsam' else SAM_URLS[arch].rsplit('/', 1)[1]}' " \
                 f"(CLI: --weights PATH)"
    # weights first: an unavailable download fails before the (seconds-long) encoder initialisation
    path = _hub_checkpoint(key, family, arch, local_hint) if kind == "hub" else Path(ref) if kind == "file" else None
    image_encoder = ImageEncoderViT(
        img_size=img_size, patch_size=PATCH, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True, use_rel_pos=True, window_size=window_size, out_chans=NECK_CHANS,
        embed_dim=spec["embed_dim"], depth=spec["depth"], num_heads=spec["num_heads"],
        global_attn_indexes=tuple(spec["global_attn_indexes"]),
    )
    sha, used, resized = "", "random", []
    if path is not None:
        state = load_state_dict(path)
        if any(k.startswith("image_encoder.") for k in state):  # a full Sam checkpoint
            state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
        resized = resize_position_tables(state, image_encoder)
        assign_state_dict(image_encoder, state, key, source=str(path), optional_prefixes=())
        sha = origin.get("sha256") or sha256_file(path)
        used = ("pretrained" if origin else str(path)) if kind == "file" else f"hub:{path.name}"
    grid = img_size // PATCH
    medsam = family == "medsam"
    micro_batch = micro_batch or default_micro_batch(img_size, spec["num_heads"])
    info = EncoderInfo(
        key=key, embed_dim=NECK_CHANS, input_size=(img_size, img_size),
        mean=(0.0, 0.0, 0.0) if medsam else tuple(m / 255 for m in SAM_PIXEL_MEAN),
        std=(1.0, 1.0, 1.0) if medsam else tuple(s / 255 for s in SAM_PIXEL_STD),
        patch_size=PATCH, token_dim=NECK_CHANS, source="segment_anything", weights=used, weights_sha256=sha,
        pooling=pooling, resize="squash" if medsam else "longest", intensity="minmax" if medsam else "unit",
        interpolation="cubic-spline" if medsam else "bilinear",
        extra={"arch": arch, "grid": [grid, grid], "vit_width": spec["embed_dim"], "depth": spec["depth"],
               "global_attn_indexes": list(spec["global_attn_indexes"]), "window_size": window_size,
               "resized_tables": resized, "micro_batch": micro_batch},
        weights_origin=origin,
    )
    apply_preprocess_overrides(info, **overrides)
    return SAMEncoder(image_encoder, info, pooling=pooling, micro_batch=micro_batch).eval()


# -- registry ----------------------------------------------------------------------------------
_META = dict(embed_dim=NECK_CHANS, input_size=1024, img_size="multiple of 16 (pos-embed and rel-pos interpolated)")


@ENCODERS.register("sam/vit_b", params_m=89.67, family="sam", **_META)
def sam_vit_b(weights: str | Path | None = "random", **kwargs: Any) -> SAMEncoder:
    """SAM ViT-B image encoder; 64 x 64 x 256 neck tokens at 1024 px."""
    return build_sam("sam", "vit_b", weights, **kwargs)


@ENCODERS.register("sam/vit_l", params_m=308.28, family="sam", **_META)
def sam_vit_l(weights: str | Path | None = "random", **kwargs: Any) -> SAMEncoder:
    """SAM ViT-L image encoder; 64 x 64 x 256 neck tokens at 1024 px."""
    return build_sam("sam", "vit_l", weights, **kwargs)


@ENCODERS.register("sam/vit_h", params_m=637.03, family="sam", **_META)
def sam_vit_h(weights: str | Path | None = "random", **kwargs: Any) -> SAMEncoder:
    """SAM ViT-H image encoder; 64 x 64 x 256 neck tokens at 1024 px."""
    return build_sam("sam", "vit_h", weights, **kwargs)


@ENCODERS.register("medsam/vit_b", params_m=89.67, family="medsam", **_META)
def medsam_vit_b(weights: str | Path | None = "random", **kwargs: Any) -> SAMEncoder:
    """MedSAM (SAM ViT-B fine-tuned on 1.5M medical image-mask pairs): min-max input, 1024 px squash."""
    return build_sam("medsam", "vit_b", weights, **kwargs)
