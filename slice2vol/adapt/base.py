"""Shared machinery of 2D->3D weight adaptation: the 3D encoder wrapper and the module-tree walker.

Every adaptation method (``inflate``, ``acs``, ``vit3d``) turns the network held by a 2D
:class:`~slice2vol.encoders.Encoder` into a native 3D network and wraps it in an
:class:`Adapted3DEncoder`, which follows the 3D-encoder contract of the benchmark: attribute
``embed_dim`` and ``forward(x of shape (B, C, X, Y, Z)) -> (B, embed_dim)``, intensities in [0, 1].

Axis convention: the 3D network always sees its *depth* axis last. The 2D kernel's (h, w) axes map
to the two other axes in order. ``depth_axis`` (0=X, 1=Y, 2=Z in RAS) picks which volume axis is the
depth; the default 2 (Z) means the 2D kernels act in axial planes, like a 2D model fed axial slices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.encoders.base import check_gem_p, gem_pool
from slice2vol.registry import Registry

#: Adaptation methods: ``ADAPTERS.get(method)(encoder_2d, **options) -> Adapted3DEncoder``.
ADAPTERS: Registry["Adapted3DEncoder"] = Registry("2d->3d adaptation")


@dataclass
class Adapted3DInfo:
    """Provenance of an adapted 3D encoder (recorded in the feature store by the exporter).

    Attributes:
        key: ``<method>/<2d key>``, e.g. ``inflate/timm/resnet18``.
        method: ``inflate``, ``acs`` or ``vit3d``.
        base: the 2D encoder's ``EncoderInfo.to_dict()``, weights and their sha256 included.
        embed_dim: D of the (B, D) output.
        depth_axis: volume axis used as depth (0=X, 1=Y, 2=Z).
        input_size: (X, Y, Z) the volume is resized to inside ``forward``, or None (any size).
        options: method options (inflation mode, depth padding, position embedding mode, ...).
    """

    key: str
    method: str
    base: dict[str, Any]
    embed_dim: int
    depth_axis: int = 2
    input_size: tuple[int, int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["input_size"] = list(self.input_size) if self.input_size else None
        return d


class Adapted3DEncoder(nn.Module):
    """A 2D-pretrained network made 3D, with its own channel replication and normalisation.

    Args:
        trunk: 3D network mapping preprocessed (B, in_chans, A, B', Depth) to either a feature map
            (B, D, a, b, d) (``pooling`` ``avg``/``gem``) or an embedding (B, D) (``pooling`` ``none``).
        info: provenance, ``info.embed_dim`` is D.
        mean, std: per-channel normalisation of the 2D encoder (ImageNet for most).
        in_chans: channels the trunk takes; single-channel volumes are replicated.
        pooling: ``avg`` (mean over space), ``max``, ``gem``, or ``none`` (trunk pools itself);
            the adapters copy the 2D encoder's choice.
        gem_p: exponent of ``gem`` pooling.
    """

    def __init__(
        self,
        trunk: nn.Module,
        info: Adapted3DInfo,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        in_chans: int = 3,
        pooling: str = "avg",
        gem_p: float = 3.0,
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "max", "gem", "none"):
            raise ValueError(f"{info.key}: pooling must be avg, max, gem or none, got {pooling!r}")
        self.trunk = trunk
        self.info = info
        self.embed_dim = info.embed_dim
        self.in_chans = in_chans
        self.pooling = pooling
        self.gem_p = check_gem_p(gem_p)  # refused here, not on the first batch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes (B, C, X, Y, Z) in [0, 1] -> trunk input (B, in_chans, ., ., depth), depth last.

        One channel is replicated to ``in_chans``; C == in_chans passes through.
        """
        if x.ndim != 5:
            raise ValueError(f"{self.info.key}: expected volumes (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        x = x.float()
        c = x.shape[1]
        if c == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1, -1)
        elif c != self.in_chans:
            raise ValueError(f"{self.info.key}: got {c} channels, the network takes 1 or {self.in_chans}")
        if self.info.input_size is not None and tuple(x.shape[2:]) != tuple(self.info.input_size):
            x = F.interpolate(x, size=tuple(self.info.input_size), mode="trilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return to_depth_last(x, self.info.depth_axis)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, in_chans, ., ., depth) -> embeddings (B, embed_dim)."""
        out = self.trunk(x)
        if self.pooling == "none":
            return out
        if self.pooling == "gem":
            return gem_pool(out, self.gem_p, dims=(2, 3, 4))
        if self.pooling == "max":
            return out.amax((2, 3, 4))
        return out.mean((2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes (B, C, X, Y, Z) in [0, 1] -> embeddings (B, embed_dim)."""
        return self.forward_features(self.preprocess(x))

    @property
    def slice2vol_meta(self) -> dict[str, Any]:
        """Provenance in the form :func:`slice2vol.ssl.export.embed_cohort` records for 3D encoders."""
        base = self.info.base
        return {"key": self.info.key, "method": self.info.method, "checkpoint": base.get("weights", ""),
                "weights_sha256": base.get("weights_sha256", ""), "config": {}}

    def extra_repr(self) -> str:
        return f"key={self.info.key!r}, embed_dim={self.embed_dim}, depth_axis={self.info.depth_axis}"


def to_depth_last(x: torch.Tensor, depth_axis: int) -> torch.Tensor:
    """(B, C, X, Y, Z) -> the same volume with ``depth_axis`` moved last, other axes in order."""
    if depth_axis not in (0, 1, 2):
        raise ValueError(f"depth_axis must be 0 (X), 1 (Y) or 2 (Z), got {depth_axis}")
    return x if depth_axis == 2 else x.movedim(2 + depth_axis, -1)


# -- reaching the 2D network inside an Encoder --------------------------------------------------
_NET_ATTRS = ("model", "net", "backbone", "trunk", "visual")


def network_of(encoder: nn.Module) -> nn.Module:
    """The timm/torchvision network an :class:`Encoder` wraps (``.model``/``.net``/... or its only child)."""
    for name in _NET_ATTRS:
        net = getattr(encoder, name, None)
        if isinstance(net, nn.Module):
            return net
    children = list(encoder.children())
    if len(children) == 1:
        return children[0]
    raise TypeError(
        f"{type(encoder).__name__}: cannot find the wrapped network (looked for attributes "
        f"{', '.join(_NET_ATTRS)} or a single child module)"
    )


def _encoder_info(encoder: nn.Module) -> dict[str, Any]:
    info = getattr(encoder, "info", None)
    return info.to_dict() if hasattr(info, "to_dict") else {}


# -- generic 2D -> 3D module walker -------------------------------------------------------------
Handler = Callable[[nn.Module], nn.Module]


def _is_exact(module: nn.Module, cls: type) -> bool:
    """True when ``module`` is ``cls`` or a subclass that keeps ``cls.forward`` (e.g. timm aliases)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def triple(value: Any, depth_value: Any) -> tuple:
    """(h, w) pair -> (h, w, depth_value); ints are treated as square pairs."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    return (pair[0], pair[1], depth_value)


def depth_of(pair: Any) -> Any:
    """Value to use along depth for a 2D (h, w) hyper-parameter: h when square, else 1."""
    pair = (pair, pair) if isinstance(pair, int) else tuple(pair)
    return pair[0] if pair[0] == pair[1] else 1


class BatchNormAct3d(nn.BatchNorm3d):
    """timm's ``BatchNormAct2d`` (batch norm + dropout + activation) for 5D input, same parameter names."""

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class SqueezeExcite3d(nn.Module):
    """Squeeze-excitation over a 3D feature map, reusing a 2D SE block's (converted) 1x1 convs."""

    def __init__(self, se2d: nn.Module) -> None:
        super().__init__()
        self.se = se2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        se = self.se
        s = x.mean((2, 3, 4), keepdim=True)
        if hasattr(se, "conv_reduce"):  # timm efficientnet SqueezeExcite / SEModule
            s = se.conv_reduce(s)
            s = se.act1(s) if hasattr(se, "act1") else se.act(s)
            s = se.conv_expand(s)
            return x * se.gate(s)
        if hasattr(se, "fc1"):  # torchvision SqueezeExcitation / timm SEModule(fc1, fc2)
            if hasattr(se, "bn"):  # timm SEModule: fc1 -> bn -> act -> fc2
                s = se.fc2(se.act(se.bn(se.fc1(s))))
            else:  # torchvision: fc1 -> activation -> fc2
                s = se.fc2(se.activation(se.fc1(s)))
            gate = se.scale_activation if hasattr(se, "scale_activation") else se.gate
            return x * gate(s)
        raise TypeError(f"unsupported squeeze-excitation block {type(se).__name__}")


def _copy_bn(bn2d: nn.BatchNorm2d, bn3d: nn.BatchNorm3d) -> nn.BatchNorm3d:
    bn3d.load_state_dict(bn2d.state_dict())
    bn3d.train(bn2d.training)
    return bn3d


def _bn(m: nn.Module) -> nn.Module:
    return _copy_bn(m, nn.BatchNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats))


def _bn_act(m: nn.Module) -> nn.Module:
    return _copy_bn(m, BatchNormAct3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                      drop=m.drop, act=m.act))


def _max_pool(m: nn.MaxPool2d) -> nn.Module:
    # Max over a window that repeats along depth is unchanged, so inflating the window keeps I3D exact.
    return nn.MaxPool3d(triple(m.kernel_size, depth_of(m.kernel_size)), triple(m.stride, depth_of(m.stride)),
                        triple(m.padding, depth_of(m.padding)), triple(m.dilation, depth_of(m.dilation)),
                        ceil_mode=m.ceil_mode)


def _avg_pool(m: nn.AvgPool2d) -> nn.Module:
    return nn.AvgPool3d(triple(m.kernel_size, depth_of(m.kernel_size)), triple(m.stride, depth_of(m.stride)),
                        triple(m.padding, depth_of(m.padding)), ceil_mode=m.ceil_mode,
                        count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)


def _adaptive_size(size: Any) -> tuple:
    pair = (size, size) if isinstance(size, int) or size is None else tuple(size)
    return (pair[0], pair[1], pair[0] if pair[0] == pair[1] else None)


class GlobalPool3d(nn.Module):
    """Replacement for timm's ``SelectAdaptivePool2d``: global avg/max over (a, b, d), optionally flattened."""

    def __init__(self, pool_type: str = "avg", flatten: bool = True) -> None:
        super().__init__()
        self.pool_type, self.flatten = pool_type, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "max":
            out = x.amax((2, 3, 4), keepdim=True)
        elif self.pool_type in ("avgmax", "catavgmax"):
            avg, mx = x.mean((2, 3, 4), keepdim=True), x.amax((2, 3, 4), keepdim=True)
            out = 0.5 * (avg + mx) if self.pool_type == "avgmax" else torch.cat([avg, mx], 1)
        else:
            out = x.mean((2, 3, 4), keepdim=True)
        return out.flatten(1) if self.flatten else out


def common_handlers() -> list[tuple[Callable[[nn.Module], bool], Handler]]:
    """Conversions shared by every CNN method: norms, pools, dropout, squeeze-excitation."""
    handlers: list[tuple[Callable[[nn.Module], bool], Handler]] = [
        (lambda m: _is_exact(m, nn.BatchNorm2d), _bn),
        (lambda m: _is_exact(m, nn.MaxPool2d), _max_pool),
        (lambda m: _is_exact(m, nn.AvgPool2d), _avg_pool),
        (lambda m: _is_exact(m, nn.AdaptiveAvgPool2d), lambda m: nn.AdaptiveAvgPool3d(_adaptive_size(m.output_size))),
        (lambda m: _is_exact(m, nn.AdaptiveMaxPool2d), lambda m: nn.AdaptiveMaxPool3d(_adaptive_size(m.output_size))),
        (lambda m: _is_exact(m, nn.Dropout2d), lambda m: nn.Dropout3d(m.p)),
    ]
    try:  # timm layers, when timm is importable
        from timm.layers import BatchNormAct2d, SelectAdaptivePool2d

        handlers.append((lambda m: type(m) is BatchNormAct2d, _bn_act))
        handlers.append((lambda m: isinstance(m, SelectAdaptivePool2d),
                         lambda m: GlobalPool3d(m.pool_type, _flattens(m))))
    except ImportError:  # pragma: no cover - timm is a core dependency
        pass
    handlers.append((_is_squeeze_excite, lambda m: SqueezeExcite3d(m)))
    return handlers


def _flattens(pool: nn.Module) -> bool:
    """Whether a timm ``SelectAdaptivePool2d`` flattens (in its ``flatten`` module or its fast pool)."""
    return not isinstance(pool.flatten, nn.Identity) or bool(getattr(pool.pool, "flatten", False) is True)


def _is_squeeze_excite(m: nn.Module) -> bool:
    name = type(m).__name__
    return name in ("SqueezeExcite", "SqueezeExcitation", "SEModule")


def convert_modules(net: nn.Module, handlers: list[tuple[Callable[[nn.Module], bool], Handler]]) -> nn.Module:
    """Replaces, depth-first and in place, every module matched by a handler with its 3D version.

    Children of a replaced module are converted too (e.g. the 1x1 convs inside a squeeze-excitation).

    Raises:
        NotImplementedError: a module whose class name says it is 2D (``*2d``) remains unconverted,
            e.g. timm's ``Conv2dSame`` or ``LayerNorm2d``; silently keeping it would give wrong 3D output.
    """

    def convert(module: nn.Module) -> nn.Module:
        # Post-order: children first, so a handler wrapping its module (SE) gets 3D children.
        for name, child in list(module.named_children()):
            setattr(module, name, convert(child))
        for predicate, handler in handlers:
            if predicate(module):
                return handler(module)
        return module

    net = convert(net)
    left = sorted({type(m).__name__ for m in net.modules() if type(m).__name__.lower().endswith("2d")})
    if left:
        raise NotImplementedError(
            f"cannot convert {', '.join(left)} to 3D; supported: Conv2d, BatchNorm2d, BatchNormAct2d, "
            f"Max/Avg/Adaptive pools, Dropout2d, squeeze-excitation"
        )
    return net


# -- feature trunks of CNN families -------------------------------------------------------------
class _ForwardFeatures(nn.Module):
    """Calls a timm model's ``forward_features`` (feature map, no head)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def cnn_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    """(module mapping images to a feature map, its channel count) for timm and torchvision CNNs.

    The head (global pooling, classifier) is left out: the 3D wrapper pools over three axes itself.
    """
    net = copy.deepcopy(net)
    if hasattr(net, "forward_features") and hasattr(net, "num_features"):  # timm
        return _ForwardFeatures(net), int(net.num_features)
    if hasattr(net, "features") and isinstance(net.features, nn.Module):  # torchvision mobilenet/efficientnet/vgg
        channels = [m.out_channels for m in net.features.modules() if isinstance(m, nn.Conv2d)]
        return net.features, channels[-1]
    if all(hasattr(net, n) for n in ("conv1", "bn1", "layer4")):  # torchvision resnet family
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        return body, int(net.fc.in_features) if hasattr(net.fc, "in_features") else _out_channels(body)
    raise TypeError(f"{type(net).__name__}: unknown CNN layout (need timm forward_features, "
                    "torchvision .features, or a resnet)")


def _out_channels(body: nn.Module) -> int:
    return [m.out_channels for m in body.modules() if isinstance(m, nn.Conv2d)][-1]


def build_from_encoder(
    method: str,
    encoder: nn.Module,
    trunk: nn.Module,
    embed_dim: int,
    *,
    depth_axis: int,
    input_size: tuple[int, int, int] | None,
    pooling: str,
    options: dict[str, Any],
) -> Adapted3DEncoder:
    """Wraps a converted trunk with the 2D encoder's normalisation and provenance."""
    base = _encoder_info(encoder)
    key = f"{method}/{base.get('key', type(encoder).__name__)}"
    info = Adapted3DInfo(key=key, method=method, base=base, embed_dim=embed_dim, depth_axis=depth_axis,
                         input_size=tuple(input_size) if input_size else None, options=dict(options))
    mean = tuple(base.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(base.get("std") or (0.229, 0.224, 0.225))
    model = Adapted3DEncoder(trunk, info, mean, std, in_chans=int(base.get("in_chans", 3)), pooling=pooling,
                             gem_p=float(getattr(encoder, "gem_p", 3.0)))
    return model.eval()


def build_adapted(key: str, weights: str | None = "random", encoder_kwargs: dict | None = None,
                  **options: Any) -> Adapted3DEncoder:
    """Builds ``<method>/<2d key>``, e.g. ``inflate/timm/resnet18``, from ``build_encoder(2d key, weights)``.

    Args:
        key: adaptation method and 2D encoder key joined by ``/``.
        weights: 2D weights (``random``, ``hub[:tag]`` or a local file, e.g. a fine-tuned checkpoint).
        encoder_kwargs: options of the 2D encoder (``img_size``, ...).
        **options: method options (see :func:`slice2vol.adapt.inflate.inflate_encoder` etc.).
    """
    import slice2vol.adapt  # noqa: F401 - fills ADAPTERS
    from slice2vol.encoders import build_encoder

    method, _, base_key = key.partition("/")
    if not base_key:
        raise KeyError(f"adapted key {key!r} must look like '<method>/<2d key>', methods: {', '.join(ADAPTERS)}")
    builder = ADAPTERS.get(method)
    encoder = build_encoder(base_key, weights=weights, **(encoder_kwargs or {}))
    return builder(encoder, **options)


def embed_adapted(key: str, cohort: Any, store_path: str, *, weights: str | None = "random",
                  encoder_kwargs: dict | None = None, options: dict | None = None, name: str | None = None,
                  input_size: tuple[int, int, int] = (96, 96, 96), **embed_kwargs: Any):
    """Builds ``key`` (e.g. ``inflate/tv/mobilenet_v2``) and writes its volume embeddings to a store.

    A thin wrapper of :func:`slice2vol.ssl.export.embed_cohort` (``mode='whole'``: the cropped head
    fitted into ``input_size``) that records the adaptation's provenance.

    Returns:
        The exporter's report (subjects done, failures).
    """
    from slice2vol.ssl.export import embed_cohort

    model = build_adapted(key, weights=weights, encoder_kwargs=encoder_kwargs, **(options or {}))
    provenance = {"adaptation": model.info.to_dict()}
    return embed_cohort(model, cohort, store_path, name or key, input_size=input_size, provenance=provenance,
                        **embed_kwargs)
