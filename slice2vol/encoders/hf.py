"""Hugging Face transformers vision models (``hf/<repo id>``): DINOv2, CLIP vision tower, ViT-MAE.

Random weights never touch the network: configs and image processors are constructed in code with
each repo's real hyperparameters (``Dinov2Config``, ``CLIPVisionConfig``, ``ViTMAEConfig``;
``BitImageProcessor``, ``CLIPImageProcessor``, ``ViTImageProcessor``). Weights from a local
directory load with ``from_pretrained(DIR)`` (its own ``preprocessor_config.json``, when present,
replaces the built-in preprocessing); a single state-dict file loads into the in-code config; ``hub``
uses ``from_pretrained(repo)`` from the HF cache, or downloads after a fast reachability check.

Preprocessing mirrors each repo's published ``preprocessor_config.json``: DINOv2 shorter side 256
(bicubic) + centre crop 224; CLIP shorter side 224 (bicubic) + centre crop 224, CLIP mean/std; MAE
squash to 224 x 224, bilinear (resample 2). Repos outside the presets use their own file through
``AutoImageProcessor``.

Input size (``img_size=``): any multiple of the patch size; position embeddings are interpolated at
run time (DINOv2 always does; CLIP and MAE via ``interpolate_pos_encoding=True``).

Pooling: DINOv2 ``cls`` (pooler output) | ``mean`` | ``cls_mean``; CLIP ``proj`` (image embedding in
CLIP's joint space, 512) | ``cls`` (post-layernorm CLS, 768) | ``mean``; MAE ``mean`` (of patch
tokens) | ``cls``. ``tokens`` are the final-norm patch tokens (CLIP: ``post_layernorm`` applied).
MAE runs with ``mask_ratio = 0`` and an identity patch order, so every patch is kept in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slice2vol.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderInfo,
    FeatureLevel,
    WeightsUnavailable,
    apply_preprocess_overrides,
    assign_state_dict,
    hf_cached_file,
    load_state_dict,
    ordered_levels,
    parse_weights,
    require_hub,
    sha256_file,
    to_2tuple,
)
from slice2vol.encoders.weights import PretrainedSpec, resolve_pretrained

_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class _Spec:
    """One HF repo: how to build its model, config and image processor offline."""

    kind: str  # dinov2 | clip | mae
    model_class: str
    config: Callable[..., Any]  # keyword changes -> config with the repo's real hyperparameters
    processor: Callable[[], Any]
    poolings: tuple[str, ...]


def _dinov2_config(hidden: int, heads: int, **changes: Any):
    from transformers import Dinov2Config

    params = dict(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=heads, mlp_ratio=4,
                  hidden_act="gelu", layer_norm_eps=1e-6, image_size=518, patch_size=14,
                  qkv_bias=True, layerscale_value=1.0, drop_path_rate=0.0, use_swiglu_ffn=False)
    return Dinov2Config(**{**params, **changes})


def _dinov2_processor():
    from transformers import BitImageProcessor

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                             crop_size={"height": 224, "width": 224}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD), do_convert_rgb=True)


def _clip_config(**changes: Any):
    from transformers import CLIPVisionConfig

    params = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
    return CLIPVisionConfig(**{**params, **changes})


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                              crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                              do_convert_rgb=True)


def _mae_config(**changes: Any):
    from transformers import ViTMAEConfig

    params = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True,
                  mask_ratio=0.75, norm_pix_loss=False)
    return ViTMAEConfig(**{**params, **changes})


def _mae_processor():
    from transformers import ViTImageProcessor

    # the published facebook/vit-mae-base preprocessor_config.json resamples bilinearly (resample 2), unlike
    # DINOv2/CLIP; tests/encoders/test_preprocessing.py compares with that file's values
    return ViTImageProcessor(do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD))


SPECS: dict[str, _Spec] = {
    "facebook/dinov2-small": _Spec("dinov2", "Dinov2Model", lambda **kw: _dinov2_config(384, 6, **kw), _dinov2_processor,
                                   ("cls", "mean", "cls_mean")),
    "facebook/dinov2-base": _Spec("dinov2", "Dinov2Model", lambda **kw: _dinov2_config(768, 12, **kw), _dinov2_processor,
                                  ("cls", "mean", "cls_mean")),
    "openai/clip-vit-base-patch16": _Spec("clip", "CLIPVisionModelWithProjection", _clip_config, _clip_processor,
                                          ("proj", "cls", "mean")),
    "facebook/vit-mae-base": _Spec("mae", "ViTMAEModel", _mae_config, _mae_processor, ("mean", "cls")),
}


def pretrained_spec(repo: str) -> PretrainedSpec:
    """``hf/<repo>``'s published weights as a ``save_pretrained``/snapshot directory: ``$SLICE2VOL_WEIGHTS``
    holding ``<org>--<name>`` or ``<name>``, or the repo's Hugging Face cache snapshot."""
    dataset = {"dinov2": "LVD-142M (DINOv2)", "clip": "WIT-400M (OpenAI CLIP)", "mae": "ImageNet-1k (MAE)"}
    kind = SPECS[repo].kind if repo in SPECS else ""
    return PretrainedSpec(key=f"hf/{repo}", description=f"{repo} from the Hugging Face hub", hf_repo=repo,
                          hf_dir=True, dataset=dataset.get(kind, repo), url=f"https://huggingface.co/{repo}")


def preprocess_from_processor(processor: Any) -> dict[str, Any]:
    """An HF image processor's eval pipeline as :class:`EncoderInfo` fields.

    Returns:
        dict with input_size, resize, resize_size, interpolation, mean, std.
    """
    size = dict(processor.size)
    resample = int(getattr(processor, "resample", 3))
    out: dict[str, Any] = dict(mean=tuple(processor.image_mean), std=tuple(processor.image_std),
                               interpolation=_PIL_RESAMPLE.get(resample, "bicubic"))
    if "shortest_edge" in size:
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        shortest = int(size["shortest_edge"])
        out.update(resize="shorter", resize_size=shortest,
                   input_size=(int(crop["height"]), int(crop["width"])) if crop else (shortest, shortest))
    else:
        out.update(resize="squash", resize_size=None, input_size=(int(size["height"]), int(size["width"])))
    return out


class HFEncoder(Encoder):
    """A transformers vision model; ``self.model`` is the full HF module.

    Args:
        model: ``Dinov2Model``, ``CLIPVisionModelWithProjection`` or ``ViTMAEModel``.
        info: resolved encoder facts.
        kind: ``dinov2``, ``clip`` or ``mae``.
        pooling: see the module docstring.
    """

    def __init__(self, model: nn.Module, info: EncoderInfo, kind: str, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.kind = kind
        self.pooling = pooling
        self.native_size = to_2tuple(model.config.image_size)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final-norm hidden states (B, 1 + T, width), patch order kept."""
        if self.kind == "dinov2":
            return self.model(pixel_values=x).last_hidden_state
        interpolate = tuple(x.shape[-2:]) != self.native_size
        if self.kind == "mae":
            # identity noise -> no shuffling; mask_ratio 0 -> no patch dropped
            tokens = (x.shape[-2] // self.info.patch_size) * (x.shape[-1] // self.info.patch_size)
            noise = torch.arange(tokens, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
            return self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=interpolate).last_hidden_state
        if self.kind == "vit":  # ViTModel ends with its final layernorm
            return self.model(pixel_values=x, interpolate_pos_encoding=interpolate).last_hidden_state
        vision = self.model.vision_model
        hidden = vision(pixel_values=x, interpolate_pos_encoding=interpolate).last_hidden_state
        return vision.post_layernorm(hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(x)
        patches = hidden[:, self._prefix_tokens():]
        if self.pooling == "proj":
            return self.model.visual_projection(hidden[:, 0])
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            return patches.mean(1)
        return torch.cat([hidden[:, 0], patches.mean(1)], dim=1)  # cls_mean

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patch = self.info.patch_size
        return self._hidden(x)[:, self._prefix_tokens():], (x.shape[-2] // patch, x.shape[-1] // patch)

    # -- dense features: output_hidden_states ---------------------------------------------------
    def _layer_prefix(self) -> str:
        """Module path of the transformer layers (it moved between transformers versions: MAE's
        ``encoder.layer`` became ``layers`` in 5.x)."""
        modules = dict(self.model.named_modules())
        for prefix in ("vision_model.encoder.layers", "encoder.layer", "encoder.layers", "layers"):
            if isinstance(modules.get(prefix), nn.ModuleList):
                return prefix
        raise RuntimeError(f"{self.info.key}: cannot find the transformer layers of {type(self.model).__name__}")

    def _final_norm(self) -> nn.Module:
        return self.model.vision_model.post_layernorm if self.kind == "clip" else self.model.layernorm

    def _prefix_tokens(self) -> int:
        """CLS plus DINOv2's register tokens (``num_register_tokens``, 0 for the plain models)."""
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def feature_info(self) -> list[FeatureLevel]:
        """Every transformer layer (``encoder.layer.<i>``; CLIP ``vision_model.encoder.layers.<i>``),
        ``hidden_size`` channels, stride = patch size."""
        if getattr(self, "_feature_levels", None) is None:
            config = self.model.config
            self._feature_levels = [FeatureLevel(i, f"{self._layer_prefix()}.{i}", int(config.hidden_size),
                                                 int(self.info.patch_size))
                                    for i in range(int(config.num_hidden_layers))]
        return list(self._feature_levels)

    def forward_intermediates(self, x: torch.Tensor, levels: Sequence[int] | int | None = None, *,
                              norm: bool = False) -> list[torch.Tensor]:
        """``hidden_states`` of the model called with ``output_hidden_states=True`` (entry ``i + 1``
        is layer ``i``'s output), prefix tokens dropped, reshaped to (B, hidden, H / p, W / p);
        ``norm=True`` applies the model's final LayerNorm (``layernorm``; CLIP ``post_layernorm``),
        as ``Dinov2Backbone`` does with ``apply_layernorm``."""
        chosen = self.resolve_levels(levels)
        patch = self.info.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        prefix = self._prefix_tokens()

        def compute(unique: list[int]) -> list[torch.Tensor]:
            hidden = self._hidden_states(x)
            maps = []
            for i in unique:
                tokens = hidden[i + 1]
                if norm:
                    tokens = self._final_norm()(tokens)
                tokens = tokens[:, prefix:]
                maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid))
            return maps

        return ordered_levels(chosen, compute)

    def _hidden_states(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(embeddings, layer 0, ..., layer N-1) outputs, patch order kept (MAE: no masking, no shuffle)."""
        if self.kind == "dinov2":
            return self.model(pixel_values=x, output_hidden_states=True).hidden_states
        interpolate = tuple(x.shape[-2:]) != self.native_size
        if self.kind == "mae":
            tokens = (x.shape[-2] // self.info.patch_size) * (x.shape[-1] // self.info.patch_size)
            noise = torch.arange(tokens, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
            return self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=interpolate,
                              output_hidden_states=True).hidden_states
        if self.kind == "vit":
            return self.model(pixel_values=x, interpolate_pos_encoding=interpolate,
                              output_hidden_states=True).hidden_states
        return self.model.vision_model(pixel_values=x, interpolate_pos_encoding=interpolate,
                                       output_hidden_states=True).hidden_states


def build_hf(repo: str, weights: str | Path | None = "random", *, img_size: int | tuple[int, int] | None = None,
             pooling: str | None = None, config_overrides: dict[str, Any] | None = None,
             **overrides: Any) -> HFEncoder:
    """Builds ``hf/<repo>``.

    Args:
        repo: Hugging Face repo id with a spec in :data:`SPECS`.
        weights: ``random``, ``hub`` (``hub:<revision>`` for a revision), a ``save_pretrained``
            directory or a state-dict file.
        img_size: input side (or (H, W)), a multiple of the patch size; default the processor's crop.
        pooling: see the module docstring; default the first listed per kind.
        config_overrides: changes to the in-code config for random weights (e.g.
            ``num_hidden_layers=2`` in tests).
        **overrides: ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``channel_mode``.
    """
    key = f"hf/{repo}"
    spec = SPECS[repo]
    kind_w, ref = parse_weights(weights, pretrained=True)
    origin: dict[str, str] = {}
    if kind_w == "pretrained":  # a snapshot directory in $SLICE2VOL_WEIGHTS or the HF cache, never a download
        resolved = resolve_pretrained(pretrained_spec(repo), ref)  # before the (slow) model-class import
        kind_w, ref, origin = "file", str(resolved.path), resolved.provenance()
    import transformers

    model_class = getattr(transformers, spec.model_class)
    processor = spec.processor()
    sha, used = "", "random"
    hint = f"--weights /path/to/dir (a save_pretrained/snapshot directory of {repo})"
    if kind_w == "random" or (kind_w == "file" and not Path(ref).is_dir()):
        model = model_class(spec.config(**(config_overrides or {})))
        if kind_w == "file":
            assign_state_dict(model, load_state_dict(ref), key, ref, optional_prefixes=())
            sha, used = sha256_file(ref), ref
    else:
        if kind_w == "hub":
            revision = ref or None
            config_path = hf_cached_file(repo, ("config.json",), revision=revision)
            if config_path is None:
                require_hub(key, f"hf-hub:{repo}", hint)
            source, used = repo, f"hub:{repo}" + (f"@{revision}" if revision else "")
            kwargs = {"revision": revision} if revision else {}
            if config_path is not None:  # cached: no network at all (no commit-hash lookup either)
                kwargs["local_files_only"] = True
        else:
            source, used, kwargs = ref, "pretrained" if origin else ref, {"local_files_only": True}
        model = model_class.from_pretrained(source, **kwargs)
        local_dir = Path(ref) if kind_w == "file" else Path(
            hf_cached_file(repo, ("config.json",), revision=ref or None) or model.name_or_path).parent
        if (local_dir / "preprocessor_config.json").exists():
            processor = transformers.AutoImageProcessor.from_pretrained(str(local_dir), backend="pil")
        if local_dir.is_dir():
            sha = sha256_file(local_dir)
    return _finish(key, model, processor, spec.kind, spec.model_class, spec.poolings, pooling=pooling,
                   img_size=img_size, used=used, sha=sha, origin=origin, overrides=overrides)


def _finish(key: str, model: nn.Module, processor: Any, kind: str, model_class: str, poolings: tuple[str, ...], *,
            pooling: str | None, img_size: int | tuple[int, int] | None, used: str, sha: str,
            origin: dict[str, str], overrides: dict[str, Any]) -> HFEncoder:
    """The encoder around a built model: pooling checked, preprocessing from the image processor."""
    if kind == "mae":  # every patch kept
        model.config.mask_ratio = 0.0
        model.embeddings.config.mask_ratio = 0.0
    pooling = pooling or poolings[0]
    if pooling not in poolings:
        raise ValueError(f"{key}: pooling must be one of {poolings}, got {pooling!r}")
    pre = preprocess_from_processor(processor)
    config = model.config
    width = int(config.hidden_size)
    patch = int(to_2tuple(config.patch_size)[0])
    input_size = pre.pop("input_size")
    if img_size is not None:
        new = to_2tuple(img_size)
        if pre["resize_size"] is not None:
            pre["resize_size"] = int(round(max(new) * pre["resize_size"] / max(input_size)))
        input_size = new
    if input_size[0] % patch or input_size[1] % patch:
        raise ValueError(f"{key}: img_size {input_size} must be a multiple of the patch size {patch}")
    embed = {"proj": int(getattr(config, "projection_dim", width)), "cls_mean": 2 * width}.get(pooling, width)
    info = EncoderInfo(key=key, embed_dim=embed, input_size=input_size, patch_size=patch, token_dim=width,
                       source="transformers", weights=used, weights_sha256=sha, pooling=pooling,
                       extra={"model_class": model_class, "kind": kind}, weights_origin=origin, **pre)
    apply_preprocess_overrides(info, **overrides)
    return HFEncoder(model, info, kind=kind, pooling=pooling)


# -- open registry: any hf/<repo_id> of a supported model type ------------------------------------
#: transformers ``model_type`` -> (our kind, model class, poolings)
MODEL_TYPES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dinov2": ("dinov2", "Dinov2Model", ("cls", "mean", "cls_mean")),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel", ("cls", "mean", "cls_mean")),
    "clip": ("clip", "CLIPVisionModelWithProjection", ("proj", "cls", "mean")),
    "clip_vision_model": ("clip", "CLIPVisionModelWithProjection", ("proj", "cls", "mean")),
    "vit_mae": ("mae", "ViTMAEModel", ("mean", "cls")),
    "vit": ("vit", "ViTModel", ("cls", "mean", "cls_mean")),
}


def _repo_dir(key: str, repo: str, kind_w: str, ref: str) -> Path:
    """The local directory holding ``repo``'s config (and weights unless random)."""
    if kind_w == "file":
        if not Path(ref).is_dir():
            raise ValueError(f"{key}: not a preset, so weights must be a save_pretrained/snapshot directory "
                             f"(config.json + weights), got the file {ref}")
        return Path(ref)
    revision = (ref or None) if kind_w == "hub" else None
    cached = hf_cached_file(repo, ("config.json",), revision=revision)
    if cached:
        return Path(cached).parent
    if kind_w == "hub":
        require_hub(key, f"hf-hub:{repo}", f"--weights /path/to/dir (a save_pretrained/snapshot directory of {repo})")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision))
    raise WeightsUnavailable(
        f"{key}: not one of the presets ({', '.join(sorted(SPECS))}), so its architecture comes from its "
        f"config.json, which is not on this machine (Hugging Face cache). Pass a save_pretrained/snapshot "
        f"directory: weights='/path/to/{repo.rsplit('/', 1)[-1]}', or weights='hub' to download it once")


def build_hf_repo(repo: str, weights: str | Path | None = "random", *, img_size: int | tuple[int, int] | None = None,
                  pooling: str | None = None, **overrides: Any) -> HFEncoder:
    """Builds ``hf/<repo>`` for a repo outside the presets, from its own ``config.json`` and
    ``preprocessor_config.json`` (``AutoConfig`` / ``AutoImageProcessor``), for the model types of
    :data:`MODEL_TYPES`.

    Args:
        repo: Hugging Face repo id.
        weights: ``random`` (architecture from the cached config), ``pretrained`` (the cached
            snapshot or ``$SLICE2VOL_WEIGHTS/<org>--<name>``), ``hub[:revision]``, or a directory.
        img_size, pooling, **overrides: as :func:`build_hf`.
    """
    import transformers

    key = f"hf/{repo}"
    kind_w, ref = parse_weights(weights, pretrained=True)
    origin: dict[str, str] = {}
    if kind_w == "pretrained":
        resolved = resolve_pretrained(pretrained_spec(repo), ref)
        kind_w, ref, origin = "file", str(resolved.path), resolved.provenance()
    folder = _repo_dir(key, repo, kind_w, ref)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"{key}: model type {config.model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(MODEL_TYPES))}")
    kind, class_name, poolings = MODEL_TYPES[config.model_type]
    model_class = getattr(transformers, class_name)
    if not (folder / "preprocessor_config.json").exists():
        raise ValueError(f"{folder}: no preprocessor_config.json, so the preprocessing of {key} is unknown")
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil", local_files_only=True)
    if kind_w == "random":
        if config.model_type == "clip":  # the vision half, with the joint-space projection width
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        model = model_class(config)
        sha, used = "", "random"
    else:
        model = model_class.from_pretrained(str(folder), local_files_only=True)
        sha = origin.get("sha256") or sha256_file(folder)
        used = "pretrained" if origin else (f"hub:{repo}" if kind_w == "hub" else str(folder))
    return _finish(key, model.eval(), processor, kind, class_name, poolings, pooling=pooling, img_size=img_size,
                   used=used, sha=sha, origin=origin, overrides=overrides)


def open_builder(key: str):
    """Builder for an ``hf/<repo>`` key outside the presets (``None`` for other keys)."""
    if not key.startswith("hf/") or key.count("/") < 2:
        return None
    repo = key[len("hf/"):]
    return lambda weights="random", **kwargs: build_hf_repo(repo, weights, **kwargs)


_VIT = dict(family="hf", input_size=224, img_size="multiple of the patch (pos-embed interpolated)")


@ENCODERS.register("hf/facebook/dinov2-small", embed_dim=384, params_m=22.06, **_VIT)
def hf_dinov2_small(weights: str | Path | None = "random", **kwargs: Any) -> HFEncoder:
    """DINOv2 ViT-S/14 (transformers), CLS pooling, BitImageProcessor preprocessing."""
    return build_hf("facebook/dinov2-small", weights, **kwargs)


@ENCODERS.register("hf/facebook/dinov2-base", embed_dim=768, params_m=86.58, **_VIT)
def hf_dinov2_base(weights: str | Path | None = "random", **kwargs: Any) -> HFEncoder:
    """DINOv2 ViT-B/14 (transformers), CLS pooling."""
    return build_hf("facebook/dinov2-base", weights, **kwargs)


@ENCODERS.register("hf/openai/clip-vit-base-patch16", embed_dim=512, params_m=86.19, **_VIT)
def hf_clip_vit_base_patch16(weights: str | Path | None = "random", **kwargs: Any) -> HFEncoder:
    """CLIP ViT-B/16 vision tower with its projection (512-d joint space); ``pooling='cls'`` for 768-d."""
    return build_hf("openai/clip-vit-base-patch16", weights, **kwargs)


@ENCODERS.register("hf/facebook/vit-mae-base", embed_dim=768, params_m=85.80, **_VIT)
def hf_vit_mae_base(weights: str | Path | None = "random", **kwargs: Any) -> HFEncoder:
    """MAE ViT-B/16 encoder (transformers), mean of patch tokens, no masking."""
    return build_hf("facebook/vit-mae-base", weights, **kwargs)
