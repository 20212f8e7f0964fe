"""Self-supervised Swin UNETR encoder (``3d/swin_unetr_ssl``, Tang et al. 2022, CVPR).

The Swin transformer encoder (``swinViT``) of MONAI's ``SwinUNETR`` (feature size 48, depths 2-2-2-2,
heads 3-6-12-24, window 7, patch 2), pretrained by Tang et al. with inpainting, rotation and contrastive
losses on 5,050 CT volumes (https://github.com/Project-MONAI/research-contributions, ``SwinUNETR/Pretrain``).

Published checkpoint ``model_swinvit.pt`` (MONAI-extra-test-data release 0.8.1):
``{"state_dict": {"module.patch_embed.proj.weight", "module.layers1.0.blocks.0.mlp.fc1.weight", ...}}`` —
the encoder under ``module.`` with the MLP layers named ``fc1``/``fc2`` (MONAI now names them
``linear1``/``linear2``; MONAI's own ``SwinUNETR.load_from`` and ``filter_swinunetr`` do the same renaming),
plus the pretraining heads ``module.norm``, ``module.rotation_head``, ``module.contrastive_head`` and
``module.convTrans3d``. All of them are loaded strictly: the encoder into MONAI's ``SwinTransformer``
(``downsample="merging"``, the v0.9 patch merging the weights were trained with), the heads into modules
shaped from the file (they are not used for embedding). Checkpoints saved by the current ``SSLHead``
(``swin_vit.*``, heads under ``rotation_head``/``contrastive_head``/``conv``) load too.

Preprocessing (Tang et al.'s brain-MRI recipe, BraTS fine-tuning from these weights): RAS, 1 mm voxels,
cropped to the head, z-score over nonzero voxels (``NormalizeIntensity(nonzero=True)``), sizes padded to
multiples of 32. The authors infer with 96^3 (pretraining) / 128^3 (BraTS) sliding windows, overlap 0.5:
``sliding_window={"roi_size": [96, 96, 96], "overlap": 0.5}``; the default embeds the whole volume.

Features: the five normalised hidden states of ``swinViT`` (48 ch at stride 2, 96 at 4, 192 at 8, 384 at
16, 768 at 32), average-pooled; default the last (what the SSL heads read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from slice2vol.encoders.base import require_hub, sha256_file
from slice2vol.encoders3d.base import (
    ENCODERS3D,
    Encoder3DInfo,
    FeatureLevel3D,
    RecipeEncoder,
    load_strict,
    published_weights,
    read_checkpoint,
    resolve_levels,
    seeded,
    strip_prefix,
    unwrap,
)
from slice2vol.encoders3d.preprocess import Recipe

URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt"
LAYOUT = ("{'state_dict': {'module.patch_embed.proj.weight', 'module.layers1.0.blocks.0.mlp.fc1.weight', ..., "
          "'module.norm.*', 'module.rotation_head.*', 'module.contrastive_head.*', 'module.convTrans3d.*'}}")
HEADS = ("norm", "rotation_head", "contrastive_head", "convTrans3d", "conv")
CHANNELS = (48, 96, 192, 384, 768)
STRIDES = (2, 4, 8, 16, 32)


def swin_vit(feature_size: int = 48, in_chans: int = 1) -> nn.Module:
    """MONAI ``SwinTransformer`` configured as SwinUNETR's ``swinViT`` in Tang et al.'s pretraining."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    return SwinTransformer(in_chans=in_chans, embed_dim=feature_size, window_size=(7, 7, 7), patch_size=(2, 2, 2),
                           depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0, qkv_bias=True,
                           drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm,
                           use_checkpoint=False, spatial_dims=3, downsample="merging", use_v2=False)


class SwinSSLCheckpoint(nn.Module):
    """The encoder plus whatever pretraining heads a checkpoint ships (shaped from the file)."""

    def __init__(self, encoder: nn.Module, heads: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.swin_vit = encoder
        self.heads = nn.ModuleDict({name: _head_like(name, tensors) for name, tensors in (heads or {}).items()})


def _head_like(name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose parameters have the names and shapes of a checkpoint head (never run here)."""
    if set(tensors) <= {"weight", "bias"} and "weight" in tensors:
        w = tensors["weight"]
        if name == "norm" or w.ndim == 1:
            return nn.LayerNorm(w.shape[0])
        if w.ndim == 2:
            return nn.Linear(w.shape[1], w.shape[0], bias="bias" in tensors)
        if w.ndim == 5:  # ConvTranspose3d (in, out, k...) as in convTrans3d
            return nn.ConvTranspose3d(w.shape[0], w.shape[1], tuple(w.shape[2:]), stride=tuple(w.shape[2:]),
                                      bias="bias" in tensors)
    holder = nn.Module()  # e.g. SSLHead's 'vae' decoder: keep every tensor under its own name
    for sub, tensor in tensors.items():
        parent = holder
        parts = sub.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(parts[-1], nn.Parameter(torch.empty_like(tensor), requires_grad=False))
    return holder


def to_model_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Published keys -> (encoder state with MONAI names, {head: its tensors})."""
    state = strip_prefix(state, "module.")
    encoder, heads = {}, {}
    for name, tensor in state.items():
        if name.startswith("swin_vit."):
            name = name[len("swin_vit."):]
        head = name.split(".", 1)[0]
        if head in HEADS:
            heads.setdefault(head, {})[name.split(".", 1)[1]] = tensor
            continue
        encoder[name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")] = tensor
    return encoder, heads


def _download(tag: str) -> str:
    """``model_swinvit.pt`` from the MONAI release into the torch hub cache (fails fast offline)."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / "model_swinvit.pt"
    if target.exists():
        return str(target)
    require_hub("3d/swin_unetr_ssl", URL, "--weights /path/to/model_swinvit.pt", host="github.com")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(URL, str(target), progress=False)
    return str(target)


@ENCODERS3D.register("3d/swin_unetr_ssl", embed_dim=768, source="MONAI research-contributions (Tang et al. 2022)",
                     weights=("random", "hub", "file"))
def build_swin_unetr_ssl(weights: str | Path | None = "random", *, levels: Sequence[int] | int | str | None = -1,
                         pooling: str = "avg", spacing: Sequence[float] | float | None = 1.0,
                         input_size: Sequence[int] = (96, 96, 96), intensity: str = "zscore_nonzero",
                         margin: int = 0, seed: int = 0, channel: int | None = None) -> RecipeEncoder:
    """Tang et al.'s self-supervised Swin UNETR encoder.

    Args:
        weights: ``random``, ``hub`` (``model_swinvit.pt`` from the MONAI release) or a local file.
        levels: pooled hidden states (0-4; default the last, 768 channels).
        pooling: ``avg``, ``max`` or ``gem``.
        spacing: voxel size (mm) to resample to (authors' MRI: 1 mm); ``None`` keeps the grid.
        input_size: window for sliding-window embedding (pretraining ROI 96^3).
        intensity: intensity recipe (:class:`Recipe`), default the authors' nonzero z-score.
        margin: voxels kept around the head box.
        seed: random-init seed.
    """
    key = "3d/swin_unetr_ssl"
    kind, path = published_weights(key, weights, filename="model_swinvit.pt", where=URL, layout=LAYOUT, hub=_download)
    encoder = seeded(seed, swin_vit)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    shown, digest = f"random:seed={seed}", ""
    if path is not None:
        enc_state, heads = to_model_layout(unwrap(read_checkpoint(path), ("state_dict", "model"), path, key))
        load_strict(encoder, enc_state, path, key, f"published layout {LAYOUT}")
        shown, digest = (f"hub:{path.name}" if kind == "hub" else str(path)), sha256_file(path)
    network = SwinSSLCheckpoint(encoder, heads)
    if heads:  # every head tensor of the file is loaded too (strict): nothing is silently dropped
        load_strict(network.heads, {f"{h}.{k}": v for h, t in heads.items() for k, v in t.items()}, path, key)
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    recipe = Recipe(spacing=None if spacing is None else tuple(float(s) for s in spacing), crop="foreground",
                    margin=margin, resize="none", divisor=32, intensity=intensity)  # type: ignore[arg-type]
    chosen = resolve_levels(levels, 5, key)
    feature_levels = [FeatureLevel3D(i, f"swinViT.{n}", c, s) for i, (n, c, s) in
                      enumerate(zip(("patch_embed", "layers1", "layers2", "layers3", "layers4"), CHANNELS, STRIDES))]
    crop, intensity_text = recipe.describe()
    info = Encoder3DInfo(
        key=key, embed_dim=sum(CHANNELS[i] for i in chosen), source="MONAI SwinUNETR (Tang et al. 2022)",
        weights=shown, weights_sha256=digest, in_chans=1, spacing=recipe.spacing,
        input_size=tuple(int(s) for s in input_size), size_divisor=32, axes="RAS", crop=crop,
        intensity=intensity_text, pooling=pooling, levels=chosen, checkpoint=f"model_swinvit.pt: {LAYOUT}",
        reference="Tang et al. 2022, Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis",
        extra={"heads": sorted(heads), "authors_inference": "sliding windows 96^3 (BraTS 128^3), overlap 0.5",
               "seed": seed})

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        return list(encoder(x, True))  # normalize=True, as SwinUNETR calls it

    return RecipeEncoder(network, stages, feature_levels, info, recipe, channel)
