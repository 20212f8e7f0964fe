"""3D-Neuro-SimCLR (``3d/neuro_simclr``, Kaczmarek et al. 2025, ICCV workshops).

A 3D ResNet-18 trained with SimCLR on 44,958 T1w scans of 18,759 subjects from 11 public datasets
(https://github.com/emilykaczmarek/3D-Neuro-SimCLR, weights released with the repository).

Network: the authors' copy of MONAI's ResNet-18 (1 channel, 7^3 stem at stride 1, max pool, shortcut B
with bias) with ``fc = Identity``, inside SimCLR (Spijkervet) as ``encoder`` next to a ``projector``
(512 -> 512 -> 64, no biases). Checkpoint: ``{"epoch", "model_state_dict": {"encoder.conv1.weight", ...,
"projector.0.weight", "projector.2.weight"}, "optimizer_state_dict"}``, with a ``module.`` prefix when
saved from DDP. Encoder and projector are both loaded strictly (the projector is not used for features).

Preprocessing as the authors': TurboPrep (N4, rigid registration to MNI152 2009c at 1 mm, skull stripping,
intensity normalisation; offline, not done here), then the dataset transposes to (Z, Y, X), crops
``[10:160, 19:211, 1:]`` of the MNI grid (150 x 192 x 192) and z-scores inside the brain mask (0 outside).
slice2vol approximates the grid: RAS at 1 mm, head box centred in 192 x 192 x 150 (X, Y, Z), axes
reordered to (Z, Y, X), z-scored inside the head mask (the brain mask when volumes are skull-stripped).

Features: ``conv1`` (64, stride 1), ``layer1`` (64, 2), ``layer2`` (128, 4), ``layer3`` (256, 8),
``layer4`` (512, 16), average-pooled; default the last = the encoder output used for fine-tuning.
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
    strip_prefix,
    unwrap,
)
from slice2vol.encoders3d.brainiac import monai_resnet_stages
from slice2vol.encoders3d.preprocess import Recipe

LAYOUT = ("{'model_state_dict': {'[module.]encoder.conv1.weight', ..., '[module.]projector.0.weight', "
          "'[module.]projector.2.weight'}, 'epoch', 'optimizer_state_dict'}")
WHERE = "release of https://github.com/emilykaczmarek/3D-Neuro-SimCLR"
CHANNELS = (64, 64, 128, 256, 512)
STRIDES = (1, 2, 4, 8, 16)
NAMES = ("conv1", "layer1", "layer2", "layer3", "layer4")


class SimCLRCheckpoint(nn.Module):
    """Spijkervet's SimCLR module layout: ``encoder`` (fc = Identity) and ``projector``."""

    def __init__(self, projection_dim: int = 64) -> None:
        super().__init__()
        from monai.networks.nets.resnet import ResNet, ResNetBlock, get_inplanes

        self.encoder = ResNet(ResNetBlock, [2, 2, 2, 2], get_inplanes(), spatial_dims=3, n_input_channels=1,
                              conv1_t_size=7, conv1_t_stride=1, shortcut_type="B", bias_downsample=True,
                              feed_forward=False)
        self.projector = nn.Sequential(nn.Linear(512, 512, bias=False), nn.ReLU(),
                                       nn.Linear(512, projection_dim, bias=False))


@ENCODERS3D.register("3d/neuro_simclr", embed_dim=512, source="3D-Neuro-SimCLR (Kaczmarek et al. 2025)",
                     weights=("random", "file"))
def build_neuro_simclr(weights: str | Path | None = "random", *, levels: Sequence[int] | int | str | None = -1,
                       pooling: str = "avg", spacing: Sequence[float] | float | None = 1.0,
                       input_size: Sequence[int] = (192, 192, 150), margin: int = 0, seed: int = 0,
                       channel: int | None = None) -> RecipeEncoder:
    """3D-Neuro-SimCLR's ResNet-18 encoder.

    Args:
        weights: ``random`` or the local released checkpoint (``model_state_dict`` inside).
        levels: pooled stages (0-4; default the last, 512 channels).
        pooling: ``avg``, ``max`` or ``gem``.
        spacing: voxel size (mm) to resample to (authors: 1 mm MNI grid); ``None`` keeps the grid.
        input_size: (X, Y, Z) grid the head is centred in before the axes become (Z, Y, X)
            (authors: 192 x 192 x 150).
        margin: voxels kept around the head box.
        seed: random-init seed.
    """
    key = "3d/neuro_simclr"
    kind, path = published_weights(key, weights, filename="the released SimCLR checkpoint (.tar/.pth)",
                                   where=WHERE, layout=LAYOUT)
    projection_dim = 64
    state = None
    if path is not None:
        state = strip_prefix(unwrap(read_checkpoint(path), ("model_state_dict", "state_dict"), path, key), "module.")
        if "projector.2.weight" in state:
            projection_dim = int(state["projector.2.weight"].shape[0])
    network = seeded(seed, lambda: SimCLRCheckpoint(projection_dim))
    shown, digest = f"random:seed={seed}", ""
    if path is not None and state is not None:
        load_strict(network, state, path, key, f"3D-Neuro-SimCLR layout {LAYOUT}")
        shown, digest = str(path), sha256_file(path)
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    size = tuple(int(s) for s in input_size)
    # the grid is fixed in RAS (X, Y, Z); the network sees it as (Z, Y, X)
    recipe = Recipe(spacing=None if spacing is None else tuple(float(s) for s in spacing), crop="foreground",
                    margin=margin, resize="pad_crop", size=(size[2], size[1], size[0]), axes="SAR",
                    intensity="zscore_masked")
    feature_levels = [FeatureLevel3D(i, f"encoder.{n}", c, s) for i, (n, c, s) in
                      enumerate(zip(NAMES, CHANNELS, STRIDES))]
    chosen = resolve_levels(levels, 5, key)
    crop, intensity_text = recipe.describe()
    info = Encoder3DInfo(
        key=key, embed_dim=sum(CHANNELS[i] for i in chosen), source="3D-Neuro-SimCLR (McGill / Mila)", weights=shown,
        weights_sha256=digest, in_chans=1, spacing=recipe.spacing, input_size=recipe.size, size_divisor=16,
        axes="SAR", crop=crop + " (authors: TurboPrep rigid MNI registration + skull stripping beforehand)",
        intensity=intensity_text, pooling=pooling, levels=chosen, checkpoint=LAYOUT,
        reference="Kaczmarek et al. 2025, Building a General SimCLR Self-Supervised Foundation Model Across "
                  "Neurological Diseases to Advance 3D Brain MRI Diagnoses",
        extra={"projection_dim": projection_dim, "seed": seed})
    return RecipeEncoder(network, monai_resnet_stages(network.encoder), feature_levels, info, recipe, channel)
