"""The FOMO25-winning U-Net (``3d/fomo25_unet``, Gordaliza, Banus et al., MICCAI 2025).

Team FOMO2JOMO (CHUV / UNIL, CIBM) ranked first in tracks of both MICCAI 2025 brain-MRI foundation-model
challenges (SSL3D and FOMO25) with a small CNN U-Net (Gordaliza, Banus et al. 2026, "From 100,000+ images
to winning the first brain MRI foundation model challenges"). This family implements their FOMO25 model as
published in the team's code (https://github.com/jbanusco/fomo25, ``src/models/networks/mmunetvae.py``,
built on the FOMO25 baseline / Yucca U-Net): ``MultiModalUNetVAE`` in pretraining mode —

* ``encoder``: the Yucca ``UNetEncoder`` (``in_conv``, ``encoder_conv1``-``4``; two conv-InstanceNorm(affine)-
  LeakyReLU(0.01) layers per stage, max pooling), widths W, 2W, 4W, 8W, 16W (W = 32 for ``unet_b``,
  64 for ``unet_xl``; read from the checkpoint);
* the latent heads ``conv_mu_shared`` / ``conv_logvar_shared`` / ``conv_mu_modality`` /
  ``conv_logvar_modality``: 1x1 convolutions over all encoder stages pooled to the bottleneck grid;
* ``decoder``: the skip-less ``UNetDecoder`` reconstructing the image from the latent.

Checkpoint: the Lightning file of their pretraining (``{"state_dict": {"model.encoder.in_conv.conv1.conv.weight",
..., "model.conv_mu_shared.weight", ..., "model.decoder.out_conv.weight"}, ...}``; ``_orig_mod.`` after
``torch.compile`` is accepted), every tensor loaded strictly. The released files themselves could not be
inspected here: the layout follows the team's training code, and a file that differs fails with a list
of the missing/unexpected keys.

Features: the five encoder stages (stride 1-16) and ``latent``: the authors' subject+modality
representation ``[mu_shared, mu_modality]`` (16 W channels at the bottleneck grid, what their
classification/regression heads read), average-pooled; default ``latent``.

Preprocessing as the team's "opinionated preprocessing" (Yucca): RAS, skull-stripped and co-registered
inputs (FOMO60K is distributed that way; not done here), cropped to the minimum bounding box, z-normalised
per volume, resampled to 1 mm; sides padded to multiples of 16. The authors infer with 96^3 patches
(overlap 0.5), averaging patch outputs: ``sliding_window={"roi_size": [96, 96, 96], "overlap": 0.5}``.
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

LAYOUT = ("Lightning {'state_dict': {'model.encoder.in_conv.conv1.conv.weight', ..., 'model.conv_mu_shared.weight', "
          "..., 'model.decoder.out_conv.weight'}}")
WHERE = "the FOMO2JOMO team's release (Gordaliza, Banus et al. 2026; code https://github.com/jbanusco/fomo25)"


class ConvNormAct(nn.Module):
    """Yucca ``ConvDropoutNormNonlin`` without dropout (p = 0): conv3 -> InstanceNorm(affine) -> LeakyReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.activation = nn.LeakyReLU(1e-2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class ConvBlock(nn.Module):
    """Yucca ``MultiLayerConvDropoutNormNonlin``: ``conv1`` .. ``conv<n>``."""

    def __init__(self, cin: int, cout: int, layers: int = 2) -> None:
        super().__init__()
        self.layers = layers
        self.conv1 = ConvNormAct(cin, cout)
        for i in range(2, layers + 1):
            self.add_module(f"conv{i}", ConvNormAct(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.layers + 1):
            x = getattr(self, f"conv{i}")(x)
        return x


class UNetEncoder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_conv = ConvBlock(1, width)
        for i in range(1, 5):
            self.add_module(f"encoder_conv{i}", ConvBlock(width * 2 ** (i - 1), width * 2 ** i))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.in_conv(x)]
        for i in range(1, 5):
            out.append(getattr(self, f"encoder_conv{i}")(F.max_pool3d(out[-1], 2)))
        return out


class UNetDecoder(nn.Module):
    """Skip-less decoder of the pretraining model (``upsample1-4``, ``decoder_conv1-4``, ``out_conv``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        for i in range(1, 5):
            cin, cout = width * 2 ** (5 - i), width * 2 ** (4 - i)
            self.add_module(f"upsample{i}", nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2))
            self.add_module(f"decoder_conv{i}", ConvBlock(cout, cout))
        self.out_conv = nn.Conv3d(width, 1, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            z = getattr(self, f"decoder_conv{i}")(getattr(self, f"upsample{i}")(z))
        return self.out_conv(z)


class UNetVAE(nn.Module):
    """``MultiModalUNetVAE`` (pretraining mode): encoder, latent 1x1 heads, reconstruction decoder."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.encoder = UNetEncoder(width)
        self.decoder = UNetDecoder(width)
        bottleneck = sum(width * 2 ** i for i in range(5))
        shared = width * 16 // 2
        for name, cout in (("shared", shared), ("modality", width * 16 - shared)):
            self.add_module(f"conv_mu_{name}", nn.Conv3d(bottleneck, cout, kernel_size=1))
            self.add_module(f"conv_logvar_{name}", nn.Conv3d(bottleneck, cout, kernel_size=1))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, X, Y, Z), sides multiples of 16 -> 5 encoder maps + the latent [mu_shared, mu_modality]."""
        skips = self.encoder(x)
        pooled = torch.cat([F.adaptive_avg_pool3d(f, skips[-1].shape[2:]) for f in skips], 1)
        latent = torch.cat([self.conv_mu_shared(pooled), self.conv_mu_modality(pooled)], 1)
        return [*skips, latent]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.stages(x)[-1])


@ENCODERS3D.register("3d/fomo25_unet", embed_dim=512, source="FOMO25 winner (FOMO2JOMO: Gordaliza, Banus et al.)",
                     weights=("random", "file"))
def build_fomo25_unet(weights: str | Path | None = "random", *, levels: Sequence[int] | int | str | None = -1,
                      pooling: str = "avg", width: int = 32, spacing: Sequence[float] | float | None = 1.0,
                      input_size: Sequence[int] = (96, 96, 96), intensity: str = "zscore_volume", margin: int = 0,
                      seed: int = 0, channel: int | None = None) -> RecipeEncoder:
    """The FOMO25-winning U-Net encoder.

    Args:
        weights: ``random`` or the team's Lightning checkpoint (read with ``weights_only=True``; convert to
            ``.safetensors`` if it holds other objects).
        levels: pooled stages: 0-4 encoder, 5 the latent (default, the authors' representation).
        pooling: ``avg``, ``max`` or ``gem``.
        width: starting filters W for random init (a checkpoint sets it).
        spacing: voxel size (mm) to resample to (authors: 1 mm); ``None`` keeps the grid.
        input_size: window for sliding-window embedding (authors' patch 96^3).
        intensity: intensity recipe; default the authors' per-volume z-score.
        margin: voxels kept around the head box.
        seed: random-init seed.
    """
    key = "3d/fomo25_unet"
    kind, path = published_weights(key, weights, filename="the team's pretraining checkpoint (.ckpt)", where=WHERE,
                                   layout=LAYOUT)
    state = None
    if path is not None:
        state = unwrap(read_checkpoint(path), ("state_dict",), path, key)
        state = strip_prefix(strip_prefix(state, "model."), "_orig_mod.")
        if "encoder.in_conv.conv1.conv.weight" in state:
            width = int(state["encoder.in_conv.conv1.conv.weight"].shape[0])
    network = seeded(seed, lambda: UNetVAE(width))
    shown, digest = f"random:seed={seed}", ""
    if path is not None and state is not None:
        load_strict(network, state, path, key, f"FOMO25 U-Net layout {LAYOUT}")
        shown, digest = str(path), sha256_file(path)
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    recipe = Recipe(spacing=None if spacing is None else tuple(float(s) for s in spacing), crop="foreground",
                    margin=margin, resize="none", divisor=16, intensity=intensity)  # type: ignore[arg-type]
    names = ("encoder.in_conv", "encoder.encoder_conv1", "encoder.encoder_conv2", "encoder.encoder_conv3",
             "encoder.encoder_conv4", "latent (conv_mu_shared + conv_mu_modality)")
    channels = [width * 2 ** i for i in range(5)] + [width * 16]
    feature_levels = [FeatureLevel3D(i, n, c, s) for i, (n, c, s) in
                      enumerate(zip(names, channels, (1, 2, 4, 8, 16, 16)))]
    chosen = resolve_levels(levels, 6, key)
    crop, intensity_text = recipe.describe()
    info = Encoder3DInfo(
        key=key, embed_dim=sum(channels[i] for i in chosen), source="FOMO2JOMO team (CHUV/UNIL), FOMO25 winner",
        weights=shown, weights_sha256=digest, in_chans=1, spacing=recipe.spacing,
        input_size=tuple(int(s) for s in input_size), size_divisor=16, axes="RAS",
        crop=crop + " (authors: skull-stripped, co-registered inputs)", intensity=intensity_text, pooling=pooling,
        levels=chosen, checkpoint=LAYOUT,
        reference="Gordaliza, Banus et al. 2026, From 100,000+ images to winning the first brain MRI foundation "
                  "model challenges",
        extra={"width": width, "authors_inference": "sliding 96^3 patches, overlap 0.5", "seed": seed})
    return RecipeEncoder(network, network.stages, feature_levels, info, recipe, channel)
