"""BrainDINO (``braindino/vit_base``): a DINOv3 ViT-B/16 self-distilled on ~6.6 M axial brain-MRI slices of
20 datasets (Wu et al., "BrainDINO: A Brain MRI Foundation Model for Generalizable Clinical Representation
Learning", arXiv:2604.27277; code github.com/mclwu22/BrainDINO). The natural opponent of ImageNet weights:
same kind of network, pretrained on brain slices instead of photographs.

Architecture, as the authors build their encoder (``vit_base(layerscale_init=1e-5, n_storage_tokens=4,
qkv_bias=False, mask_k_bias=True)`` of their DINOv3 copy, ``networks/SliceStudent.py``): 12 blocks, width
768, 12 heads, patch 16, 4 storage (register) tokens, rotary positions (base 100), LayerScale, LayerNorm
eps 1e-6 (their ``vit_base`` default norm), no qkv bias. Built with timm's DINOv3 implementation
(``vit_base_patch16_dinov3`` with that norm), whose own checkpoint filter converts DINOv3's parameter
names. Two differences to their code that no checkpoint can reveal are documented, not hidden: DINOv3
computes the rotary tables in bfloat16 by default, timm in float32.

Checkpoint layout, as their loader (``SliceStudent.load_backbone_checkpoint``) reads it: a dict holding
``teacher`` (else ``model``, else the state dict itself) whose backbone tensors carry a ``backbone.``
prefix next to ``dino_head.*`` / ``ibot_head.*`` projection heads. Loading here is strict: every backbone
tensor must be used and every model tensor filled, with the right shape; only the projection heads and
the training-only buffers DINOv3 keeps (``mask_token``, rotary ``periods``, ``bias_mask``) are left out.

Weights: not published yet (their README: "the pretrained weights ... will be made publicly available
upon publication"), so ``random``, a local checkpoint file, or ``pretrained`` =
``$SLICE2VOL_WEIGHTS/braindino_vitb16.pth`` (any of :data:`CHECKPOINT_NAMES`); never a download.

Preprocessing, as the authors run BrainDINO downstream (their ``datasets_3D`` loaders): the whole volume
robust-z-scored (clip to the 1st-99th percentiles of the non-zero voxels, subtract the mean and divide by
the std of the voxels then above zero), axial slices resized to 224 x 224 with ``F.interpolate(bilinear,
align_corners=False)`` (no antialiasing), grey replicated to 3 channels, no ImageNet normalisation; the
CLS token after the final norm (``x_norm_clstoken``) is the slice feature. ``Encoder.preprocess`` receives
slices, not volumes, so it applies the same robust z-score to each slice (``intensity="zscore"``), then
the same resize; :func:`volume_inputs` reproduces the volume-level recipe exactly (z-score over the
volume, depth resampled to ``n_slices`` by trilinear interpolation) for callers that hold the volume.

Pooling: ``cls`` (default, the authors' slice feature) | ``mean`` | ``cls_mean`` | ``head``. Dense
features: every block (stride 16), storage tokens dropped, through timm's ``forward_intermediates``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slice2vol.encoders.base import (
    ENCODERS,
    EncoderInfo,
    WeightsUnavailable,
    apply_preprocess_overrides,
    assign_state_dict,
    parse_weights,
    sha256_file,
    to_2tuple,
)
from slice2vol.encoders.timm import TimmEncoder
from slice2vol.encoders.weights import PretrainedSpec, resolve_pretrained

TIMM_ARCH = "vit_base_patch16_dinov3"
CHECKPOINT_NAMES = ("braindino_vitb16.pth", "braindino_teacher_checkpoint.pth", "braindino.pth")
#: projection heads of the self-distillation objective: in the checkpoint, not part of the encoder
HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")
#: DINOv3 training-only tensors timm's filter drops (no counterpart in an inference network)
TRAINING_ONLY = ("mask_token", ".periods", ".bias_mask")
POOLINGS = ("cls", "mean", "cls_mean", "head")
PAPER = "arXiv:2604.27277"


def backbone_state(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of a BrainDINO checkpoint in DINOv3's own names (``backbone.`` stripped).

    Raises:
        ValueError: no backbone tensors, or tensors that are neither backbone nor projection heads.
    """
    for container in ("teacher", "model"):
        if isinstance(state.get(container), dict):
            state = state[container]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if not backbone:  # a bare encoder state dict
        backbone = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIXES)}
    stray = [k for k in tensors if not k.startswith(("backbone.", *HEAD_PREFIXES)) and k not in backbone]
    if stray:
        raise ValueError(f"{source}: not a BrainDINO checkpoint: tensors {stray[:4]} are neither backbone."
                         f"* nor projection heads")
    if "cls_token" not in backbone or "storage_tokens" not in backbone:
        raise ValueError(f"{source}: not a BrainDINO (DINOv3) checkpoint: no cls_token/storage_tokens among "
                         f"{sorted(backbone)[:6]}")
    return backbone


def load_backbone(model: torch.nn.Module, path: str, key: str) -> None:
    """Loads a BrainDINO checkpoint into the timm DINOv3 model, strictly (see the module docstring)."""
    import timm.models.eva as eva

    raw = _read(path)
    backbone = backbone_state(raw, str(path))
    converted = eva.checkpoint_filter_fn(backbone, model)
    # every backbone tensor must land somewhere: timm drops only the training-only buffers
    used = {k for k in backbone if not k.endswith(TRAINING_ONLY)}
    expected_out = len(used)
    if len(converted) != expected_out:
        raise ValueError(f"{key}: {path}: {expected_out} backbone tensors but {len(converted)} converted "
                         f"(a different DINOv3 variant?)")
    assign_state_dict(model, converted, key, source=str(path), optional_prefixes=())


def _read(path: str) -> dict[str, Any]:
    """torch.load(weights_only=True) without unwrapping, so ``teacher``/``model`` containers stay visible."""
    from slice2vol.checkpoint_io import read_weights

    state = read_weights(path)  # safetensors or weights_only torch file; one line for anything else
    if not isinstance(state, dict):
        raise ValueError(f"{path}: checkpoint is not a dict of tensors")
    return state


def volume_inputs(volume: torch.Tensor, n_slices: int | None = 128, size: int = 224) -> torch.Tensor:
    """The authors' volume recipe: (D, H, W) intensities (D = axial axis) -> network inputs (N, 3, size, size).

    Robust z-score of the whole volume (:func:`~slice2vol.encoders.base.robust_zscore` on it as one image),
    depth resampled to ``n_slices`` (trilinear, ``align_corners=False``; ``None`` keeps every slice), each
    slice resized to ``size`` x ``size`` (bilinear, ``align_corners=False``), grey replicated to 3 channels.
    """
    from slice2vol.encoders.base import robust_zscore

    vol = robust_zscore(volume.float()[None, None])[0, 0]  # (D, H, W)
    if n_slices is not None and n_slices != vol.shape[0]:
        vol = F.interpolate(vol[None, None], size=(n_slices, *vol.shape[1:]), mode="trilinear",
                            align_corners=False)[0, 0]
    vol = F.interpolate(vol[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return vol[:, None].expand(-1, 3, -1, -1)


def build_braindino(weights: str | Path | None = "random", *, img_size: int | tuple[int, int] = 224,
                    pooling: str = "cls", model_kwargs: dict[str, Any] | None = None,
                    **overrides: Any) -> TimmEncoder:
    """Builds ``braindino/vit_base``.

    Args:
        weights: ``random``, ``pretrained`` (``$SLICE2VOL_WEIGHTS``, see :data:`CHECKPOINT_NAMES`) or a
            local checkpoint in the authors' layout (or a bare DINOv3 encoder state dict).
        img_size: network input side (a multiple of 16; rotary positions need no resampling); 224 as the
            authors' downstream tasks.
        pooling: see the module docstring.
        model_kwargs: ``timm.create_model`` changes (tests: ``depth=2``).
        **overrides: ``mean``, ``std``, ``interpolation``, ``channel_mode``.
    """
    import timm
    from timm.layers import LayerNorm

    key = "braindino/vit_base"
    if pooling not in POOLINGS:
        raise ValueError(f"{key}: pooling must be one of {POOLINGS}, got {pooling!r}")
    kind, ref = parse_weights(weights, pretrained=True)
    if kind == "hub":
        raise WeightsUnavailable(f"{key}: BrainDINO's weights are not on any hub yet ({PAPER}: 'upon "
                                 f"publication'); pass the checkpoint file: weights='/path/to/{CHECKPOINT_NAMES[0]}'")
    origin: dict[str, str] = {}
    if kind == "pretrained":
        spec = PretrainedSpec(key=key, description=f"BrainDINO ViT-B/16, ~6.6 M axial brain-MRI slices ({PAPER})",
                              files=CHECKPOINT_NAMES, dataset="brain MRI",
                              url="https://github.com/mclwu22/BrainDINO (weights announced for publication)")
        resolved = resolve_pretrained(spec, ref)
        kind, ref, origin = "file", str(resolved.path), resolved.provenance()
    size = to_2tuple(img_size)
    if size[0] % 16 or size[1] % 16:
        raise ValueError(f"{key}: img_size must be a multiple of the patch size 16, got {size}")
    arch = dict(img_size=size, global_pool="token", norm_layer=partial(LayerNorm, eps=1e-6), num_classes=0)
    model = timm.create_model(TIMM_ARCH, pretrained=False, **{**arch, **(model_kwargs or {})})
    sha, used = "", "random"
    if kind == "file":
        load_backbone(model, ref, key)
        sha = origin.get("sha256") or sha256_file(ref)
        used = "pretrained" if origin else ref
    width = int(model.num_features)
    info = EncoderInfo(
        key=key, embed_dim=width * (2 if pooling == "cls_mean" else 1), input_size=size, mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0), patch_size=16, token_dim=width, source="timm (DINOv3, BrainDINO layout)",
        weights=used, weights_sha256=sha, pooling=pooling, resize="squash", intensity="zscore",
        interpolation="torch-bilinear", weights_origin=origin,
        extra={"arch": TIMM_ARCH, "kind": "vit", "num_prefix_tokens": int(model.num_prefix_tokens),
               "paper": PAPER, "storage_tokens": 4},
    )
    apply_preprocess_overrides(info, **overrides)
    return TimmEncoder(model, info, kind="vit", pooling=pooling)


@ENCODERS.register("braindino/vit_base", embed_dim=768, params_m=85.64, family="braindino", input_size=224,
                   img_size="multiple of 16 (rotary positions)", pretrained=f"brain MRI, 6.6 M slices ({PAPER}); "
                   "local file only")
def braindino_vit_base(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """BrainDINO ViT-B/16 (DINOv3 on axial brain-MRI slices): robust z-score, 224 px, CLS feature."""
    return build_braindino(weights, **kwargs)
