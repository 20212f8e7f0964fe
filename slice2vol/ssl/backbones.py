"""Encoder networks trained by the SSL methods, 2D or 3D through ``spatial_dims`` (MONAI style).

Every backbone is a :class:`Backbone`: ``feature_map(x)`` gives the last spatial feature map
(B, F, *grid) that decoders and token exporters use, ``forward(x)`` the pooled embedding
(B, embed_dim) that the benchmark sees. A 3D backbone therefore satisfies the native-3D encoder
contract: attribute ``embed_dim`` and ``forward(x (B, C, X, Y, Z)) -> (B, embed_dim)``.

Builders are registered in :data:`BACKBONES`; heavy libraries (MONAI, timm) load inside them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from slice2vol.registry import Registry

BACKBONES: Registry["Backbone"] = Registry("ssl backbone")


class Backbone(nn.Module):
    """Base class: subclasses implement ``feature_map`` and set the attributes below.

    Attributes:
        embed_dim: D of ``forward`` output (B, D).
        feature_dim: F of ``feature_map`` output (B, F, *grid).
        spatial_dims: 2 or 3.
        in_channels: image channels expected.
        fixed_size: input size the network requires (ViTs), ``None`` when any size works.
    """

    embed_dim: int
    feature_dim: int
    spatial_dims: int
    in_channels: int
    fixed_size: tuple[int, ...] | None = None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, feature_dim, *grid)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, embed_dim), global average of the feature map."""
        return self.feature_map(x).flatten(2).mean(-1)


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    raise ValueError(f"norm must be group, batch or instance, got {kind!r}")


class ConvEncoder(Backbone):
    """A plain stride-2 conv net: ``num_stages`` x [conv s2, norm, act, conv, norm, act].

    Small, fast and valid at any input size divisible by ``2 ** num_stages``; the default 3D
    backbone of the CPU configs and of the tests.

    Args:
        readout: what ``forward`` returns: ``last`` = global average of the last stage (B, C_last);
            ``stages`` = global averages of every stage, concatenated (B, sum C_s) — the coarse
            stages keep local intensity and texture statistics (tissue proportions) that the last,
            most abstract stage of a small network trained briefly may not.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, width: int = 16, num_stages: int = 4,
                 max_width: int = 256, norm: str = "group", readout: str = "last") -> None:
        super().__init__()
        if readout not in ("last", "stages"):
            raise ValueError(f"readout must be 'last' or 'stages', got {readout!r}")
        from slice2vol.config import check_whole

        for key, value in (("width", width), ("num_stages", num_stages), ("max_width", max_width)):
            check_whole(f"backbone.params.{key}", value, 1)
        conv = _conv(spatial_dims)
        layers: list[nn.Module] = []
        ch_in = in_channels
        widths = []
        for stage in range(num_stages):
            ch = min(width * 2 ** stage, max_width)
            layers += [conv(ch_in, ch, 3, stride=2, padding=1, bias=False), _norm(norm, ch, spatial_dims),
                       nn.GELU(), conv(ch, ch, 3, padding=1, bias=False), _norm(norm, ch, spatial_dims), nn.GELU()]
            ch_in = ch
            widths.append(ch)
        self.net = nn.Sequential(*layers)
        self.readout = readout
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.feature_dim = ch_in
        self.embed_dim = sum(widths) if readout == "stages" else ch_in

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.readout == "last":
            return self.net(x).flatten(2).mean(-1)
        pooled = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i % 6 == 5:  # end of a stage
                pooled.append(x.flatten(2).mean(-1))
        return torch.cat(pooled, dim=1)


class MonaiResNet(Backbone):
    """MONAI's ResNet (MedicalNet layout) without its classifier; ``depth`` in 10/18/34/50."""

    _LAYERS = {10: ("basic", [1, 1, 1, 1]), 18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
               50: ("bottleneck", [3, 4, 6, 3])}

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, depth: int = 18, widen_factor: float = 1.0,
                 block_inplanes: Sequence[int] = (64, 128, 256, 512), conv1_t_stride: int = 2,
                 no_max_pool: bool = False, norm: str = "batch") -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        if depth not in self._LAYERS:
            raise ValueError(f"resnet depth must be one of {sorted(self._LAYERS)}, got {depth}")
        block, layers = self._LAYERS[depth]
        self.net = ResNet(block, layers, list(block_inplanes), spatial_dims=spatial_dims,
                          n_input_channels=in_channels, conv1_t_stride=conv1_t_stride, no_max_pool=no_max_pool,
                          widen_factor=widen_factor, feed_forward=False, norm=norm)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.embed_dim = self.feature_dim = self.net.in_planes

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class MonaiViT(Backbone):
    """MONAI's ViT; the feature map is the patch-token grid, the embedding the token mean."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, img_size: Sequence[int] = (96, 96, 96),
                 patch_size: int = 16, hidden_size: int = 384, mlp_dim: int = 1536, num_layers: int = 6,
                 num_heads: int = 6, pos_embed_type: str = "learnable", qkv_bias: bool = True) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        img_size = tuple(img_size)[-spatial_dims:]
        self.net = ViT(in_channels, img_size, patch_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
                       num_layers=num_layers, num_heads=num_heads, pos_embed_type=pos_embed_type,
                       classification=False, spatial_dims=spatial_dims, qkv_bias=qkv_bias)
        self.grid = tuple(s // patch_size for s in img_size)
        self.spatial_dims, self.in_channels, self.fixed_size = spatial_dims, in_channels, img_size
        self.embed_dim = self.feature_dim = hidden_size

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.net(x)  # (B, N, D), grid in C order
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)


class SwinEncoder(Backbone):
    """The SwinUNETR encoder (``SwinUNETR.swinViT``); keys match SwinUNETR checkpoints minus ``swinViT.``.

    Input sides must be divisible by 32; the feature map is the last stage, 16 x ``feature_size``.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, feature_size: int = 24,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, use_v2: bool = False, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.net = SwinTransformer(in_chans=in_channels, embed_dim=feature_size,
                                   window_size=(window_size,) * spatial_dims, patch_size=(2,) * spatial_dims,
                                   depths=tuple(depths), num_heads=tuple(num_heads), drop_path_rate=drop_path_rate,
                                   spatial_dims=spatial_dims, use_v2=use_v2)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.embed_dim = self.feature_dim = feature_size * 2 ** len(depths)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, normalize=True)[-1]


class TimmBackbone(Backbone):
    """Any timm model (2D only), random weights, ``in_chans`` set to the image channels."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, model: str = "resnet18",
                 img_size: Sequence[int] | None = None, **kwargs) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError("timm backbones are 2D; use cnn, resnet, vit or swin for spatial_dims=3")
        import timm

        extra = dict(kwargs)
        if img_size is not None and "vit" in model:
            extra["img_size"] = tuple(img_size)[-2:]
        self.net = timm.create_model(model, pretrained=False, in_chans=in_channels, num_classes=0, **extra)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.embed_dim = self.feature_dim = self.net.num_features
        self.num_prefix = getattr(self.net, "num_prefix_tokens", 0)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net.forward_features(x)
        if feats.ndim == 3:  # ViT tokens (B, prefix + h*w, D) -> grid
            feats = feats[:, self.num_prefix:]
            side = int(round(feats.shape[1] ** 0.5))
            feats = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, feats.shape[1] // side)
        elif feats.ndim == 4 and feats.shape[-1] == self.feature_dim and feats.shape[1] != self.feature_dim:
            feats = feats.permute(0, 3, 1, 2)  # NHWC models (some convnext/swin)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@BACKBONES.register("cnn")
def build_cnn(spatial_dims: int, in_channels: int, img_size: Sequence[int], **params) -> Backbone:
    return ConvEncoder(spatial_dims, in_channels, **params)


@BACKBONES.register("resnet")
def build_resnet(spatial_dims: int, in_channels: int, img_size: Sequence[int], **params) -> Backbone:
    return MonaiResNet(spatial_dims, in_channels, **params)


@BACKBONES.register("vit")
def build_vit(spatial_dims: int, in_channels: int, img_size: Sequence[int], **params) -> Backbone:
    return MonaiViT(spatial_dims, in_channels, img_size=img_size, **params)


@BACKBONES.register("swin")
def build_swin(spatial_dims: int, in_channels: int, img_size: Sequence[int], **params) -> Backbone:
    if any(s % 32 for s in img_size):
        raise ValueError(f"swin backbone needs input sides divisible by 32, got {tuple(img_size)}")
    return SwinEncoder(spatial_dims, in_channels, **params)


@BACKBONES.register("timm")
def build_timm(spatial_dims: int, in_channels: int, img_size: Sequence[int], **params) -> Backbone:
    return TimmBackbone(spatial_dims, in_channels, img_size=img_size, **params)


def build_backbone(name: str, spatial_dims: int, in_channels: int, img_size: Sequence[int], **params) -> Backbone:
    """Builds a registered backbone.

    Args:
        name: ``cnn``, ``resnet``, ``vit``, ``swin`` or ``timm``.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        img_size: training input size (needed by ViTs, checked by Swin).
        **params: builder keywords.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    try:
        return BACKBONES.build(name, spatial_dims=spatial_dims, in_channels=in_channels,
                               img_size=tuple(img_size), **params)
    except TypeError as err:
        raise ValueError(f"backbone {name!r}: bad parameters {sorted(params)} ({err})") from None
    except RuntimeError as err:  # torch's own refusal (a negative or zero size deep inside a builder)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"backbone {name!r}: parameters {params} build no network ({text})") from None


class ConvDecoder(nn.Module):
    """Upsamples a feature map (B, F, *grid) back to an image (B, C, *out_size).

    ``log2(out / grid)`` stages of [x2 upsample, conv, norm, act] halving the channels, a 1x1 conv
    to ``out_channels``, then an exact resize if the sizes are not powers of two apart. No skip
    connections: the reconstruction must go through the encoder's representation.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, grid: Sequence[int],
                 out_size: Sequence[int], min_width: int = 16, norm: str = "group") -> None:
        super().__init__()
        import math

        conv = _conv(spatial_dims)
        ratio = max(o / g for o, g in zip(out_size, grid))
        n_up = max(0, int(math.ceil(math.log2(ratio))))
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(n_up):
            nxt = max(min_width, ch // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(ch, nxt, 3, padding=1, bias=False),
                       _norm(norm, nxt, spatial_dims), nn.GELU()]
            ch = nxt
        layers.append(conv(ch, out_channels, 1))
        self.net = nn.Sequential(*layers)
        self.out_size = tuple(out_size)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.net(feats)
        if tuple(out.shape[2:]) != self.out_size:
            mode = "trilinear" if out.ndim == 5 else "bilinear"
            out = nn.functional.interpolate(out, size=self.out_size, mode=mode, align_corners=False)
        return out


def probe_grid(backbone: Backbone, in_channels: int, img_size: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Shape of ``feature_map`` for one input of ``img_size``: (grid, feature_dim).

    Runs a copy on the ``meta`` device (shapes only, no compute: a 96^3 ResNet probe costs a
    minute on a busy CPU otherwise), falling back to a real forward for ops without meta support.
    """
    import copy

    try:
        with torch.no_grad():
            fm = copy.deepcopy(backbone).to("meta").eval().feature_map(
                torch.zeros(1, in_channels, *img_size, device="meta"))
    except (NotImplementedError, RuntimeError):
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            fm = backbone.feature_map(torch.zeros(1, in_channels, *img_size))
        backbone.train(was_training)
    return tuple(fm.shape[2:]), int(fm.shape[1])
