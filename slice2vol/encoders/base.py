"""The encoder interface every 2D model family implements, plus weight resolution helpers.

An :class:`Encoder` takes raw slices as produced by :func:`slice2vol.data.slice_volume` — float
tensors of shape (B, C, h, w) with intensities in [0, 1] — and does its own family-specific
preprocessing on the device (channel adaptation, resize, normalisation), batched. Families register a
builder in :data:`ENCODERS` under ``<source>/<model>`` keys, e.g. ``timm/resnet50``.

Weights are given as a string: ``random`` (no network, always works), ``hub`` or ``hub:<tag>`` (the
library's own download, honouring the Hugging Face cache and ``HF_HUB_OFFLINE``), or a path to a local
file (``.safetensors``, ``.pth``/``.pt``/``.bin``, loaded with ``weights_only=True``) or directory.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.registry import Registry

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
        resize: ``squash`` (resize to input size), ``longest`` (longest side, then pad, as SAM).
        channel_mode: how C input channels become ``in_chans`` (``replicate``, ``stack``, ``mean``).
        intensity: ``unit`` (slices in [0, 1] scaled by mean/std) or ``minmax`` (per-image min-max
            to [0, 1] first, as MedSAM).
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
    resize: Literal["squash", "longest"] = "squash"
    channel_mode: Literal["replicate", "stack", "mean"] = "replicate"
    intensity: Literal["unit", "minmax"] = "unit"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


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

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Raw slices (B, C, h, w) in [0, 1] -> network input (B, in_chans, H, W), batched on x's device."""
        x = x.float()
        if self.info.intensity == "minmax":
            flat = x.flatten(1)
            lo = flat.min(1).values[:, None, None, None]
            hi = flat.max(1).values[:, None, None, None]
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        x = self.adapt_channels(x)
        height, width = self.info.input_size
        if self.info.resize == "longest":
            scale = max(height, width) / max(x.shape[-2:])
            new = (int(x.shape[-2] * scale + 0.5), int(x.shape[-1] * scale + 0.5))
            if new != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
            mean = torch.tensor(self.info.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.info.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
            return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.info.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    # -- model ---------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, in_chans, H, W) -> pooled embedding (B, embed_dim)."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Preprocessed (B, in_chans, H, W) -> patch tokens (B, T, token_dim) and their grid (gh, gw)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw slices (B, C, h, w) in [0, 1] -> embeddings (B, embed_dim)."""
        return self.forward_features(self.preprocess(x))

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raw slices (B, C, h, w) in [0, 1] -> (tokens (B, T, token_dim), grid (gh, gw)), T = gh * gw."""
        return self.forward_tokens(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def gem_pool(feature_map: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of (B, D, h, w) -> (B, D)."""
    return feature_map.clamp_min(eps).pow(p).mean((-2, -1)).pow(1.0 / p)


# -- weights ----------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def parse_weights(weights: str | Path | None) -> tuple[Literal["random", "hub", "file"], str]:
    """``random`` | ``hub`` | ``hub:<tag>`` | path -> (kind, tag-or-path).

    Raises:
        FileNotFoundError: a path that does not exist (anything not ``random``/``hub*`` is a path).
    """
    if weights is None or str(weights) in ("", "random", "none"):
        return "random", ""
    text = str(weights)
    if text == "hub" or text.startswith("hub:"):
        return "hub", text[4:]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found (use 'random', 'hub[:tag]' or a local file)")
    return "file", str(path)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint safely: safetensors, or torch.load with ``weights_only=True``.

    Unwraps the usual containers (``state_dict``, ``model``, ``module.`` prefixes).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - surface one clear line
            raise ValueError(f"{path}: cannot read checkpoint safely ({' '.join(str(err).split())[:160]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: checkpoint is not a state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def hub_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when hub downloads may work: not in offline mode and the host answers within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(key: str, what: str, local_hint: str, host: str = "huggingface.co") -> None:
    """Fails fast (seconds, never the ~23 s/file retry loop) when hub weights cannot be downloaded.

    Args:
        key: encoder key, for the message.
        what: the hub object (repo id, tag) asked for.
        local_hint: how to pass a local file instead, e.g. ``--weights /path/model.safetensors``.
    """
    if not hub_available(host):
        raise WeightsUnavailable(
            f"{key}: cannot download {what} (offline or {host} unreachable, and not in the local cache). "
            f"Pass a local checkpoint instead: {local_hint}"
        )


def build_encoder(key: str, weights: str | Path | None = "random", **kwargs: Any) -> Encoder:
    """Builds a registered encoder in eval mode.

    Args:
        key: registry key such as ``timm/resnet50`` (see ``slice2vol encoders``).
        weights: ``random``, ``hub[:tag]`` or a local path.
        **kwargs: family options, e.g. ``img_size``, ``pooling``.
    """
    import slice2vol.encoders  # noqa: F401  - fills the registry

    encoder = ENCODERS.build(key, weights=weights, **kwargs)
    return encoder.eval()
