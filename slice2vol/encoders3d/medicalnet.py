"""MedicalNet / Med3D 3D ResNets (``3d/medicalnet_resnet{10,18,34,50}``, Chen et al. 2019).

Tencent's MedicalNet pretrained 3D ResNets by segmentation on 23 public CT/MRI datasets
(https://github.com/Tencent/MedicalNet; weights also on the Hugging Face hub as
``TencentMedicalNet/MedicalNet-Resnet{10,18,34,50}``).

Network: MONAI's ``ResNetFeatures`` (same parameter names; MedicalNet's shortcut per depth: ``B``
without bias for 10/50, ``A`` for 18/34), re-strided as MedicalNet runs it: ``layer3`` and ``layer4``
keep stride 1 and use dilation 2 and 4 (total stride 8, not 32). The published checkpoints
(``resnet_{10,18,34,50}[_23dataset].pth``) hold ``{"state_dict": {"module.conv1.weight", ...}}``
(``module.`` from DataParallel): backbone tensors only, all loaded strictly.

Preprocessing as MedicalNet's own inference dataset (``datasets/brains18.py``, test phase): the volume in
(D, H, W) = (Z, Y, X) order, resized to ``input_size`` (MedicalNet default 56 x 448 x 448) with
nearest-neighbour zoom (``scipy.ndimage.zoom(order=0)``), then z-scored over the voxels > 0 with the
zero voxels replaced by N(0, 1) noise (seeded here, ``seed``, so embeddings are reproducible).
``crop=True`` adds MedicalNet's training-time step that drops the constant border first.

Features: ``conv1`` (64, stride 2), ``layer1`` (64/256, stride 4), ``layer2`` (128/512, 8), ``layer3``
(256/1024, 8), ``layer4`` (512/2048, 8), average-pooled; default the last.
"""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from slice2vol.data.io import Volume
from slice2vol.encoders.base import hf_download, sha256_file
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
from slice2vol.encoders3d.preprocess import Recipe, select_channels, volume_tensor

DEPTHS = {10: (64, 64, 128, 256, 512), 18: (64, 64, 128, 256, 512), 34: (64, 64, 128, 256, 512),
          50: (64, 256, 512, 1024, 2048)}
STRIDES = (2, 4, 8, 8, 8)
NAMES = ("conv1", "layer1", "layer2", "layer3", "layer4")
LAYOUT = "{'state_dict': {'module.conv1.weight', 'module.layer1.0.conv1.weight', ...}}"


def dilate_like_medicalnet(model: nn.Module) -> nn.Module:
    """MONAI ResNet -> MedicalNet's geometry: layer3/layer4 at stride 1 with dilation 2/4 (in place)."""
    for name, dilation in (("layer3", 2), ("layer4", 4)):
        for block in getattr(model, name):
            for conv in block.modules():
                if isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3):
                    conv.stride, conv.dilation, conv.padding = (1, 1, 1), (dilation,) * 3, (dilation,) * 3
            down = block.downsample
            if isinstance(down, nn.Sequential):  # shortcut B: 1x1 conv + norm
                down[0].stride = (1, 1, 1)
            elif isinstance(down, partial):  # shortcut A: strided average pooling + zero channels
                block.downsample = partial(down.func, *down.args, **{**down.keywords, "stride": 1})
    return model


class MedicalNetEncoder(RecipeEncoder):
    """MedicalNet ResNet with MedicalNet's own test-time preprocessing (see the module docstring)."""

    def __init__(self, *args: Any, noise_seed: int = 0, crop: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_seed = noise_seed
        self.crop = crop

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """Volume -> (1, 1, D, H, W) = (Z, Y, X) resized (nearest) to ``input_size``, z-scored on voxels > 0,
        zero voxels filled with seeded N(0, 1) noise."""
        from scipy import ndimage

        data = volume_tensor(volume, select_channels(volume, 1, self.channel))[0].numpy()
        data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # RAS (X, Y, Z) -> (D, H, W) = (Z, Y, X)
        if self.crop:  # MedicalNet's __drop_invalid_range__ (training): box of values != the corner value
            idx = np.nonzero(data != data[0, 0, 0])
            if idx[0].size:
                data = data[tuple(slice(int(i.min()), int(i.max())) for i in idx)]
        size = self.info.input_size
        if size is not None:
            data = ndimage.zoom(data, [t / n for t, n in zip(size, data.shape)], order=0)
        pixels = data[data > 0]
        mean, std = (float(pixels.mean()), float(pixels.std())) if pixels.size else (0.0, 1.0)
        out = (data - mean) / max(std, 1e-8)
        noise = np.random.default_rng(self.noise_seed).normal(0, 1, size=data.shape)
        out[data == 0] = noise[data == 0]
        return torch.from_numpy(out.astype(np.float32))[None, None]


def _hub(depth: int, key: str) -> Any:
    def download(tag: str) -> str:
        names = (f"resnet_{depth}_23dataset.pth", f"resnet_{depth}.pth") if tag in ("", "23dataset") else \
            (f"resnet_{depth}.pth",)
        return hf_download(key, f"TencentMedicalNet/MedicalNet-Resnet{depth}", names,
                           f"--weights /path/to/{names[0]}")

    return download


def build_medicalnet(depth: int, weights: Any = "random", *, levels: Sequence[int] | int | str | None = -1,
                     pooling: str = "avg", input_size: Sequence[int] | None = (56, 448, 448), crop: bool = False,
                     seed: int = 0, noise_seed: int = 0, channel: int | None = None) -> MedicalNetEncoder:
    """A MedicalNet ResNet-``depth`` encoder.

    Args:
        weights: ``random``, ``hub`` (``hub:23dataset`` default / ``hub:8dataset``; Hugging Face
            ``TencentMedicalNet``) or a local ``resnet_<depth>*.pth``.
        levels: pooled stages (0-4; default the last, ``layer4``).
        pooling: ``avg``, ``max`` or ``gem``.
        input_size: (D, H, W) the volume is resized to (MedicalNet: 56 x 448 x 448); ``None`` keeps it.
        crop: drop the constant border first (MedicalNet's training-time step).
        seed: random-init seed.
        noise_seed: seed of the N(0, 1) background noise (the authors' is unseeded).
    """
    from monai.networks.nets.resnet import ResNetFeatures

    key = f"3d/medicalnet_resnet{depth}"
    kind, path = published_weights(key, weights, filename=f"resnet_{depth}_23dataset.pth",
                                   where="https://github.com/Tencent/MedicalNet or huggingface.co/TencentMedicalNet",
                                   layout=LAYOUT, hub=_hub(depth, key))
    network = seeded(seed, lambda: dilate_like_medicalnet(
        ResNetFeatures(f"resnet{depth}", pretrained=False, spatial_dims=3, in_channels=1)))
    shown, digest = f"random:seed={seed}", ""
    if path is not None:
        state = strip_prefix(unwrap(read_checkpoint(path), ("state_dict",), path, key), "module.")
        load_strict(network, state, path, key, f"MedicalNet layout {LAYOUT}")
        shown, digest = (f"hub:{path.name}" if kind == "hub" else str(path)), sha256_file(path)
    channels = DEPTHS[depth]
    feature_levels = [FeatureLevel3D(i, n, c, s) for i, (n, c, s) in enumerate(zip(NAMES, channels, STRIDES))]
    chosen = resolve_levels(levels, 5, key)
    size = None if input_size is None else tuple(int(s) for s in input_size)
    info = Encoder3DInfo(
        key=key, embed_dim=sum(channels[i] for i in chosen), source="Tencent MedicalNet (Med3D)", weights=shown,
        weights_sha256=digest, in_chans=1, spacing=None, input_size=size, size_divisor=8, axes="SAR",
        crop=("(D, H, W) = (Z, Y, X); " + ("constant border dropped, " if crop else "")
              + (f"nearest-neighbour zoom to {size}" if size else "native size")),
        intensity="z-score over voxels > 0; zero voxels replaced by N(0, 1) noise (seeded)",
        pooling=pooling, levels=chosen, checkpoint=f"resnet_{depth}[_23dataset].pth: {LAYOUT}",
        reference="Chen, Ma, Zheng 2019, Med3D: Transfer Learning for 3D Medical Image Analysis",
        extra={"depth": depth, "dilation": {"layer3": 2, "layer4": 4}, "seed": seed, "noise_seed": noise_seed})
    recipe = Recipe(crop="none", intensity="none", axes="SAR")  # unused: preprocess is MedicalNet's own
    return MedicalNetEncoder(network, lambda x: network(x), feature_levels, info, recipe, channel,
                             noise_seed=noise_seed, crop=crop)


def _register(depth: int) -> None:
    @ENCODERS3D.register(f"3d/medicalnet_resnet{depth}", embed_dim=DEPTHS[depth][-1], source="Tencent MedicalNet",
                         weights=("random", "hub", "file"))
    def build(weights: str | Path | None = "random", **kwargs: Any) -> MedicalNetEncoder:
        return build_medicalnet(depth, weights, **kwargs)

    build.__name__ = f"build_medicalnet_resnet{depth}"
    build.__doc__ = build_medicalnet.__doc__
    # build_medicalnet's options without ``depth``: what build_encoder3d's check_options (and help()) read
    signature = inspect.signature(build_medicalnet)
    build.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name != "depth"])


for _depth in DEPTHS:
    _register(_depth)
