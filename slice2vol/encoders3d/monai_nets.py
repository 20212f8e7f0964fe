"""MONAI 3D networks at random initialisation (``3d/monai_<arch>``): the untrained-architecture control.

A random-init network tells how much of a pretrained encoder's score comes from the architecture and
the pooling alone (the 3D counterpart of random-init 2D rows). Weights are seeded (``seed``), so the
same key and seed give the same features everywhere. A local file in MONAI's own state-dict layout
(``model.state_dict()`` names, e.g. after training the network elsewhere) loads strictly.

Networks: ``monai.networks.nets.ResNetFeatures`` (ResNet-10/18/34/50: stem conv 7^3 stride 2, then
``layer1``-``layer4``; 5 stages) and ``DenseNet121`` (stem, the four dense blocks + transitions; 5
stages). Preprocessing is ours (there are no authors' weights): head cropped to its bounding box (+4
voxels), resampled to ``spacing`` (default 2 mm), padded to a multiple of 32, z-scored inside the head
mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slice2vol.encoders3d.base import (
    ENCODERS3D,
    Encoder3DInfo,
    FeatureLevel3D,
    RecipeEncoder,
    UnknownOptions,
    file_weights,
    load_strict,
    parse_weights3d,
    read_checkpoint,
    resolve_levels,
    seeded,
    strip_prefix,
    unwrap,
)
from slice2vol.encoders3d.preprocess import Recipe


# -- networks ---------------------------------------------------------------------------------------
RESNETS = {"resnet10": (64, 64, 128, 256, 512), "resnet18": (64, 64, 128, 256, 512),
           "resnet34": (64, 64, 128, 256, 512), "resnet50": (64, 256, 512, 1024, 2048)}
DENSENET121 = (64, 128, 256, 512, 1024)


def monai_resnet(arch: str, in_chans: int = 1) -> nn.Module:
    """MONAI ``ResNetFeatures`` (MedicalNet's shortcut/bias settings per depth), untrained."""
    from monai.networks.nets.resnet import ResNetFeatures

    return ResNetFeatures(arch, pretrained=False, spatial_dims=3, in_channels=in_chans)


def resnet_levels(arch: str) -> list[FeatureLevel3D]:
    names = ("conv1", "layer1", "layer2", "layer3", "layer4")
    strides = (2, 4, 8, 16, 32)
    return [FeatureLevel3D(i, n, c, s) for i, (n, c, s) in enumerate(zip(names, RESNETS[arch], strides))]


def densenet_stages(model: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Stage maps of MONAI ``DenseNet121``: after the stem (relu0), transitions 1-3 and the final norm."""
    taps = {"relu0", "transition1", "transition2", "transition3", "norm5"}

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, module in model.features.named_children():
            x = module(x)
            if name in taps:
                out.append(torch.relu(x) if name == "norm5" else x)
        return out

    return run


def _recipe(spacing: Sequence[float] | float | None, input_size: Sequence[int] | None, intensity: str,
            margin: int, divisor: int = 32) -> Recipe:
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    return Recipe(spacing=None if spacing is None else tuple(float(s) for s in spacing), crop="foreground",
                  margin=margin, resize="pad_crop" if input_size else "none",
                  size=None if input_size is None else tuple(int(s) for s in input_size),
                  divisor=divisor, intensity=intensity)  # type: ignore[arg-type]


#: the options every MONAI builder takes (popped one by one in :func:`_build`)
OPTIONS = ("channel", "input_size", "intensity", "levels", "margin", "pooling", "seed", "spacing")


def _build(key: str, arch: str, make: Callable[[], nn.Module], levels: list[FeatureLevel3D],
           stages: Callable[[nn.Module], Callable[[torch.Tensor], list[torch.Tensor]]], weights: Any,
           kw: dict[str, Any]) -> RecipeEncoder:
    seed = int(kw.pop("seed", 0))
    chosen = resolve_levels(kw.pop("levels", None), len(levels), key)
    pooling = kw.pop("pooling", "avg")
    recipe = _recipe(kw.pop("spacing", 2.0), kw.pop("input_size", None), kw.pop("intensity", "zscore_foreground"),
                     int(kw.pop("margin", 4)))
    channel = kw.pop("channel", None)
    if kw:
        raise UnknownOptions(f"{key}: unknown option(s) {sorted(kw)} (known: {', '.join(OPTIONS)})")
    kind, detail = parse_weights3d(weights)
    if kind in ("hub", "package"):
        raise ValueError(f"{key}: a MONAI network without published weights: use weights=random (seeded) or a "
                         f"local file in MONAI's state-dict layout (for pretrained ResNets see 3d/medicalnet_{arch})")
    network = seeded(seed, make)
    shown, digest = f"random:seed={seed}", ""
    if kind == "file":
        state = strip_prefix(unwrap(read_checkpoint(detail), ("state_dict", "model"), detail, key), "module.")
        load_strict(network, state, detail, key, "MONAI state_dict names")
        shown, digest = file_weights(detail)
    crop, intensity = recipe.describe()
    info = Encoder3DInfo(
        key=key, embed_dim=sum(levels[i].channels for i in chosen), source=f"MONAI {arch}",
        weights=shown, weights_sha256=digest, in_chans=1, spacing=recipe.spacing, input_size=recipe.size,
        size_divisor=32, axes="RAS", crop=crop, intensity=intensity, pooling=pooling, levels=chosen,
        checkpoint="MONAI state_dict (model.state_dict() names)",
        reference="untrained architecture control (MONAI)", extra={"arch": arch, "seed": seed})
    return RecipeEncoder(network, stages(network), levels, info, recipe, channel)


def _register_resnet(arch: str) -> None:
    key = f"3d/monai_{arch}"

    @ENCODERS3D.register(key, embed_dim=sum(RESNETS[arch]), source="MONAI", weights=("random", "file"))
    def build(weights: str | Path | None = "random", **kwargs: Any) -> RecipeEncoder:
        """MONAI ResNetFeatures at random init; options: ``levels``, ``pooling``, ``spacing``,
        ``input_size``, ``intensity``, ``margin``, ``channel``, ``seed``."""
        return _build(key, arch, lambda: monai_resnet(arch), resnet_levels(arch), lambda net: net, weights,
                      dict(kwargs))

    build.__name__ = f"build_monai_{arch}"


for _arch in RESNETS:
    _register_resnet(_arch)


@ENCODERS3D.register("3d/monai_densenet121", embed_dim=sum(DENSENET121), source="MONAI", weights=("random", "file"))
def build_monai_densenet121(weights: str | Path | None = "random", **kwargs: Any) -> RecipeEncoder:
    """MONAI DenseNet121 at random init (options as for ``3d/monai_resnet18``)."""
    from monai.networks.nets import DenseNet121

    names = ("relu0", "transition1", "transition2", "transition3", "norm5")
    levels = [FeatureLevel3D(i, f"features.{n}", c, s)
              for i, (n, c, s) in enumerate(zip(names, DENSENET121, (2, 8, 16, 32, 32)))]
    return _build("3d/monai_densenet121", "densenet121",
                  lambda: DenseNet121(spatial_dims=3, in_channels=1, out_channels=2), levels, densenet_stages,
                  weights, dict(kwargs))
