"""Trained 2D SSL encoders as slice :class:`~slice2vol.encoders.base.Encoder` s (keys ``ssl2d/<method>``).

``build_encoder("ssl2d/simclr", weights="runs/simclr2d/last")`` rebuilds the backbone from the
checkpoint's config and loads its weights, so the caching job embeds slices with a network
pretrained on the user's own MRI slices. Slices are fed as the SSL run saw them: intensities in
[0, 1] unchanged (mean 0, std 1), one channel (the middle one of a 2.5D stack), resized to the
training slice size.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from slice2vol.encoders.base import ENCODERS, Encoder, EncoderInfo, parse_weights, sha256_file

SSL_METHOD_NAMES = ("autoencoder", "genesis", "jigsaw", "mae", "rotation", "simclr")


class SSLSliceEncoder(Encoder):
    """A 2D SSL backbone behind the slice-encoder interface."""

    def __init__(self, backbone: torch.nn.Module, info: EncoderInfo) -> None:
        super().__init__()
        self.backbone, self.info = backbone, info

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        fm = self.backbone.feature_map(x)  # (B, F, gh, gw)
        return fm.flatten(2).transpose(1, 2), (int(fm.shape[2]), int(fm.shape[3]))


def build_ssl2d(method: str, weights: str | Path | None = "random", **kwargs) -> SSLSliceEncoder:
    """Builds ``ssl2d/<method>`` from a checkpoint (``weights=<run>/last``) or randomly initialised.

    Args:
        method: the SSL method the checkpoint must come from.
        weights: ``random`` (the method's default 2D config) or a checkpoint directory/file.
        **kwargs: for ``random`` only, overrides of :class:`~slice2vol.ssl.config.SSLConfig` fields.
    """
    from slice2vol.ssl import build_method
    from slice2vol.ssl.trainer import load_checkpoint

    kind, path = parse_weights(weights)
    if kind == "hub":
        raise ValueError(f"ssl2d/{method}: SSL encoders have no hub weights; pass weights=<run dir>/last")
    if kind == "file":
        model, cfg, meta = load_checkpoint(path)
        if cfg.method != method or cfg.spatial_dims != 2:
            raise ValueError(f"{path}: checkpoint is {cfg.method} {cfg.spatial_dims}D, not a 2D {method} encoder "
                             f"(use ssl2d/{cfg.method} for 2D checkpoints, slice2vol embed for 3D ones)")
        weights_label, digest = str(meta["checkpoint"]), sha256_file(meta["encoder_file"])
    else:
        defaults = {"method": method, "spatial_dims": 2}
        if method == "mae":
            defaults["backbone"] = {"name": "vit", "params": {"patch_size": 8}}
        cfg = _cfg_from(defaults, kwargs)
        model, weights_label, digest = build_method(cfg), "random", ""
    backbone = model.encoder.eval()
    size = tuple(cfg.data.slice_size)
    with torch.no_grad():
        fm = backbone.feature_map(torch.zeros(1, cfg.in_channels, *size))
    # the run resized slices bilinearly; older EncoderInfo versions have no ``interpolation`` field
    interp = {"interpolation": "bilinear"} if "interpolation" in EncoderInfo.__dataclass_fields__ else {}
    info = EncoderInfo(key=f"ssl2d/{method}", embed_dim=backbone.embed_dim, input_size=size,
                       in_chans=cfg.in_channels, mean=(0.0,) * cfg.in_channels, std=(1.0,) * cfg.in_channels,
                       patch_size=size[0] // fm.shape[2], token_dim=int(fm.shape[1]), source="slice2vol.ssl",
                       weights=weights_label, weights_sha256=digest, pooling="avg",
                       extra={"backbone": cfg.backbone.name, "method": method}, **interp)
    return SSLSliceEncoder(backbone, info)


def _cfg_from(defaults: dict, overrides: dict):
    from slice2vol.config import from_dict
    from slice2vol.ssl import SSLConfig

    return from_dict(SSLConfig, {**defaults, **overrides})


for _method in SSL_METHOD_NAMES:
    ENCODERS.register(f"ssl2d/{_method}", source="slice2vol.ssl", dims=2)(functools.partial(build_ssl2d, _method))
