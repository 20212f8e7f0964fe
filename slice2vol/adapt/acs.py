"""ACS convolutions: 2D kernels split over the axial, coronal and sagittal planes (Yang et al., 2021,
"Reinventing 2D convolutions for 3D images", IEEE JBHI).

An ACS convolution keeps the 2D kernel (O, I, kh, kw) as its only weight — same parameter count, same
state-dict keys, so 2D checkpoints load unchanged — and splits the O output channels into three
contiguous groups applied as 3D kernels (depth last, volume axes (a, b, depth)):

* group 0 ``axial``: (kh, kw, 1) — the 2D kernel in the (a, b) plane;
* group 1 ``coronal``: (kh, 1, kw) — in the (a, depth) plane;
* group 2 ``sagittal``: (1, kh, kw) — in the (b, depth) plane.

Group sizes follow the official ACSConv code: O // 3 each, the remainder going to the first groups
(O = 64 -> 22, 21, 21). The plane names hold for the default depth axis Z of RAS volumes.
A collapsed kernel axis behaves like the centre tap of a full k x k x k kernel (same output size and
alignment as a 3D convolution with the same stride, padding and dilation).
"""

from __future__ import annotations

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
    network_of,
)


def acs_split(out_channels: int) -> tuple[int, int, int]:
    """Output channels per (axial, coronal, sagittal) group; the remainder goes to the first groups."""
    base, rest = divmod(out_channels, 3)
    return (base + (rest > 0), base + (rest > 1), base)


class ACSConv3d(nn.Module):
    """ACS convolution holding a 2D kernel, for depth-last volumes (B, C, a, b, depth).

    Args:
        conv: the 2D convolution whose weight, bias and hyper-parameters are taken over (shared,
            not copied: converting a network moves its parameters).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"ACS: Conv2d with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride[0], conv.padding[0], conv.dilation[0]
        if len({*conv.stride}) > 1 or len({*conv.padding}) > 1 or len({*conv.dilation}) > 1:
            raise NotImplementedError("ACS needs isotropic stride, padding and dilation")
        self.weight = conv.weight
        self.bias = conv.bias
        self.split = acs_split(self.out_channels)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, split={self.split}")

    def kernels_3d(self) -> list[torch.Tensor]:
        """The three 3D kernels (axial (o,i,kh,kw,1), coronal (o,i,kh,1,kw), sagittal (o,i,1,kh,kw))."""
        a, c, _ = self.split
        w = self.weight
        return [w[:a].unsqueeze(4), w[a:a + c].unsqueeze(3), w[a + c:].unsqueeze(2)]

    def dense_kernel(self) -> torch.Tensor:
        """The equivalent full (O, I, k, k, k) kernel, zeros off each group's plane (reference, slow)."""
        kh, kw = self.kernel_size
        if kh != kw:
            raise NotImplementedError("dense_kernel needs a square kernel")
        k = kh
        dense = self.weight.new_zeros(self.out_channels, self.weight.shape[1], k, k, k)
        a, c, _ = self.split
        dense[:a, :, :, :, k // 2] = self.weight[:a]
        dense[a:a + c, :, :, k // 2, :] = self.weight[a:a + c]
        dense[a + c:, :, k // 2, :, :] = self.weight[a + c:]
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, I, a, b, d) -> (B, O, a', b', d'), the shape a Conv3d with these hyper-parameters gives."""
        depthwise = self.groups == self.in_channels == self.out_channels
        if self.groups != 1 and not depthwise or self.kernel_size[0] != self.kernel_size[1]:
            # General grouped convs: the dense kernel is exact, only slower.
            return F.conv3d(x, self.dense_kernel(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        k, s, p, d = self.kernel_size[0], self.stride, self.padding, self.dilation
        outs, start = [], 0
        for axis, (weight, n) in enumerate(zip(self.kernels_3d(), self.split, strict=True)):
            if n == 0:
                continue
            xi = x[:, start:start + n] if depthwise else x
            start += n
            collapsed = 4 - axis  # axial kernel is flat along depth (dim 4), coronal along b, sagittal along a
            padding = [p, p, p]
            centre = d * (k // 2)
            if p != centre or k % 2 == 0:
                # Emulate the centre tap of a k-wide kernel: pad by p, start d*(k//2) in, keep the
                # span a k-wide kernel would cover.
                pad = [0] * 6
                pad[2 * (4 - collapsed)] = pad[2 * (4 - collapsed) + 1] = p
                xi = F.pad(xi, pad)
                xi = xi.narrow(collapsed, centre, xi.shape[collapsed] - d * (k - 1))
            padding[collapsed - 2] = 0
            outs.append(F.conv3d(xi, weight, None, s, tuple(padding), d, n if depthwise else 1))
        out = torch.cat(outs, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)


def acs_network(net: nn.Module) -> nn.Module:
    """Converts, in place, every Conv2d of ``net`` to :class:`ACSConv3d` (and norms/pools to 3D)."""
    handlers = [(lambda m: _is_exact(m, nn.Conv2d), ACSConv3d)]
    return convert_modules(net, handlers + common_handlers())


@ADAPTERS.register("acs")
def acs_encoder(
    encoder: nn.Module,
    depth_axis: int = 2,
    input_size: tuple[int, int, int] | None = None,
) -> Adapted3DEncoder:
    """An ACS 3D encoder from a 2D CNN :class:`~slice2vol.encoders.Encoder` (the 2D one is untouched).

    Args:
        encoder: 2D encoder wrapping a timm or torchvision CNN.
        depth_axis: volume axis treated as depth (2 = Z, so group 0 is axial).
        input_size: (X, Y, Z) volumes are resized to inside ``forward``; None keeps their size.

    Returns:
        Adapted3DEncoder mapping (B, C, X, Y, Z) in [0, 1] to (B, D); its trunk has exactly the 2D
        trunk's parameters and state-dict keys.
    """
    trunk, channels = cnn_trunk(network_of(encoder))
    trunk = acs_network(trunk)
    pooling = getattr(encoder, "pooling", "avg")  # the 2D encoder's avg | max | gem, over 3 axes
    return build_from_encoder("acs", encoder, trunk, channels, depth_axis=depth_axis, input_size=input_size,
                              pooling=pooling, options={})
