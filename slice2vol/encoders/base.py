"""The encoder interface every 2D model family implements, plus weight resolution helpers.

An :class:`Encoder` takes raw slices as produced by :func:`slice2vol.data.slice_volume` — float
tensors of shape (B, C, h, w) with intensities in [0, 1] — and does its own family-specific
preprocessing on the device (channel adaptation, resize, normalisation), batched. Families register a
builder in :data:`ENCODERS` under ``<source>/<model>`` keys, e.g. ``timm/resnet50``.

Weights are given as a string: ``random`` (no network, always works), ``hub`` or ``hub:<tag>`` (the
library's own download, honouring the Hugging Face cache and ``HF_HUB_OFFLINE``), or a path to a local
file (``.safetensors``, ``.pth``/``.pt``/``.bin``, loaded with ``weights_only=True``) or directory.

Preprocessing reproduces each library's official per-image eval pipeline on whole batches: channel
adaptation, resize (``squash`` straight to the input size; ``shorter`` side to ``resize_size`` then a
centre crop, as timm's ``crop_pct`` / torchvision's ``resize_size`` / HF's ``shortest_edge`` do;
``longest`` side then zero padding, as SAM), antialiased interpolation (matches PIL), clipping to the
input range (PIL's 8-bit output clips), normalisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.checkpoint_io import check_dtypes
from slice2vol.registry import Registry

log = logging.getLogger(__name__)

ENCODERS: Registry["Encoder"] = Registry("encoder")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be obtained here (offline, no cache, no file)."""


@dataclass
class EncoderInfo:
    """What a caller needs to know about an encoder, recorded as provenance in the store.

    Attributes:
        key: registry key, e.g. ``timm/resnet50``.
        embed_dim: D of ``encode`` output (B, D).
        input_size: (H, W) the network is fed.
        in_chans: channels the network takes (3 for pretrained RGB models).
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        patch_size: ViT patch size (or the CNN's output stride) for ``tokens``.
        token_dim: D of ``tokens`` output (B, T, D); may differ from ``embed_dim`` (e.g. CLIP).
        source: library that builds the model (timm, open_clip, transformers, ...).
        weights: ``random``, ``hub:<tag>`` or the local file used.
        weights_sha256: sha256 of the local weights file, ``""`` for random weights.
        pooling: how ``encode`` pools (``cls``, ``mean``, ``gem``, ``avg``, ``proj``).
        resize: ``squash`` (resize to input size), ``shorter`` (shorter side to ``resize_size``,
            then centre crop to input size: timm/torchvision/HF eval transforms), ``longest``
            (longest side, then pad, as SAM).
        channel_mode: how C input channels become ``in_chans`` (``replicate``, ``stack``, ``mean``).
        intensity: ``unit`` (slices in [0, 1] scaled by mean/std), ``minmax`` (per-image min-max
            to [0, 1] first, as MedSAM) or ``zscore`` (per-image robust z-score first, as BrainDINO;
            :func:`robust_zscore`).
        extra: family-specific facts (e.g. ``num_prefix_tokens``, ``arch``).
        resize_size: for ``resize="shorter"``, the shorter-side length before the centre crop
            (timm: ``floor(input / crop_pct)``; torchvision: the weights' ``resize_size``); ``None``
            means the crop is the whole resized image (crop_pct 1).
        interpolation: ``bicubic`` or ``bilinear`` (antialiased, as PIL) or ``nearest``.
        weights_origin: for ``weights="pretrained"``, where the file was found: ``origin`` (``env``,
            ``package``, ``hf-cache``, ``torch-cache``), ``detail`` (folder, package and version, repo),
            ``file`` and ``sha256`` (see :mod:`slice2vol.encoders.weights`); empty otherwise.
    """

    key: str
    embed_dim: int
    input_size: tuple[int, int]
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    patch_size: int | None = None
    token_dim: int | None = None
    source: str = ""
    weights: str = "random"
    weights_sha256: str = ""
    pooling: str = "avg"
    resize: Literal["squash", "shorter", "longest"] = "squash"
    channel_mode: Literal["replicate", "stack", "mean"] = "replicate"
    intensity: Literal["unit", "minmax", "zscore"] = "unit"
    extra: dict[str, Any] = field(default_factory=dict)
    resize_size: int | None = None
    interpolation: str = "bicubic"
    weights_origin: dict[str, str] = field(default_factory=dict)

    @property
    def crop_pct(self) -> float:
        """Fraction of the resized image kept by the centre crop (1.0 without a crop)."""
        if self.resize != "shorter" or self.resize_size is None:
            return 1.0
        return min(self.input_size) / self.resize_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass
class FeatureLevel:
    """One intermediate feature map an encoder exposes (see :meth:`Encoder.feature_info`).

    Attributes:
        index: position in :meth:`Encoder.feature_info` (0 = shallowest).
        name: the library's module name (``layer2``, ``blocks.5``, ``features.6``,
            ``encoder.layer.3``, ``transformer.resblocks.7``, ``neck``).
        channels: C of the map (B, C, H // stride, W // stride).
        stride: input pixels per map cell along H and W (CNN stages 2-32; ViTs: the patch size).
    """

    index: int
    name: str
    channels: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Encoder(nn.Module):
    """Base class: subclasses set ``self.info`` and implement ``forward_features`` and ``forward_tokens``.

    ``encode``/``tokens`` accept raw slices (B, C, h, w) in [0, 1] and preprocess them;
    ``forward_features``/``forward_tokens`` take already preprocessed (B, in_chans, H, W) input.
    """

    info: EncoderInfo

    # -- preprocessing -------------------------------------------------------------------------
    def adapt_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, in_chans, h, w) following ``info.channel_mode``.

        ``replicate``: one channel is copied; C == in_chans passes through (2.5D stacks of 3, or 3
        modalities); otherwise the middle ``in_chans`` channels are taken. ``mean`` averages to one
        channel first. ``stack`` requires C == in_chans.
        """
        c, want = x.shape[1], self.info.in_chans
        if c == want:
            return x
        mode = self.info.channel_mode
        if mode == "mean":
            x = x.mean(1, keepdim=True)
            c = 1
        if c == 1:
            return x.expand(-1, want, -1, -1)
        if mode == "stack":
            raise ValueError(f"{self.info.key}: got {c} channels, channel_mode='stack' needs {want}")
        if c > want:
            start = (c - want) // 2
            return x[:, start:start + want]
        raise ValueError(f"{self.info.key}: cannot map {c} input channels onto {want}")

    def interpolations(self) -> tuple[str, ...]:
        """The ``info.interpolation`` values :meth:`preprocess` knows (a family with its own resize adds to them)."""
        return INTERPOLATIONS

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Raw slices (B, C, h, w) in [0, 1] -> network input (B, in_chans, H, W), batched on x's device.

        Follows ``info``: intensity (``minmax``), channel adaptation, resize (``squash`` /
        ``shorter`` + centre crop / ``longest`` + pad), then ``(x - mean) / std``.
        """
        x = x.float()
        if self.info.intensity == "zscore":
            x = robust_zscore(x)
        if self.info.intensity == "minmax":
            flat = x.flatten(1)
            lo = flat.min(1).values[:, None, None, None]
            hi = flat.max(1).values[:, None, None, None]
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        # A single channel is replicated in every channel mode: resizing it before the copy gives the
        # same values (the resize works per channel, its clip range is per image) for 1/in_chans of
        # the work, ~5% of a ResNet-18's encode time at 224 px on CPU.
        if x.shape[1] != 1:
            x = self.adapt_channels(x)
        height, width = self.info.input_size
        mean = torch.tensor(self.info.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        if self.info.resize == "longest":
            scale = max(height, width) / max(x.shape[-2:])
            new = (int(x.shape[-2] * scale + 0.5), int(x.shape[-1] * scale + 0.5))
            x = resize_images(x, new, self.info.interpolation)
            x = self.adapt_channels(x)  # (a no-op when adapted above)
            x = (x - mean) / std
            return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
        if self.info.resize == "shorter":
            x = resize_shorter(x, self.info.resize_size or max(height, width), self.info.interpolation)
            x = center_crop(x, (height, width))
        else:
            x = resize_images(x, (height, width), self.info.interpolation)
        x = self.adapt_channels(x)  # (a no-op when adapted above)
        return (x - mean) / std

    # -- speed ---------------------------------------------------------------------------------
    #: CNN families set this: channels_last memory format helps them (+37% resnet18 on this CPU).
    channels_last_friendly: bool = False

    def optimize(self, *, channels_last: bool | None = None, compile: bool = False,
                 amp: str | None = None, fold_bn: bool = False) -> "Encoder":
        """Speed options, in place; returns self.

        Args:
            channels_last: use channels_last memory format (default: on for CNN families).
            compile: wrap ``forward_features``/``forward_tokens`` with ``torch.compile`` (slow first
                call, ~50 s for resnet50 on CPU: worth it for long caching jobs only).
            amp: ``bf16`` or ``fp16`` autocast, applied on CUDA inputs only; on CPU it is ignored with
                a warning (bf16 autocast measured ~40x slower than fp32 on CPUs without bf16 units).
            fold_bn: fold BatchNorm layers into the convolutions before them (:meth:`fold_batchnorm`);
                for frozen encoders at inference only (the caching job and retrieval turn it on).
        """
        if fold_bn:
            self.fold_batchnorm()  # before the memory-format change, so folded weights get it too
        if channels_last is None:
            channels_last = self.channels_last_friendly
        self._channels_last = bool(channels_last)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if amp not in (None, "", "none", "fp32", "bf16", "fp16"):
            raise ValueError(f"amp must be bf16, fp16 or none, got {amp!r}")
        self._amp = None if amp in (None, "", "none", "fp32") else amp
        if compile:
            self._compiled_features = torch.compile(self.forward_features)
            self._compiled_tokens = torch.compile(self.forward_tokens)
        return self

    def fold_batchnorm(self) -> int:
        """Folds BatchNorm into the convolution before it wherever every forward path allows, in place.

        Outputs change only by float rounding (the folded layer computes the same affine map); the
        encoder is then for inference only: :meth:`train` refuses it. ``source_state_sha256`` keeps
        the sha256 of the parameters it was built from (``slice2vol.extract.state_sha256`` answers
        with it), so provenance still names the weights, not their folded form.

        Returns:
            The number of BatchNorm layers folded (0 for models without BatchNorm, or that
            ``torch.fx`` cannot trace; see :mod:`slice2vol.encoders.fold`).

        Raises:
            RuntimeError: the encoder is in training mode.
        """
        from slice2vol.encoders.fold import fold_batchnorm, has_batchnorm

        if getattr(self, "_folded_bn", None) is not None:
            return self._folded_bn
        if self.training:
            raise RuntimeError(f"{self.info.key}: fold_batchnorm needs eval mode (BatchNorm then uses its running "
                               f"statistics); call .eval() first")
        if not has_batchnorm(self):
            self._folded_bn = 0
            return 0
        source = state_sha256(self)
        paths = ["forward_features"]
        if type(self).forward_tokens is not Encoder.forward_tokens:
            paths.append("forward_tokens")
        folded = fold_batchnorm(self, paths)
        if folded:
            self.source_state_sha256 = source
        self._folded_bn = folded
        return folded

    def inference_settings(self) -> dict[str, Any]:
        """The speed options in force (:meth:`optimize`), for provenance: folded BatchNorm layers,
        channels_last, torch.compile."""
        return {"batchnorm_folded": int(getattr(self, "_folded_bn", None) or 0),
                "channels_last": bool(getattr(self, "_channels_last", False)),
                "compiled": getattr(self, "_compiled_features", None) is not None}

    def train(self, mode: bool = True) -> "Encoder":
        """``nn.Module.train``, refused for an encoder whose BatchNorm was folded (it has no BatchNorm to train)."""
        if mode and getattr(self, "_folded_bn", 0):
            raise RuntimeError(f"{self.info.key}: {self._folded_bn} BatchNorm layers were folded into convolutions "
                               f"for inference (optimize(fold_bn=True)); build the encoder again to train it")
        return super().train(mode)

    def _autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        amp = getattr(self, "_amp", None)
        if amp is None:
            return contextlib.nullcontext()
        if x.device.type != "cuda":
            if not getattr(self, "_warned_amp", False):
                log.warning("%s: autocast %s ignored on %s (fp32 is faster on CPU)", self.info.key, amp, x.device)
                self._warned_amp = True
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if getattr(self, "_channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # -- model ---------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, in_chans, H, W) -> pooled embedding (B, embed_dim)."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Preprocessed (B, in_chans, H, W) -> patch tokens (B, T, token_dim) and their grid (gh, gw)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw slices (B, C, h, w) in [0, 1] -> embeddings (B, embed_dim), float32."""
        forward = getattr(self, "_compiled_features", None) or self.forward_features
        x = self._prepare(x)
        with self._autocast(x):
            return forward(x).float()

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raw slices (B, C, h, w) in [0, 1] -> (tokens (B, T, token_dim), grid (gh, gw)), T = gh * gw."""
        forward = getattr(self, "_compiled_tokens", None) or self.forward_tokens
        x = self._prepare(x)
        with self._autocast(x):
            tokens, grid = forward(x)
        return tokens.float(), grid

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int = 32, *, tokens: bool = False,
              progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
        """Inference over many slices in batches, under ``torch.inference_mode``.

        Args:
            images: (N, C, h, w) raw slices in [0, 1] on any device; batches move to the encoder's.
            batch_size: slices per forward pass (see :func:`pick_batch_size`).
            tokens: return ``tokens`` instead of ``encode`` output.
            progress: report progress (:mod:`slice2vol.progress`: a bar on a terminal, log lines otherwise).

        Returns:
            (N, embed_dim) float32 on the encoder's device, or ((N, T, token_dim), (gh, gw)).
        """
        from slice2vol.progress import track

        device = self.device
        chunks = track(range(0, len(images), batch_size), desc=self.info.key, unit="batch", enabled=progress)
        outputs, grid = [], (0, 0)
        for start in chunks:
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            if tokens:
                out, grid = self.tokens(batch)
            else:
                out = self.encode(batch)
            outputs.append(out)
        if not outputs:
            raise ValueError(f"{self.info.key}: no images to embed")
        result = torch.cat(outputs)
        return (result, grid) if tokens else result

    # -- dense features (intermediate maps) ------------------------------------------------------
    def feature_info(self) -> list[FeatureLevel]:
        """The intermediate maps :meth:`forward_intermediates` can return, shallowest first.

        This default (families without a library API for intermediates, e.g. ``ssl2d/*``) exposes
        one level: the ``forward_tokens`` grid, named ``tokens``. Families override it with the
        library's own list (timm ``feature_info``, torchvision nodes, transformer blocks).
        """
        cached = getattr(self, "_feature_levels", None)
        if cached is None:
            height, width = self.info.input_size
            probe = torch.zeros(1, self.info.in_chans, height, width, device=self.device)
            with torch.inference_mode():
                tokens, grid = self.forward_tokens(probe)
            stride = max(1, height // max(grid[0], 1))
            cached = [FeatureLevel(0, "tokens", int(tokens.shape[-1]), int(stride))]
            self._feature_levels = cached
        return list(cached)

    def resolve_levels(self, levels: Sequence[int] | int | None = None) -> list[int]:
        """Level indices (negative count from the deepest; ``None`` = all) -> validated non-negative list.

        Raises:
            ValueError: an index outside the encoder's levels, naming the valid range and names.
        """
        n = len(self.feature_info())
        if levels is None:
            return list(range(n))
        if isinstance(levels, int):
            levels = [levels]
        out = []
        for level in levels:
            if not isinstance(level, int) or isinstance(level, bool) or not -n <= level < n:
                names = ", ".join(f"{f.index}={f.name}" for f in self.feature_info())
                raise ValueError(f"{self.info.key}: feature level {level!r} out of range; it has {n} levels: {names}")
            out.append(level % n)
        if not out:
            raise ValueError(f"{self.info.key}: no feature level requested")
        return out

    def forward_intermediates(self, x: torch.Tensor, levels: Sequence[int] | int | None = None, *,
                              norm: bool = False) -> list[torch.Tensor]:
        """Preprocessed (B, in_chans, H, W) -> one NCHW map (B, C_l, H // s_l, W // s_l) per requested level.

        Args:
            x: the network input, as :meth:`preprocess` returns it.
            levels: indices into :meth:`feature_info` in any order (negative from the deepest);
                ``None`` = all. Maps come back in the order asked.
            norm: apply the model's final norm to transformer block outputs (DINOv2's linear
                segmentation protocol uses normalised tokens); CNN stages have no such norm.

        ViT patch tokens are reshaped to their (H // patch, W // patch) grid, prefix/register tokens
        dropped. This default returns the ``forward_tokens`` grid (its only level).
        """
        self.resolve_levels(levels)
        tokens, grid = self.forward_tokens(x)
        return [tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], grid[0], grid[1])]

    @torch.inference_mode()
    def feature_maps(self, images: torch.Tensor, levels: Sequence[int] | int | None = None,
                     batch_size: int = 32, *, norm: bool = False, progress: bool = False) -> list[torch.Tensor]:
        """Raw slices (N, C, h, w) in [0, 1] -> maps [(N, C_l, H_l, W_l)] float32 on the CPU.

        Preprocesses (:meth:`preprocess`, so the maps cover the slice region ``info`` describes:
        the centre crop of ``shorter``, the whole slice for ``squash``, the top-left of ``longest``)
        and runs :meth:`forward_intermediates` in batches of ``batch_size`` on the encoder's device,
        without gradients.
        """
        chosen = self.resolve_levels(levels)
        if len(images) == 0:
            raise ValueError(f"{self.info.key}: no images to embed")
        from slice2vol.progress import bar

        device = self.device
        outputs: list[list[torch.Tensor]] = [[] for _ in chosen]
        meter = bar(total=len(images), desc=f"{self.info.key} maps", unit="slice", enabled=progress)
        try:
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device, non_blocking=True)
                x = self._prepare(batch)
                with self._autocast(x):
                    maps = self.forward_intermediates(x, chosen, norm=norm)
                for store, fmap in zip(outputs, maps):
                    store.append(fmap.float().cpu().contiguous())
                meter.update(len(batch))
        finally:
            meter.close()
        return [torch.cat(store) for store in outputs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def ordered_levels(chosen: Sequence[int], compute) -> list[torch.Tensor]:
    """Runs ``compute(sorted unique levels) -> maps in that order`` once and returns the maps in ``chosen``'s order.

    Why: the libraries' intermediate APIs return blocks in network order; callers may ask in any
    order, or twice for the same level.
    """
    unique = sorted(set(chosen))
    maps = compute(unique)
    if len(maps) != len(unique):
        raise RuntimeError(f"expected {len(unique)} feature maps, the library returned {len(maps)}")
    lookup = dict(zip(unique, maps))
    return [lookup[i] for i in chosen]


def robust_zscore(x: torch.Tensor, percentiles: tuple[float, float] = (1.0, 99.0)) -> torch.Tensor:
    """Per image of (B, C, h, w): clip to the ``percentiles`` of the non-zero values, then subtract the mean and
    divide by the (population) std of the values still above zero — BrainDINO's ``zscore_normalize``
    (their ``datasets_3D`` loaders), applied to one image instead of a whole volume.

    As in their code, clipping raises the zero background to the lower percentile, so when that percentile is
    positive the mean/std cover every pixel; fewer than 10 non-zero values use all of them.
    """
    out = torch.empty_like(x)
    q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], dtype=torch.float64)
    for i, image in enumerate(x):
        values = image.flatten().double()
        positive = values[values > 0]
        if positive.numel() < 10:
            positive = values
        lo, hi = torch.quantile(positive, q.to(values.device)).tolist()
        clipped = values.clamp(lo, hi)
        kept = clipped[clipped > 0]
        if kept.numel() == 0:
            kept = clipped
        mean, std = kept.mean(), kept.std(unbiased=False).clamp_min(1e-6)
        out[i] = ((clipped - mean) / std).view_as(image).to(x.dtype)
    return out


def gem_pool(feature_map: torch.Tensor, p: float = 3.0, eps: float = 1e-6,
             dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Generalised-mean pooling (Radenović et al. 2018) over the spatial ``dims``.

    (B, D, h, w) -> (B, D) with the default ``dims``; (B, D, x, y, z) -> (B, D) with ``(2, 3, 4)``.
    ``p`` is a finite number > 0 (:func:`check_gem_p`).

    The value is ``(mean clamp(x, floor)^p)^(1/p)`` per sample and channel, computed as
    ``m * (mean (clamp(x, floor) / m)^p)^(1/p)`` with ``m`` the per-channel maximum: the same
    number, but the largest term is 1, so a large ``p`` cannot underflow the mean to 0 (``p -> inf``
    gives the max). The floor is ``eps`` for maps of normal scale and shrinks with a sample whose
    largest |activation| is below 1 (random-init BatchNorm nets give ~1e-8), where a fixed ``eps``
    would lift every value to ``eps`` and give every volume the same vector. Same recipe as
    :func:`slice2vol.aggregate.pooling.pool_array`.
    """
    p = check_gem_p(p)
    x = feature_map.float()
    sample_dims = tuple(range(1, x.ndim))
    scale = x.detach().abs().amax(sample_dims, keepdim=True) if x.numel() else x.new_zeros(())
    clamped = torch.maximum(x, eps * scale.clamp_max(1.0))
    peak = clamped.amax(dims, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))  # a channel that is 0 everywhere pools to 0
    out = safe * (clamped / safe).pow(p).mean(dims, keepdim=True).pow(1.0 / p)
    out = torch.where(peak > 0, out, torch.zeros_like(out))
    for d in sorted((d % x.ndim for d in dims), reverse=True):
        out = out.squeeze(d)
    return out


def pool_feature_map(feature_map: torch.Tensor, pooling: str, gem_p: float = 3.0) -> torch.Tensor:
    """CNN map (B, D, h, w) -> (B, D) by ``avg``, ``max`` or ``gem``."""
    if pooling == "avg":
        return feature_map.mean((-2, -1))
    if pooling == "max":
        return feature_map.amax((-2, -1))
    if pooling == "gem":
        return gem_pool(feature_map.float(), gem_p).to(feature_map.dtype)
    raise ValueError(f"pooling must be avg, max or gem for a CNN, got {pooling!r}")


# -- resizing that matches PIL -----------------------------------------------------------------
def resize_images(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), reproducing PIL's resize on float tensors.

    PIL (which timm, torchvision, HF and open_clip eval pipelines call on 8-bit images) resamples
    with an antialiased kernel in two separable passes and stores each pass as uint8, so edge
    overshoot is clipped to [0, 255] *between* the passes. Doing the same (clip to the input range,
    at least [0, 1]) cut our max pixel error against PIL from 14 grey levels to 1 at the brain/air
    boundary of IXI slices.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    if interpolation == "torch-bilinear":  # pipelines that resize tensors, not PIL images (e.g. BrainDINO's)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if interpolation not in ("bicubic", "bilinear"):
        check_choice("interpolation", interpolation, INTERPOLATIONS)
    lo = x.amin((1, 2, 3), keepdim=True).clamp(max=0.0)
    hi = x.amax((1, 2, 3), keepdim=True).clamp(min=1.0)

    def one_pass(image: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
        image = F.interpolate(image, size=out, mode=interpolation, align_corners=False, antialias=True)
        return torch.maximum(torch.minimum(image, hi), lo)

    in_h, in_w = x.shape[-2:]
    # Pillow runs the vertical pass first when it shrinks the image more than the horizontal one
    # (measured on Pillow 13 over 20 size pairs; the wrong order costs up to 15 grey levels at edges)
    if size[0] < in_h and size[0] * in_w < size[1] * in_h:
        return one_pass(one_pass(x, (size[0], in_w)), size)
    if in_w != size[1]:
        x = one_pass(x, (in_h, size[1]))
    if in_h != size[0]:
        x = one_pass(x, size)
    return x


def resize_shorter(x: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Resizes (B, C, h, w) so the shorter side is ``size``, keeping the aspect ratio.

    Same output size rule as ``torchvision.transforms.Resize(int)`` and HF ``shortest_edge``:
    the longer side becomes ``int(size * long / short)``.
    """
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if h <= w else (new_long, size)
    return resize_images(x, new, interpolation)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop of (B, C, h, w) to ``size`` (zero-pads first when smaller), as torchvision's."""
    h, w = x.shape[-2:]
    ch, cw = size
    if ch > h or cw > w:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


def timm_resize_size(input_size: tuple[int, int], crop_pct: float) -> int:
    """timm's eval scale: ``floor(size / crop_pct)`` (square inputs)."""
    return int(math.floor(max(input_size) / crop_pct))


# -- batch size --------------------------------------------------------------------------------
def pick_batch_size(encoder: Encoder, device: str | torch.device | None = None, *, max_batch: int = 256,
                    fraction: float = 0.7, cpu_batch: int = 32) -> int:
    """A batch size that fits in ``fraction`` of the free memory of ``device``.

    On CUDA, the activation memory per slice is measured with two small probe batches and the
    batch is the largest power of two that fits. On CPU larger batches are not faster (measured:
    cache effects make batch 8-32 best for CNNs), so ``cpu_batch`` is returned, reduced only when
    the available RAM (``/proc/meminfo``) would not hold it.
    """
    device = torch.device(device) if device is not None else encoder.device
    height, width = encoder.info.input_size
    in_chans = encoder.info.in_chans
    if device.type == "cuda":
        def peak_of(n: int) -> int:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with torch.inference_mode():
                encoder.encode(torch.rand(n, in_chans, height, width, device=device))
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base

        # an unmeasured first pass: it allocates what stays (cuBLAS/cuDNN workspaces, 8-32 MiB), which
        # counted in the first probe only and made the per-slice difference <= 0 (-> max_batch always)
        peak_of(1)
        peaks = {}
        for n in PROBE_BATCHES:
            try:
                peaks[n] = peak_of(n)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
        fit = batch_that_fits(free * fraction, peaks)
    else:
        available = _available_ram()
        # fp32 activations of a forward pass: a generous 64 copies of the input image per slice
        per_slice = 64 * 4 * in_chans * height * width
        fit = int(available * fraction // per_slice) if available else cpu_batch
        max_batch = min(max_batch, cpu_batch)
    batch = 1
    while batch * 2 <= min(fit, max_batch):
        batch *= 2
    return batch


#: the batch sizes whose peak memory ``pick_batch_size`` measures on CUDA after a warm-up pass
PROBE_BATCHES = (2, 8)


def batch_that_fits(budget: float, peaks: Mapping[int, int]) -> int:
    """The largest batch whose activation memory fits ``budget`` bytes, from measured peaks.

    Args:
        budget: bytes the batch may use.
        peaks: batch size -> peak bytes above the model's own, for the probe sizes that ran.

    Memory is modelled as ``fixed + n * per_slice``: ``per_slice`` is the slope between the two
    largest probes; a slope that noise or the allocator's rounding makes small (under a tenth of the
    largest probe's bytes per slice) is replaced by that conservative bytes-per-slice, which charges
    the fixed part to every slice.
    """
    sizes = sorted(peaks)
    if not sizes:
        return 1  # even the smallest probe did not fit
    b = sizes[-1]
    per_slice = peaks[b] / b
    if len(sizes) > 1:
        a = sizes[-2]
        slope = (peaks[b] - peaks[a]) / (b - a)
        if slope >= 0.1 * per_slice:
            per_slice = slope
    fixed = max(peaks[b] - b * per_slice, 0.0)
    return max(int((budget - fixed) // max(per_slice, 1.0)), 1)


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- weights ----------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file; for a directory, of its weight files (``WEIGHT_SUFFIXES``) in name order.

    Why only weight files for directories: configs and processor files can be re-serialised with
    different formatting while the weights (what the number certifies) are unchanged.
    """
    digest = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        files = files or sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path]
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and bytes), any device.

    An encoder whose BatchNorm layers were folded for inference answers with the hash of the state it
    was built from (``source_state_sha256``): that is what identifies its weights.
    """
    source = getattr(module, "source_state_sha256", None)
    if source:
        return str(source)
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())  # buffer protocol: no copy of the tensor
    return digest.hexdigest()


#: ``weights=`` words asking for a key's published pretrained weights found locally
#: (:mod:`slice2vol.encoders.weights`): ``pretrained``, ``imagenet`` (ImageNet keys), ``package``.
PRETRAINED_WORDS = ("pretrained", "imagenet", "package")


def parse_weights(weights: str | Path | None, *, pretrained: bool = False
                  ) -> tuple[Literal["random", "hub", "file", "pretrained"], str]:
    """``random`` | ``pretrained`` | ``imagenet`` | ``package`` | ``hub`` | ``hub:<tag>`` | path -> (kind, ref).

    Args:
        weights: the user's string.
        pretrained: the caller resolves ``pretrained``/``imagenet``/``package`` (kind ``pretrained``,
            ref the word); families without packaged weights leave it False and those words raise.

    Raises:
        FileNotFoundError: a path that does not exist (anything not a word above is a path).
        ValueError: an empty string, or a pretrained word for a caller that has no pretrained weights
            to resolve.
    """
    if weights is None or str(weights) in ("random", "none"):
        return "random", ""
    text = str(weights)
    if not text.strip():
        # `--weights "$CKPT"` with the variable unset gave a random network without a word
        raise ValueError("weights is an empty string (an unset shell variable?): give 'random', 'pretrained', "
                         "'hub[:tag]' or a local file")
    if text == "hub" or text.startswith("hub:"):
        return "hub", text[4:]
    if text in PRETRAINED_WORDS:
        if not pretrained:
            raise ValueError(f"weights={text!r}: this encoder has no published pretrained weights to resolve; "
                             f"use 'random', 'hub[:tag]' or a local file")
        return "pretrained", text
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found (use 'random', 'pretrained', 'hub[:tag]' "
                                f"or a local file)")
    if not path.is_dir():  # a folder is a Hugging Face layout; its files are checked as they are read
        from slice2vol.data.io import file_problem

        problem = file_problem(path)
        if problem:  # hashing a named pipe would wait for a writer for ever
            raise ValueError(f"{path}: {problem}; weights must be a regular file")
    return "file", str(path)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint safely: safetensors, or torch.load with ``weights_only=True``.

    Unwraps the usual containers (``state_dict``, ``model``, ``module.`` prefixes).
    """
    from slice2vol.checkpoint_io import read_weights

    path = Path(path)
    state = read_weights(path)  # one line naming the file for anything it cannot use
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: checkpoint is not a state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def hub_endpoint() -> str:
    """The Hugging Face endpoint in use (``HF_ENDPOINT`` honoured, e.g. a mirror)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_available(host: str | None = None, timeout: float = 3.0) -> bool:
    """True when hub downloads may work: not in offline mode and the host answers within ``timeout``.

    Args:
        host: host name or URL; default the ``HF_ENDPOINT`` host (``huggingface.co``).
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    target = host or hub_endpoint()
    parsed = urlparse(target if "://" in target else f"https://{target}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(key: str, what: str, local_hint: str, host: str | None = None) -> None:
    """Fails fast (seconds, never the ~23 s/file retry loop) when hub weights cannot be downloaded.

    Args:
        key: encoder key, for the message.
        what: the hub object (repo id, tag) asked for.
        local_hint: how to pass a local file instead, e.g. ``--weights /path/model.safetensors``.
        host: host to probe; default the Hugging Face endpoint (``HF_ENDPOINT``).
    """
    if not hub_available(host):
        shown = host or urlparse(hub_endpoint()).hostname
        raise WeightsUnavailable(
            f"{key}: cannot download {what} (offline or {shown} unreachable, and not in the local cache). "
            f"Pass a local checkpoint instead: {local_hint}"
        )


def hf_cached_file(repo_id: str, filenames: tuple[str, ...], revision: str | None = None) -> str | None:
    """Path of the first of ``filenames`` already in the Hugging Face cache for ``repo_id``, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm/transformers
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str):
            return found
    return None


def hf_download(key: str, repo_id: str, filenames: tuple[str, ...], local_hint: str) -> str:
    """A weights file of ``repo_id`` from the cache, else downloaded (after a fast reachability check)."""
    cached = hf_cached_file(repo_id, filenames)
    if cached:
        return cached
    require_hub(key, f"hf-hub:{repo_id}", local_hint)
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name)
        except Exception as err:  # noqa: BLE001 - try the next file name
            last = err
    raise WeightsUnavailable(f"{key}: none of {filenames} found in {repo_id} ({last}). "
                             f"Pass a local checkpoint instead: {local_hint}")


CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "head.fc.", "last_linear.")


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor], key: str,
                      source: str = "checkpoint",
                      optional_prefixes: tuple[str, ...] = CLASSIFIER_PREFIXES) -> list[str]:
    """Loads ``state`` into ``model`` exactly, by name, or one-to-one in order when names differ.

    By name: every model tensor must be present with its shape, except classifier tensors
    (``optional_prefixes``), which a backbone-only checkpoint may lack (they keep their init and
    are returned). In order: when no name matches but both hold the same number of tensors (e.g.
    the EfficientNet-Lite0 file for timm), tensor i goes to model tensor i and every shape must agree.

    Returns:
        Model tensor names left at their initial values (missing classifier tensors).

    Raises:
        ValueError: unexpected/missing tensors or a shape mismatch, naming the first offenders.
    """
    own = model.state_dict()
    common = set(own) & set(state)
    if not common and len(state) == len(own):
        mapped = {}
        for i, ((src, tensor), (dst, target)) in enumerate(zip(state.items(), own.items())):
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"{key}: {source} does not match the architecture: tensor #{i} {src!r} has shape "
                    f"{tuple(tensor.shape)} but the model's #{i} {dst!r} has {tuple(target.shape)} "
                    f"(names differ, so tensors are mapped in order)")
            mapped[dst] = tensor
        check_dtypes(model, mapped, source)  # load_state_dict would cast int weights silently
        model.load_state_dict(mapped, strict=True)
        return []
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    left = [k for k in missing if k.startswith(optional_prefixes) or k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in left]
    if unexpected or missing:
        raise ValueError(
            f"{key}: {source} does not match the architecture: {len(missing)} missing tensors "
            f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state if state[k].shape != own[k].shape]
    if bad:
        name, got, want = bad[0]
        raise ValueError(f"{key}: {source}: {len(bad)} tensors with the wrong shape, first {name!r} {got} "
                         f"where the model has {want}")
    check_dtypes(model, state, source)
    model.load_state_dict(state, strict=False)
    if left:
        log.warning("%s: %s has no %s; they keep their initial values", key, source, left[:3])
    return left


#: how :meth:`Encoder.adapt_channels` may map C input channels onto ``in_chans``
CHANNEL_MODES = ("replicate", "stack", "mean")
#: the resize kernels :func:`resize_images` knows
INTERPOLATIONS = ("bicubic", "bilinear", "torch-bilinear", "nearest")
RESIZE_MODES = ("squash", "shorter", "longest")
INTENSITY_MODES = ("unit", "minmax", "zscore")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_stats(name: str, values: Any, in_chans: int | None = None) -> tuple[float, ...]:
    """A ``mean`` or ``std`` option as a tuple of finite floats (``std`` > 0): one per input channel, or one
    for every channel (kept as one value: ``preprocess`` broadcasts it).

    Args:
        name: ``mean`` or ``std``, for the message.
        values: one number or a list of numbers.
        in_chans: the channels the network takes; ``None`` (not known yet) skips the count check.

    Raises:
        ValueError: naming the option and the rule it breaks.
    """
    rule = "finite numbers > 0" if name == "std" else "finite numbers"
    items = list(values) if isinstance(values, (list, tuple)) else [values]
    if not items or not all(_is_real(v) and math.isfinite(v) for v in items) or (
            name == "std" and not all(v > 0 for v in items)):
        raise ValueError(f"{name} values must be {rule} (one per input channel), got {values!r}")
    if in_chans is not None and len(items) not in (1, in_chans):  # one value broadcasts over the channels
        raise ValueError(f"{name}: {len(items)} values for {in_chans} input channels (give {in_chans}, "
                         f"or one for every channel)")
    return tuple(float(v) for v in items)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming the option and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_name(name: str, value: Any) -> str:
    """``value`` if it is a non-empty string (the choices depend on the family: see :func:`check_preprocessing`)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a name such as 'bicubic', got {value!r}")
    return value


def check_gem_p(value: Any) -> float:
    """The GeM exponent as a float: a finite number > 0 (0 divides by zero, < 0 inverts the mean)."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"gem_p must be a finite number > 0, got {value!r}")
    return float(value)


def resolve_gem_p(pooling: str, gem_p: Any = None) -> float:
    """The GeM exponent a CNN family pools with: ``gem_p`` (default 3) checked, and refused unless
    ``pooling`` is ``gem`` (it would change nothing but the feature-set hash)."""
    if gem_p is None:
        return 3.0
    if pooling != "gem":
        raise ValueError(f"gem_p applies to pooling=gem only, pooling is {pooling!r}")
    return check_gem_p(gem_p)


def check_encoder_options(options: dict[str, Any]) -> None:
    """Checks the values of the options every family shares, before any model is built.

    ``build_encoder`` calls it for every family (registered, open registry, ``ssl2d``), so a new
    family gets the checks too. Options a family does not take are refused by the family's builder;
    what depends on the built encoder (``mean``/``std`` against its channels, the interpolations its
    preprocessing knows) is checked once it is built (:func:`check_preprocessing`).

    Raises:
        ValueError: ``img_size`` outside 1-``MAX_SIZE`` pixels, ``gem_p`` not a finite number > 0,
            ``mean``/``std`` not finite (``std`` <= 0), an unknown ``channel_mode``, an
            ``interpolation`` that is not a name, ``crop_pct`` outside (0, 1].
    """
    if options.get("img_size") is not None:
        to_2tuple(options["img_size"])
    model_kwargs = options.get("model_kwargs")
    if isinstance(model_kwargs, dict) and model_kwargs.get("img_size") is not None:
        to_2tuple(model_kwargs["img_size"])  # timm builds the network at that size
    if "gem_p" in options and options["gem_p"] is not None:
        check_gem_p(options["gem_p"])
    for name in ("mean", "std"):
        if options.get(name) is not None:
            check_stats(name, options[name])
    if options.get("channel_mode") is not None:
        check_choice("channel_mode", options["channel_mode"], CHANNEL_MODES)
    if options.get("interpolation") is not None:
        check_name("interpolation", options["interpolation"])
    if options.get("crop_pct") is not None:
        check_crop_pct(options["crop_pct"])


def check_crop_pct(value: Any) -> float:
    if not _is_real(value) or not 0 < value <= 1:  # NaN fails both comparisons
        raise ValueError(f"crop_pct must be a number in (0, 1], got {value!r}")
    return float(value)


@contextlib.contextmanager
def _named(key: str):
    """Prefixes a ValueError raised inside with the encoder key (``tv/resnet18: gem_p must be ...``)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def check_preprocessing(encoder: Encoder) -> None:
    """Checks a built encoder's resolved preprocessing (``encoder.info``), whichever family built it.

    Raises:
        ValueError: an input size outside 1-``MAX_SIZE`` pixels, ``mean``/``std`` that are not one
            finite value per input channel (``std`` > 0), a channel mode, resize or intensity mode
            that is not known, an interpolation the encoder's preprocessing does not know
            (:meth:`Encoder.interpolations`).
    """
    info = encoder.info
    with _named(info.key):
        to_2tuple(tuple(info.input_size))
        check_stats("mean", info.mean, info.in_chans)
        check_stats("std", info.std, info.in_chans)
        check_choice("channel_mode", info.channel_mode, CHANNEL_MODES)
        check_choice("interpolation", info.interpolation, encoder.interpolations())
        check_choice("resize", info.resize, RESIZE_MODES)
        check_choice("intensity", info.intensity, INTENSITY_MODES)


def apply_preprocess_overrides(info: EncoderInfo, *, mean: tuple[float, ...] | None = None,
                               std: tuple[float, ...] | None = None, crop_pct: float | None = None,
                               interpolation: str | None = None, channel_mode: str | None = None) -> None:
    """User overrides of the resolved preprocessing (e.g. a checkpoint trained with other stats).

    ``mean``/``std``: one finite number per input channel (or one for all; ``std`` > 0);
    ``channel_mode``: one of :data:`CHANNEL_MODES`; ``interpolation``: a name (which names the
    family's preprocessing knows is checked on the built encoder, :func:`check_preprocessing`);
    ``crop_pct``: in (0, 1].

    Raises:
        ValueError: naming the option and the rule it breaks.
    """
    with _named(info.key):
        if mean is not None:
            info.mean = check_stats("mean", mean, info.in_chans)
        if std is not None:
            info.std = check_stats("std", std, info.in_chans)
        if crop_pct is not None:
            info.resize = "shorter"
            info.resize_size = timm_resize_size(info.input_size, check_crop_pct(crop_pct))
        if interpolation is not None:
            info.interpolation = check_name("interpolation", interpolation)
        if channel_mode is not None:
            info.channel_mode = check_choice("channel_mode", channel_mode, CHANNEL_MODES)  # type: ignore[assignment]


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size as (height, width) from one side or a pair of whole numbers of pixels, 1-``MAX_SIZE``.

    Why the upper limit: the ``--size`` limit of the slices (:data:`slice2vol.data.slicing.MAX_SIZE`);
    a 100000-px input asked the allocator for a terabyte in the first resize.
    """
    from slice2vol.data.slicing import MAX_SIZE

    rule = f"img_size must be a whole number of pixels 1-{MAX_SIZE} or a (height, width) pair of them, got {size!r}"
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        pair = (int(size[0]), int(size[1]))
    else:  # a string (img_size=abc) used to unpack into letters: "too many values to unpack"
        raise ValueError(rule)
    if not 1 <= min(pair) <= max(pair) <= MAX_SIZE:
        raise ValueError(rule)
    return pair


def square_size(key: str, img_size: int | tuple[int, int] | list[int]) -> int:
    """The side of a square input (families built for square images only: open_clip, SAM)."""
    height, width = to_2tuple(img_size)
    if height != width:
        raise ValueError(f"{key}: img_size must be square, got {height}x{width}")
    return height


@dataclass
class EncoderConfig:
    """An encoder as a config (``configs/encoders/*.yaml``), e.g. for caching jobs.

    Attributes:
        key: registry key (``slice2vol encoders`` lists them).
        weights: ``random``, ``hub[:tag]`` or a local file/directory.
        kwargs: family options: ``img_size``, ``pooling``, ``crop_pct``, ``model_kwargs``, ...
        device: where the encoder runs.
        batch_size: slices per forward; ``None`` picks one from free memory (:func:`pick_batch_size`).
        channels_last: memory format; ``None`` = on for CNN families.
        compile: ``torch.compile`` the forward (long jobs only).
        amp: ``bf16``/``fp16`` autocast on CUDA; ignored on CPU.
        fold_bn: fold BatchNorm into convolutions (inference only; :meth:`Encoder.fold_batchnorm`).
    """

    key: str = "tv/mobilenet_v2"
    weights: str = "random"
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int | None = None
    channels_last: bool | None = None
    compile: bool = False
    amp: str | None = None
    fold_bn: bool = True

    def build(self) -> Encoder:
        """The encoder on ``device``, eval mode, speed options applied."""
        encoder = build_encoder(self.key, self.weights, **self.kwargs).to(self.device)
        return encoder.optimize(channels_last=self.channels_last, compile=self.compile, amp=self.amp,
                                fold_bn=self.fold_bn)

    def resolved_batch_size(self, encoder: Encoder) -> int:
        return self.batch_size or pick_batch_size(encoder, self.device)


def build_encoder(key: str, weights: str | Path | None = "random", **kwargs: Any) -> Encoder:
    """Builds a registered encoder in eval mode.

    Args:
        key: registry key such as ``timm/resnet50`` (see ``slice2vol encoders``), or any
            ``timm/<name>``, ``openclip/<arch>:<tag>`` or ``hf/<repo_id>`` the libraries know (open
            registry: built from the library's own config and preprocessing).
        weights: ``random``, ``pretrained`` (alias ``imagenet``; found locally, never downloaded),
            ``package``, ``hub[:tag]`` or a local path.
        **kwargs: family options, e.g. ``img_size``, ``pooling``.
    """
    import slice2vol.encoders  # noqa: F401  - fills the registry

    if not isinstance(key, str) or not key:
        raise ValueError(f"an encoder key such as 'timm/resnet50' is needed, got {key!r}")
    with _named(key):
        check_encoder_options(kwargs)  # before anything is built or downloaded
    try:
        if key not in ENCODERS:  # open registry: any timm/<name>, openclip/<arch>:<tag>, hf/<repo>
            builder = slice2vol.encoders.open_builder(key)
            if builder is not None:
                encoder = builder(weights=weights, **kwargs)
                check_preprocessing(encoder)
                return encoder.eval()
        encoder = ENCODERS.build(key, weights=weights, **kwargs)
    except TypeError as err:
        # an option the family does not take (encoders.0.kwargs.nosuch=1) or of the wrong type
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        if kwargs and unknown:
            # the message named an internal function (apply_preprocess_overrides); name the options instead
            known = _keyword_options(err.__traceback__)
            raise ValueError(f"encoder {key!r} has no option {unknown.group(1)!r}"
                             + (f"; it takes {', '.join(known)}" if known else "")) from None
        if kwargs and "argument" in str(err):
            raise ValueError(f"encoder {key!r}: {err} (options given: {sorted(kwargs)})") from None
        raise
    check_preprocessing(encoder)
    return encoder.eval()


def _keyword_options(tb: Any) -> list[str]:
    """The options an encoder takes: the keyword-only parameters of the first function the build went
    through that has any (the family's builder), then the preprocessing overrides every family takes."""
    import inspect

    names: list[str] = []
    tb = tb.tb_next if tb is not None else None  # past build_encoder itself
    while tb is not None and not names:
        code = tb.tb_frame.f_code
        names = [n for n in code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
                 if not n.startswith("default_")]
        tb = tb.tb_next
    overrides = [p.name for p in inspect.signature(apply_preprocess_overrides).parameters.values()
                 if p.kind is p.KEYWORD_ONLY]
    return names + [n for n in overrides if n not in names]
