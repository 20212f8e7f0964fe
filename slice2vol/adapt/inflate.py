"""I3D-style inflation of 2D CNNs (timm, torchvision) into 3D CNNs (Carreira & Zisserman, 2017).

Each ``Conv2d`` kernel (O, I, kh, kw) becomes a ``Conv3d`` kernel (O, I, kh, kw, kd) with kd = kh for
square kernels:

* ``average``: the 2D kernel repeated kd times along depth and divided by kd;
* ``center``: the 2D kernel at the central depth tap, zeros elsewhere.

Either way a volume made of one slice repeated along depth gives, at every depth, the 2D network's
output on that slice (the *I3D property*) — exactly, because depth padding replicates the edge
slices (``depth_padding='replicate'``) instead of adding zeros that a depth-averaged kernel would
see. In-plane padding stays zeros, as in 2D. Batch norms keep their statistics; pools are inflated
isotropically (a max or average over repeated values is unchanged).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.adapt.base import (
    ADAPTERS,
    Adapted3DEncoder,
    _is_exact,
    build_from_encoder,
    cnn_trunk,
    common_handlers,
    convert_modules,
    depth_of,
    network_of,
)

InflateMode = Literal["average", "center"]


class InflatedConv3d(nn.Conv3d):
    """``Conv3d`` (depth last) whose depth padding can replicate edge slices.

    Args:
        depth_padding: ``replicate`` (exact I3D property for ``average`` kernels) or ``zeros``.
        Other arguments as :class:`torch.nn.Conv3d`; ``padding`` is (ph, pw, pd).
    """

    def __init__(self, *args, depth_padding: str = "replicate", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if depth_padding not in ("replicate", "zeros"):
            raise ValueError(f"depth_padding must be 'replicate' or 'zeros', got {depth_padding!r}")
        self.depth_padding = depth_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw, pd = self.padding
        if self.depth_padding == "zeros" or pd == 0:
            return super().forward(x)
        x = F.pad(x, (pd, pd, 0, 0, 0, 0), mode="replicate")
        return F.conv3d(x, self.weight, self.bias, self.stride, (ph, pw, 0), self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", depth_padding={self.depth_padding}"


def inflate_conv(conv: nn.Conv2d, mode: InflateMode = "average", depth_padding: str = "replicate") -> InflatedConv3d:
    """Conv2d (O, I, kh, kw) -> InflatedConv3d (O, I, kh, kw, kd) acting on depth-last volumes.

    Depth hyper-parameters copy the in-plane ones for square kernels (kd = kh, same stride, padding,
    dilation); a non-square kernel gets kd = 1 (stride still copied when square).
    """
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported")
    if isinstance(conv.padding, str):
        raise NotImplementedError(f"Conv2d with padding={conv.padding!r} is not supported; use numeric padding")
    kd = depth_of(conv.kernel_size)
    conv3d = InflatedConv3d(
        conv.in_channels, conv.out_channels,
        kernel_size=(*conv.kernel_size, kd),
        stride=(*conv.stride, depth_of(conv.stride)),
        padding=(*conv.padding, depth_of(conv.padding) if kd > 1 else 0),
        dilation=(*conv.dilation, depth_of(conv.dilation) if kd > 1 else 1),
        groups=conv.groups, bias=conv.bias is not None, depth_padding=depth_padding,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        weight = conv.weight.unsqueeze(-1)
        if mode == "average":
            conv3d.weight.copy_(weight.expand(*weight.shape[:-1], kd) / kd)
        elif mode == "center":
            conv3d.weight.zero_()
            conv3d.weight[..., kd // 2] = conv.weight
        else:
            raise ValueError(f"inflation mode must be 'average' or 'center', got {mode!r}")
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    conv3d.train(conv.training)
    return conv3d


def inflate_network(net: nn.Module, mode: InflateMode = "average", depth_padding: str = "replicate") -> nn.Module:
    """Converts, in place, every 2D layer of ``net`` to its inflated 3D version and returns ``net``."""
    handlers = [(lambda m: _is_exact(m, nn.Conv2d), lambda m: inflate_conv(m, mode, depth_padding))]
    return convert_modules(net, handlers + common_handlers())


@ADAPTERS.register("inflate")
def inflate_encoder(
    encoder: nn.Module,
    mode: InflateMode = "average",
    depth_padding: str = "replicate",
    depth_axis: int = 2,
    input_size: tuple[int, int, int] | None = None,
) -> Adapted3DEncoder:
    """An inflated 3D encoder from a 2D CNN :class:`~slice2vol.encoders.Encoder` (the 2D one is untouched).

    Args:
        encoder: 2D encoder wrapping a timm or torchvision CNN.
        mode: ``average`` or ``center`` kernel inflation.
        depth_padding: ``replicate`` or ``zeros`` padding along depth.
        depth_axis: volume axis treated as depth (2 = Z: kernels act in axial planes).
        input_size: (X, Y, Z) volumes are resized to inside ``forward``; None keeps their size.

    Returns:
        Adapted3DEncoder mapping (B, C, X, Y, Z) in [0, 1] to (B, D), D the CNN's feature channels.
    """
    trunk, channels = cnn_trunk(network_of(encoder))
    trunk = inflate_network(trunk, mode, depth_padding)
    pooling = getattr(encoder, "pooling", "avg")  # the 2D encoder's avg | max | gem, over 3 axes
    return build_from_encoder("inflate", encoder, trunk, channels, depth_axis=depth_axis, input_size=input_size,
                              pooling=pooling, options={"mode": mode, "depth_padding": depth_padding})
