"""open_clip image towers (``openclip/<arch>:<tag>``): OpenAI CLIP ViTs and BiomedCLIP.

Only the vision tower is built: slice features never need the text tower, and BiomedCLIP's text
tower would need a hub download of its BERT config just to exist.

Outputs:
  * ``encode`` with pooling ``proj`` (default): the projected image embedding, exactly what
    ``model.encode_image`` returns (not L2-normalised). ``mean``: mean of the patch tokens before
    the projection (``token_dim`` wide).
  * ``tokens``: patch tokens after the final LayerNorm, before the projection (B, gh * gw, width),
    grid ``input_size / patch``.

Preprocessing reproduces open_clip's eval transform for the weights' tag on whole batches: shorter
side to the input size (bicubic, antialiased and clipped like 8-bit PIL), centre crop, CLIP mean/std.
Square slices (``SliceConfig.size``) are only resized; non-square ones lose the ends of the long side
as open_clip's crop does (pass ``resize="squash"`` to keep them whole instead).

Architecture facts that matter for real weights:
  * OpenAI weights were trained with QuickGELU. open_clip 3.x builds ``ViT-B-16`` with ``nn.GELU``
    and only *warns* when given ``pretrained='openai'``; here the activation follows the weights
    tag's ``quick_gelu`` flag, so ``openclip/<arch>:openai`` is the network OpenAI trained.
  * BiomedCLIP's architecture lives on the hub (``open_clip_config.json``); it is kept in this file so
    the tower builds offline: timm ``vit_base_patch16_224`` trunk pooled by its CLS token, a bias-free
    linear projection 768 -> 512, CLIP mean/std, 224 px, shorter-side bicubic resize + crop.

Input size (``img_size=``): any multiple of the patch size. The tower is built for that size; loaded
position embeddings are resized bicubically (open_clip's ``resize_pos_embed``; timm's
``set_input_size`` for BiomedCLIP's timm trunk).

Weights: ``random``; ``hub`` (the key's tag) or ``hub:<open_clip tag>`` for the built-in
architectures (e.g. ``hub:laion2b_s34b_b88k``), from the Hugging Face cache or hub; or a local file
in open_clip's format — the full CLIP state dict that ``open_clip.create_model(arch,
pretrained=PATH)`` reads (``visual.*`` keys; ``.bin``/``.pt``/``.pth``/``.safetensors``) or the vision
tower's own state dict. A local file is taken to hold the key's tag's weights: for another open_clip
tag of the same architecture trained with plain GELU (e.g. LAION's), pass ``quick_gelu=False`` — the
activation has no parameters, so a checkpoint cannot reveal it. OpenAI's original TorchScript ``.pt``
files cannot be read without unsafe unpickling; use the open_clip conversion on the hub
(``timm/vit_*_clip_224.openai``) instead.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn as nn

from slice2vol.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODERS,
    Encoder,
    EncoderInfo,
    FeatureLevel,
    WeightsUnavailable,
    apply_preprocess_overrides,
    assign_state_dict,
    hf_download,
    load_state_dict,
    ordered_levels,
    parse_weights,
    require_hub,
    sha256_file,
    square_size,
)
from slice2vol.encoders.weights import PretrainedSpec, resolve_pretrained

HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# Vision half of the hub's open_clip_config.json (the text half needs BiomedBERT from the hub).
BIOMEDCLIP_CFG: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {
        "timm_model_name": "vit_base_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    },
}
BIOMEDCLIP_PREPROCESS = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}

POOLINGS = ("proj", "mean")


class OpenCLIPEncoder(Encoder):
    """An open_clip vision tower (``VisionTransformer`` or ``TimmModel``) behind :class:`Encoder`.

    Args:
        visual: the tower, as ``model.visual`` of an open_clip CLIP model.
        info: resolved encoder facts.
        pooling: ``proj`` (projected image embedding) or ``mean`` (mean patch token, pre-projection).
    """

    def __init__(self, visual: nn.Module, info: EncoderInfo, pooling: str = "proj") -> None:
        super().__init__()
        self.visual = visual
        self.info = info
        self.pooling = pooling
        self.is_timm = hasattr(visual, "trunk")
        if not self.is_timm:
            visual.output_tokens = True  # forward returns (projected pooled, patch tokens) in one pass

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (projected embedding (B, embed_dim), patch tokens (B, T, width))."""
        if self.is_timm:
            trunk = self.visual.trunk
            feats = trunk.forward_features(x)
            pooled = self.visual.head(trunk.forward_head(feats))
            return pooled, feats[:, trunk.num_prefix_tokens:]
        return self.visual(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pooled, tokens = self._forward(x)
        return pooled if self.pooling == "proj" else tokens.mean(1)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        _, tokens = self._forward(x)
        patch = self.info.patch_size
        return tokens, (x.shape[-2] // patch, x.shape[-1] // patch)

    # -- dense features: open_clip's forward_intermediates --------------------------------------
    def feature_info(self) -> list[FeatureLevel]:
        """Every block of the trunk: ``transformer.resblocks.<i>`` (open_clip ViT) or ``trunk.blocks.<i>``
        (timm trunk, BiomedCLIP); ``token_dim`` channels, stride = patch size."""
        if getattr(self, "_feature_levels", None) is None:
            if self.is_timm:
                names = [f"trunk.blocks.{i}" for i in range(len(self.visual.trunk.blocks))]
            else:
                names = [f"transformer.resblocks.{i}" for i in range(len(self.visual.transformer.resblocks))]
            self._feature_levels = [FeatureLevel(i, name, int(self.info.token_dim), int(self.info.patch_size))
                                    for i, name in enumerate(names)]
        return list(self._feature_levels)

    def forward_intermediates(self, x: torch.Tensor, levels: Sequence[int] | int | None = None, *,
                              norm: bool = False) -> list[torch.Tensor]:
        """``visual.forward_intermediates(indices, normalize_intermediates=norm, intermediates_only=True,
        output_fmt='NCHW')``: block outputs without the class token, on the patch grid; ``norm``
        applies the tower's final LayerNorm (``ln_post``; timm trunk: ``norm``)."""
        chosen = self.resolve_levels(levels)
        return ordered_levels(chosen, lambda unique: list(self.visual.forward_intermediates(
            x, indices=unique, stop_early=True, normalize_intermediates=norm, intermediates_only=True,
            output_fmt="NCHW")["image_intermediates"]))


def _hub_spec(key: str, arch: str | None, tag: str) -> dict[str, Any]:
    """open_clip's pretrained cfg for ``arch``/``tag`` (quick_gelu, mean/std, hub file)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) if arch else {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch) if arch else []
        raise ValueError(f"{key}: unknown open_clip weights tag {tag!r}; known tags for {arch}: {tags}")
    return cfg


def _hub_files(cfg: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(repo, candidate file names) of a pretrained cfg's ``hf_hub`` (``repo/`` or ``repo/file``)."""
    hub = cfg.get("hf_hub", "")
    repo, filename = hub.rstrip("/"), ""
    if not hub.endswith("/"):
        repo, filename = hub.rsplit("/", 1)
    names = (filename[:-4] + ".safetensors", filename) if filename.endswith((".bin", ".pth")) else (
        (filename,) if filename else HF_FILES)
    return repo, names


def pretrained_spec(key: str, cfg: dict[str, Any], arch: str | None, tag: str) -> PretrainedSpec:
    """Where ``openclip/<arch>:<tag>``'s weights may already be: ``$SLICE2VOL_WEIGHTS/<arch>-<tag>.<ext>``
    or the repo's name there, and the Hugging Face cache of the tag's repo."""
    if not cfg.get("hf_hub"):
        raise WeightsUnavailable(f"{key}: no published weights for tag {tag!r}; pass a local checkpoint")
    repo, names = _hub_files(cfg)
    stems = [f"{arch}-{tag}"] if arch else []
    stems.append(repo.rsplit("/", 1)[-1])
    files = tuple(f"{stem}.{ext}" for stem in stems for ext in ("safetensors", "bin"))
    return PretrainedSpec(key=key, description=f"open_clip {arch or repo}:{tag or 'hub'}", files=files,
                          dataset=tag or repo, hf_repo=repo, hf_files=names, url=f"https://huggingface.co/{repo}")


def _download(key: str, cfg: dict[str, Any], local_hint: str) -> str:
    """The weights file of a pretrained cfg: HF cache, else HF download, else the cfg's URL."""
    if cfg.get("hf_hub", ""):
        repo, names = _hub_files(cfg)
        return hf_download(key, repo, names, local_hint)
    url = cfg.get("url", "")
    if not url:
        raise WeightsUnavailable(f"{key}: no download location for these weights. "
                                 f"Pass a local checkpoint instead: {local_hint}")
    from open_clip.pretrained import download_pretrained_from_url

    require_hub(key, url, local_hint, host=url)
    return download_pretrained_from_url(url)


def _read_checkpoint(key: str, path: str, repo_hint: str) -> dict[str, torch.Tensor]:
    """Vision-tower tensors of an open_clip checkpoint (full CLIP ``visual.*`` or tower alone)."""
    try:
        state = load_state_dict(path)
    except ValueError as err:
        raise ValueError(f"{err}. OpenAI's original TorchScript .pt files cannot be read safely; use the "
                         f"open_clip state dict from https://huggingface.co/{repo_hint} instead") from None
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def _resize_pos_embed(state: dict[str, torch.Tensor], visual: nn.Module) -> None:
    """open_clip's own bicubic pos-embed resampling, applied to a tower-only state dict in place."""
    from open_clip.model import resize_pos_embed

    if "positional_embedding" not in state:
        return
    wrapped = {"visual.positional_embedding": state["positional_embedding"]}
    resize_pos_embed(wrapped, SimpleNamespace(visual=visual))
    state["positional_embedding"] = wrapped["visual.positional_embedding"]


def build_openclip(name: str, weights: str | Path | None = "random", *, img_size: int | None = None,
                   pooling: str = "proj", resize: str = "shorter", quick_gelu: bool | None = None,
                   vision_cfg: dict[str, Any] | None = None, embed_dim: int | None = None,
                   **overrides: Any) -> OpenCLIPEncoder:
    """Builds ``openclip/<name>``.

    Args:
        name: ``<arch>:<tag>`` (built-in open_clip architecture and its default weights tag) or
            ``hf-hub:<repo>`` (BiomedCLIP).
        weights: ``random``, ``hub[:tag]`` or a local open_clip checkpoint.
        img_size: input side (multiple of the patch size); default 224.
        pooling: ``proj`` or ``mean`` (see module docstring).
        resize: ``shorter`` (open_clip's resize + centre crop) or ``squash``.
        quick_gelu: force the activation; default from the weights tag.
        vision_cfg: overrides of the architecture's ``vision_cfg`` (tests build 2-layer towers).
        embed_dim: override of the projection width.
        **overrides: ``mean``, ``std``, ``interpolation``, ``channel_mode``.
    """
    import open_clip
    from open_clip.model import _build_vision_tower

    key = f"openclip/{name}"
    if pooling not in POOLINGS:
        raise ValueError(f"{key}: pooling must be one of {POOLINGS}, got {pooling!r}")
    if resize not in ("shorter", "squash"):
        raise ValueError(f"{key}: resize must be 'shorter' or 'squash', got {resize!r}")
    kind, ref = parse_weights(weights, pretrained=True)
    word = ref if kind == "pretrained" else ""
    if name.startswith("hf-hub:"):
        arch, key_tag, tag = None, "", ""
        model_cfg = copy.deepcopy(BIOMEDCLIP_CFG)
        repo_hint = name[len("hf-hub:"):]
        if kind == "hub" and ref:
            raise ValueError(f"{key}: the hub weights have no tags; use weights='hub'")
        spec: dict[str, Any] = dict(BIOMEDCLIP_PREPROCESS, hf_hub=repo_hint + "/")
    else:
        arch, _, key_tag = name.partition(":")
        model_cfg = copy.deepcopy(open_clip.get_model_config(arch))
        tag = ref if kind == "hub" and ref else key_tag
        spec = _hub_spec(key, arch, tag) if tag else {}
        repo_hint = (spec.get("hf_hub") or "timm").rstrip("/")
    if vision_cfg:
        model_cfg["vision_cfg"].update(vision_cfg)
    if embed_dim is not None:
        model_cfg["embed_dim"] = embed_dim
    is_timm = "timm_model_name" in model_cfg["vision_cfg"]
    patch_cfg = 16 if is_timm else model_cfg["vision_cfg"]["patch_size"]
    if img_size is not None:
        img_size = square_size(key, img_size)  # a whole number 1-MAX_SIZE (a string or 1e5 crashed below)
    if img_size is not None and (img_size % patch_cfg or img_size < patch_cfg):
        raise ValueError(f"{key}: img_size must be a positive multiple of the patch size {patch_cfg}, got {img_size}")
    if img_size is not None and not is_timm:
        model_cfg["vision_cfg"]["image_size"] = img_size
    quick = bool(spec.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    local_hint = (f"weights='/path/to/open_clip_pytorch_model.bin' (CLI: --weights PATH), e.g. downloaded "
                  f"from https://huggingface.co/{repo_hint}")
    # weights first: an unavailable download fails before the (seconds-long) tower initialisation
    origin: dict[str, str] = {}
    if kind == "pretrained":  # $SLICE2VOL_WEIGHTS or the HF cache, never a download
        resolved = resolve_pretrained(pretrained_spec(key, spec, arch, tag), word)
        kind, ref, origin = "file", str(resolved.path), resolved.provenance()
    path = _download(key, spec, local_hint) if kind == "hub" else ref
    visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=quick)

    sha, used = "", "random"
    if kind in ("hub", "file"):
        state = _read_checkpoint(key, path, repo_hint)
        if not is_timm:
            _resize_pos_embed(state, visual)
        assign_state_dict(visual, state, key, source=str(path), optional_prefixes=())
        sha = origin.get("sha256") or sha256_file(path)
        used = ("pretrained" if origin else ref) if kind == "file" else f"hub:{repo_hint}"
    if is_timm:
        if img_size is not None and img_size != model_cfg["vision_cfg"]["image_size"]:
            visual.trunk.set_input_size(img_size=(img_size, img_size))  # resamples pos_embed (bicubic)
        grid = tuple(visual.trunk.patch_embed.grid_size)
        patch = int(visual.trunk.patch_embed.patch_size[0])
        width = int(visual.trunk.num_features)
    else:
        grid = tuple(visual.grid_size)
        patch = int(visual.patch_size[0])
        width = int(visual.conv1.out_channels)
    input_size = (grid[0] * patch, grid[1] * patch)
    info = EncoderInfo(
        key=key, embed_dim=model_cfg["embed_dim"] if pooling == "proj" else width, input_size=input_size,
        mean=tuple(spec.get("mean", CLIP_MEAN)), std=tuple(spec.get("std", CLIP_STD)), patch_size=patch,
        token_dim=width, source="open_clip", weights=used, weights_sha256=sha, pooling=pooling,
        resize="shorter" if resize == "shorter" and spec.get("resize_mode", "shortest") == "shortest" else "squash",
        resize_size=min(input_size), interpolation=spec.get("interpolation", "bicubic"),
        extra={"arch": arch or name, "tag": tag, "quick_gelu": quick, "tower": "timm" if is_timm else "open_clip"},
        weights_origin=origin,
    )
    apply_preprocess_overrides(info, **overrides)
    return OpenCLIPEncoder(visual, info, pooling=pooling).eval()


def open_builder(key: str):
    """Builder for ``openclip/<arch>:<tag>`` (or ``openclip/<arch>``, random weights only) outside the
    presets, from open_clip's own lists (``list_models``, ``list_pretrained_tags_by_model``); ``None``
    for other keys."""
    if not key.startswith("openclip/") or key.startswith("openclip/hf-hub:"):
        return None
    import open_clip

    name = key[len("openclip/"):]
    arch, _, tag = name.partition(":")
    if arch not in open_clip.list_models():
        return None
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)) or not str(vision.get("timm_model_name", "vit")).startswith(
            ("vit", "eva")):
        raise ValueError(f"{key}: only ViT image towers are supported (this one is "
                         f"{vision.get('timm_model_name') or 'a ModifiedResNet'})")
    if tag and tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise KeyError(f"{key}: open_clip has no tag {tag!r} for {arch}; known: "
                       f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
    return lambda weights="random", **kwargs: build_openclip(name, weights, **kwargs)


# -- registry ----------------------------------------------------------------------------------
_META = dict(family="openclip", input_size=224, img_size="multiple of the patch (pos-embed interpolated)")


@ENCODERS.register("openclip/ViT-B-16:openai", embed_dim=512, params_m=86.19, **_META)
def openclip_vit_b_16_openai(weights: str | Path | None = "random", **kwargs: Any) -> OpenCLIPEncoder:
    """OpenAI CLIP ViT-B/16 image tower (QuickGELU), 512-d projected embedding, 14 x 14 tokens."""
    return build_openclip("ViT-B-16:openai", weights, **kwargs)


@ENCODERS.register("openclip/ViT-B-32:openai", embed_dim=512, params_m=87.85, **_META)
def openclip_vit_b_32_openai(weights: str | Path | None = "random", **kwargs: Any) -> OpenCLIPEncoder:
    """OpenAI CLIP ViT-B/32 image tower (QuickGELU), 512-d projected embedding, 7 x 7 tokens."""
    return build_openclip("ViT-B-32:openai", weights, **kwargs)


@ENCODERS.register("openclip/ViT-L-14:openai", embed_dim=768, params_m=303.97, **_META)
def openclip_vit_l_14_openai(weights: str | Path | None = "random", **kwargs: Any) -> OpenCLIPEncoder:
    """OpenAI CLIP ViT-L/14 image tower (QuickGELU), 768-d projected embedding, 16 x 16 tokens."""
    return build_openclip("ViT-L-14:openai", weights, **kwargs)


@ENCODERS.register(f"openclip/hf-hub:{BIOMEDCLIP_REPO}", embed_dim=512, params_m=86.19, **_META)
def openclip_biomedclip(weights: str | Path | None = "random", **kwargs: Any) -> OpenCLIPEncoder:
    """BiomedCLIP image tower (timm ViT-B/16, CLS token, linear projection to 512), PMC-15M weights."""
    return build_openclip(f"hf-hub:{BIOMEDCLIP_REPO}", weights, **kwargs)
