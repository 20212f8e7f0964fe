"""BrainIAC (``3d/brainiac``, Tak et al. 2024): a 3D ResNet-50 trained with SimCLR on ~32,000 brain MRIs.

Released by the AIM lab (Kann lab, Harvard; https://github.com/AIM-KannLab/BrainIAC, checkpoint
``BrainIAC.ckpt`` on the Dropbox linked from the README). The network is MONAI's ``resnet50`` with a
1-channel stride-2 7^3 stem and no classifier (``fc = Identity``), held as ``backbone``:
the Lightning checkpoint stores ``{"state_dict": {"backbone.conv1.weight", ...}, ...}``. Every ``backbone.``
tensor is loaded strictly; the SimCLR projection head (the other ``state_dict`` keys) is dropped, exactly as
the authors' ``load_brainiac`` filters on ``'backbone'``, and listed in ``info.extra["unused_keys"]``.

Preprocessing as the authors' inference dataset (``MedicalImageDatasetBalancedIntensity3D``): the whole
volume resized to 128^3 (MONAI ``Resized``, area interpolation) and min-max scaled to [0, 1]
(``ScaleIntensity``). The authors first N4-correct, rigidly register to a 1 mm atlas and skull-strip
(HD-BET) offline; slice2vol does none of that (bring such volumes for a faithful comparison) and crops
to the head box before the resize.

Features: ``conv1`` (64, stride 2), ``layer1`` (256, 4), ``layer2`` (512, 8), ``layer3`` (1024, 16),
``layer4`` (2048, 32), average-pooled; default the last = the authors' 2048-d feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.nn as nn

from slice2vol.encoders.base import sha256_file
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
    unwrap,
)
from slice2vol.encoders3d.preprocess import Recipe

LAYOUT = "Lightning checkpoint {'state_dict': {'backbone.conv1.weight', 'backbone.layer1.0.conv1.weight', ...}}"
WHERE = "Dropbox link in https://github.com/AIM-KannLab/BrainIAC README"
CHANNELS = (64, 256, 512, 1024, 2048)
STRIDES = (2, 4, 8, 16, 32)
NAMES = ("conv1", "layer1", "layer2", "layer3", "layer4")


def monai_resnet_stages(model: nn.Module):
    """Stage maps of a MONAI ``ResNet`` (stem after activation, then layer1-4), as ``ResNetFeatures`` does."""

    def run(x):
        x = model.act(model.bn1(model.conv1(x)))
        out = [x]
        if not model.no_max_pool:
            x = model.maxpool(x)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = layer(x)
            out.append(x)
        return out

    return run


def brainiac_resnet50() -> nn.Module:
    """MONAI resnet50 as BrainIAC builds it (1-channel stride-2 stem, shortcut B with bias, no fc)."""
    from monai.networks.nets.resnet import ResNet, ResNetBottleneck, get_inplanes

    return ResNet(ResNetBottleneck, [3, 4, 6, 3], get_inplanes(), spatial_dims=3, n_input_channels=1,
                  conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=True, feed_forward=False)


@ENCODERS3D.register("3d/brainiac", embed_dim=2048, source="BrainIAC (AIM-KannLab)", weights=("random", "file"))
def build_brainiac(weights: str | Path | None = "random", *, levels: Sequence[int] | int | str | None = -1,
                   pooling: str = "avg", input_size: Sequence[int] = (128, 128, 128), crop_head: bool = True,
                   margin: int = 0, seed: int = 0, channel: int | None = None) -> RecipeEncoder:
    """BrainIAC's SimCLR ResNet-50.

    Args:
        weights: ``random`` or the local ``BrainIAC.ckpt`` (Lightning; read with ``weights_only=True``).
        levels: pooled stages (0-4; default the last, 2048 channels).
        pooling: ``avg``, ``max`` or ``gem``.
        input_size: the size the volume is resized to (authors: 128^3).
        crop_head: crop to the head box before resizing (the authors' inputs are already skull-stripped
            and registered, so their FOV is tight).
        margin: voxels kept around the head box.
        seed: random-init seed.
    """
    key = "3d/brainiac"
    kind, path = published_weights(key, weights, filename="BrainIAC.ckpt", where=WHERE, layout=LAYOUT)
    holder = nn.Module()
    holder.backbone = seeded(seed, brainiac_resnet50)
    shown, digest, unused = f"random:seed={seed}", "", []
    if path is not None:
        state = unwrap(read_checkpoint(path), ("state_dict",), path, key)
        # the authors' load_brainiac keeps keys containing 'backbone' and drops the SimCLR head
        unused = sorted(k for k in state if "backbone" not in k)
        load_strict(holder, {k: v for k, v in state.items() if "backbone" in k}, path, key,
                    f"BrainIAC layout {LAYOUT}")
        shown, digest = str(path), sha256_file(path)
    recipe = Recipe(crop="foreground" if crop_head else "none", margin=margin, resize="resize",
                    size=tuple(int(s) for s in input_size), interpolation="area", intensity="minmax_volume")
    feature_levels = [FeatureLevel3D(i, f"backbone.{n}", c, s) for i, (n, c, s) in
                      enumerate(zip(NAMES, CHANNELS, STRIDES))]
    chosen = resolve_levels(levels, 5, key)
    crop, intensity_text = recipe.describe()
    info = Encoder3DInfo(
        key=key, embed_dim=sum(CHANNELS[i] for i in chosen), source="BrainIAC (AIM-KannLab, Harvard)", weights=shown,
        weights_sha256=digest, in_chans=1, spacing=None, input_size=recipe.size, size_divisor=32, axes="RAS",
        crop=crop + " (authors: N4, rigid registration to a 1 mm atlas and HD-BET skull stripping beforehand)",
        intensity=intensity_text, pooling=pooling, levels=chosen, checkpoint=f"BrainIAC.ckpt: {LAYOUT}",
        reference="Tak et al. 2024, A foundation model for generalized brain MRI analysis (BrainIAC)",
        extra={"unused_keys": unused[:50], "n_unused_keys": len(unused), "seed": seed})
    return RecipeEncoder(holder, monai_resnet_stages(holder.backbone), feature_levels, info, recipe, channel)
