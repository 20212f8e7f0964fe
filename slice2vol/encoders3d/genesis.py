"""Models Genesis 3D U-Net (``3d/models_genesis``, Zhou et al. 2019/2021).

The self-supervised 3D U-Net of Models Genesis (https://github.com/MrGiovanni/ModelsGenesis, PyTorch
``pytorch/unet3d.py``), pretrained by restoring transformed sub-volumes of LUNA16 chest CT
(``Genesis_Chest_CT.pt``, obtained from the authors through a request form; there is no direct download).

Network: re-expressed here with the authors' module names (``down_tr64.ops.0.conv1``, ``bn1``,
``up_tr256.up_conv``, ``out_tr.final_conv``, ...), encoder and decoder, so the published file loads
strictly: ``{"state_dict": {"module.down_tr64.ops.0.conv1.weight", ...}}`` (``module.`` from
DataParallel). Its ``ContBatchNorm3d`` always normalises with the statistics of the batch it sees, also at
inference (here without updating the running buffers, which the authors' module overwrites).

Preprocessing (the authors' advice for MRI): raw intensities clipped to [0, 4000] and scaled to [0, 1]
(``value_range``); RAS, cropped to the head, sides padded to multiples of 16 (any size works, the
authors pretrained on 64 x 64 x 32 cubes).

Features: the encoder outputs before pooling, ``down_tr64`` (64 ch, stride 1), ``down_tr128`` (128, 2),
``down_tr256`` (256, 4), ``down_tr512`` (512, 8), average-pooled; default the last (``out512``, the
authors' classification example).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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
from slice2vol.encoders3d.preprocess import Recipe

LAYOUT = "{'state_dict': {'module.down_tr64.ops.0.conv1.weight', 'module.down_tr64.ops.0.bn1.running_mean', ...}}"
WHERE = "request form linked from https://github.com/MrGiovanni/ModelsGenesis (pytorch/README.md)"


class BatchStatNorm3d(nn.modules.batchnorm._BatchNorm):
    """Models Genesis' ``ContBatchNorm3d``: batch statistics at train and test time (running buffers kept
    for the checkpoint layout, not updated here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class LUConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = BatchStatNorm3d(cout)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_convs(cin: int, depth: int, double: bool) -> nn.Sequential:
    if double:
        width = 32 * 2 ** (depth + 1)
        return nn.Sequential(LUConv(cin, width), LUConv(width, width))
    width = 32 * 2 ** depth
    return nn.Sequential(LUConv(cin, width), LUConv(width, width * 2))


class DownTransition(nn.Module):
    def __init__(self, cin: int, depth: int) -> None:
        super().__init__()
        self.ops = _two_convs(cin, depth, False)
        self.maxpool = nn.MaxPool3d(2)
        self.current_depth = depth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before_pool = self.ops(x)
        return (before_pool if self.current_depth == 3 else self.maxpool(before_pool)), before_pool


class UpTransition(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)
        self.ops = _two_convs(cin + cout // 2, depth, True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class OutputTransition(nn.Module):
    def __init__(self, cin: int, n_labels: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(cin, n_labels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.final_conv(x))


class GenesisUNet3D(nn.Module):
    """Models Genesis' ``UNet3D``: (B, 1, X, Y, Z), sides multiples of 8 -> (B, n_class, X, Y, Z) in [0, 1]."""

    def __init__(self, n_class: int = 1) -> None:
        super().__init__()
        self.down_tr64, self.down_tr128 = DownTransition(1, 0), DownTransition(64, 1)
        self.down_tr256, self.down_tr512 = DownTransition(128, 2), DownTransition(256, 3)
        self.up_tr256, self.up_tr128 = UpTransition(512, 512, 2), UpTransition(256, 256, 1)
        self.up_tr64 = UpTransition(128, 128, 0)
        self.out_tr = OutputTransition(64, n_class)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs before pooling: [(B, 64, X, ...), (B, 128, X/2, ...), (B, 256, X/4, ...), (B, 512, X/8, ...)]."""
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        out512, _ = self.down_tr512(out256)
        return [skip64, skip128, skip256, out512]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip64, skip128, skip256, out512 = self.encode(x)
        y = self.up_tr256(out512, skip256)
        y = self.up_tr128(y, skip128)
        return self.out_tr(self.up_tr64(y, skip64))


@ENCODERS3D.register("3d/models_genesis", embed_dim=512, source="Models Genesis (Zhou et al.)",
                     weights=("random", "file"))
def build_models_genesis(weights: str | Path | None = "random", *, levels: Sequence[int] | int | str | None = -1,
                         pooling: str = "avg", spacing: Sequence[float] | float | None = None,
                         value_range: Sequence[float] = (0.0, 4000.0), intensity: str = "range", margin: int = 0,
                         seed: int = 0, channel: int | None = None) -> RecipeEncoder:
    """Models Genesis' 3D U-Net encoder.

    Args:
        weights: ``random`` or the local ``Genesis_Chest_CT.pt`` (no public download URL).
        levels: pooled encoder stages (0-3; default the last, 512 channels).
        pooling: ``avg``, ``max`` or ``gem``.
        spacing: voxel size (mm) to resample to; ``None`` keeps the grid.
        value_range: raw window scaled to [0, 1] (authors: MRI 0-4000, CT -1000-1000).
        intensity: ``range`` (authors) or another :class:`Recipe` intensity.
        margin: voxels kept around the head box.
        seed: random-init seed.
    """
    key = "3d/models_genesis"
    kind, path = published_weights(key, weights, filename="Genesis_Chest_CT.pt", where=WHERE, layout=LAYOUT)
    network = seeded(seed, GenesisUNet3D)
    shown, digest = f"random:seed={seed}", ""
    if path is not None:
        state = strip_prefix(unwrap(read_checkpoint(path), ("state_dict",), path, key), "module.")
        load_strict(network, state, path, key, f"Models Genesis layout {LAYOUT}")
        shown, digest = str(path), sha256_file(path)
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    recipe = Recipe(spacing=None if spacing is None else tuple(float(s) for s in spacing), crop="foreground",
                    margin=margin, resize="none", divisor=16, intensity=intensity,  # type: ignore[arg-type]
                    value_range=(float(value_range[0]), float(value_range[1])))
    names = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
    feature_levels = [FeatureLevel3D(i, n, c, s) for i, (n, c, s) in enumerate(zip(names, (64, 128, 256, 512),
                                                                                     (1, 2, 4, 8)))]
    chosen = resolve_levels(levels, 4, key)
    crop, intensity_text = recipe.describe()
    info = Encoder3DInfo(
        key=key, embed_dim=sum(feature_levels[i].channels for i in chosen), source="Models Genesis (MrGiovanni)",
        weights=shown, weights_sha256=digest, in_chans=1, spacing=recipe.spacing, input_size=(64, 64, 32),
        size_divisor=16, axes="RAS", crop=crop, intensity=intensity_text, pooling=pooling, levels=chosen,
        checkpoint=f"Genesis_Chest_CT.pt: {LAYOUT}",
        reference="Zhou et al. 2019, Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis",
        extra={"norm": "batch statistics at inference (ContBatchNorm3d)", "seed": seed})
    return RecipeEncoder(network, network.encode, feature_levels, info, recipe, channel)
