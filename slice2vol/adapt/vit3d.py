"""A timm Vision Transformer made 3D by inflating its patch embedding to cubic patches.

* Patch embedding: the ``Conv2d`` (D, C, p, p) becomes a ``Conv3d`` (D, C, p, p, p) with stride p,
  the 2D kernel repeated along depth and divided by p (``average``) or placed at the central depth
  tap (``center``). A p x p x p patch whose p slices are equal gives the 2D patch token.
* Position embeddings: the 2D table, resampled (bicubic, as timm does) to the in-plane grid
  (ga, gb), is broadcast along depth and summed with a depth embedding (gd, D) that starts at zero
  and is trainable (linearly resampled when the depth grid changes). At initialisation a volume of
  one patch depth made of a repeated slice therefore reproduces the 2D ViT exactly.
* Class/register tokens, blocks and the final norm are the 2D model's own modules, reused
  unchanged; pooling is the 2D encoder's (``cls``, ``mean`` of patch tokens, or ``cls_mean``).

Tokens are ordered with depth fastest: index = (ia * gb + ib) * gd + id.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.adapt.base import ADAPTERS, Adapted3DEncoder, build_from_encoder, network_of


class PatchEmbed3d(nn.Module):
    """Cubic patch embedding inflated from a timm ``PatchEmbed``.

    Args:
        patch_embed: timm ``PatchEmbed`` with a ``proj`` Conv2d (D, C, p, p) and a ``norm``.
        mode: ``average`` or ``center`` inflation of the kernel along depth.
    """

    def __init__(self, patch_embed: nn.Module, mode: Literal["average", "center"] = "average") -> None:
        super().__init__()
        conv = patch_embed.proj
        ph, pw = conv.kernel_size
        if ph != pw or tuple(conv.stride) != (ph, pw):
            raise NotImplementedError(f"vit3d needs square non-overlapping patches, got kernel {conv.kernel_size}")
        p = ph
        self.patch_size = p
        self.proj = nn.Conv3d(conv.in_channels, conv.out_channels, p, stride=p, bias=conv.bias is not None)
        with torch.no_grad():
            if mode == "average":
                self.proj.weight.copy_(conv.weight.unsqueeze(-1).expand(-1, -1, -1, -1, p) / p)
            elif mode == "center":
                self.proj.weight.zero_()
                self.proj.weight[..., p // 2] = conv.weight
            else:
                raise ValueError(f"vit3d mode must be 'average' or 'center', got {mode!r}")
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias)
        self.norm = patch_embed.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, A, B', Dp) with sizes multiples of p -> tokens (B, ga, gb, gd, D)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class ViT3DTrunk(nn.Module):
    """timm ``VisionTransformer`` on depth-last volumes -> pooled embedding (B, D).

    Args:
        vit: timm VisionTransformer (copied, the original is untouched).
        mode: patch kernel inflation, ``average`` or ``center``.
        depth_grid: initial number of depth positions of the depth embedding.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls_mean`` (both, concatenated).
    """

    def __init__(self, vit: nn.Module, mode: Literal["average", "center"] = "average", depth_grid: int = 14,
                 pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "cls_mean"):
            raise ValueError(f"vit3d pooling must be cls, mean or cls_mean, got {pooling!r}")
        self.pooling = pooling
        for attr in ("patch_embed", "blocks", "_pos_embed", "num_prefix_tokens"):
            if not hasattr(vit, attr):
                raise TypeError(f"{type(vit).__name__} is not a timm VisionTransformer (no {attr})")
        if getattr(vit, "rope", None) is not None:
            raise NotImplementedError("ViTs with rotary position embeddings are not supported")
        vit = copy.deepcopy(vit)
        self.grid_2d = tuple(vit.patch_embed.grid_size)
        vit.patch_embed = PatchEmbed3d(vit.patch_embed, mode)
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size
        dim = vit.embed_dim
        # Zero init keeps the 2D model's behaviour on depth-constant input; training can learn depth order.
        self.depth_pos_embed = nn.Parameter(torch.zeros(1, dim, depth_grid))

    def round_to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Resizes (B, C, A, B', Dp) trilinearly so every size is a multiple of the patch size."""
        p = self.patch_size
        size = tuple(max(p, int(round(n / p)) * p) for n in x.shape[2:])
        if size == tuple(x.shape[2:]):
            return x
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    def position_embedding(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix position embedding (1, P, D) or None, patch position embedding (1, ga*gb*gd, D) or None)."""
        vit = self.vit
        if vit.pos_embed is None:
            return None, None
        from timm.layers import resample_abs_pos_embed

        ga, gb, gd = grid
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = vit.pos_embed
        if (ga, gb) != self.grid_2d:
            pos = resample_abs_pos_embed(pos, new_size=(ga, gb), old_size=self.grid_2d, num_prefix_tokens=n_prefix)
        prefix, patches = pos[:, :n_prefix], pos[:, n_prefix:]
        depth = self.depth_pos_embed
        if depth.shape[-1] != gd:
            if gd > 1:
                depth = F.interpolate(depth, size=gd, mode="linear", align_corners=True)
            else:
                depth = depth.mean(-1, keepdim=True)
        depth = depth.transpose(1, 2)  # (1, gd, D)
        patches = patches.reshape(1, ga, gb, 1, -1) + depth.reshape(1, 1, 1, gd, -1)
        return (prefix if n_prefix else None), patches.reshape(1, ga * gb * gd, -1)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Preprocessed (B, C, A, B', Dp) -> (all tokens after the final norm (B, P + T, D), grid)."""
        vit = self.vit
        x = self.round_to_patches(x)
        x = vit.patch_embed(x)
        grid = tuple(x.shape[1:4])
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        prefix_pos, patch_pos = self.position_embedding(grid)
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        if patch_pos is not None and vit.no_embed_class:
            x = x + patch_pos
            x = torch.cat(prefix + [x], 1)
        else:
            x = torch.cat(prefix + [x], 1)
            if patch_pos is not None:
                x = x + (torch.cat([prefix_pos, patch_pos], 1) if prefix_pos is not None else patch_pos)
        x = vit.pos_drop(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x), grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, C, A, B', Dp) -> (B, D) pooled as the 2D encoder pools."""
        tokens, _ = self.tokens(x)
        patches = tokens[:, self.vit.num_prefix_tokens:]
        if self.pooling == "cls":
            return tokens[:, 0]
        if self.pooling == "mean":
            return patches.mean(1)
        return torch.cat([tokens[:, 0], patches.mean(1)], 1)


@ADAPTERS.register("vit3d")
def vit3d_encoder(
    encoder: nn.Module,
    mode: Literal["average", "center"] = "average",
    depth_axis: int = 2,
    input_size: tuple[int, int, int] | None = None,
    depth_grid: int | None = None,
) -> Adapted3DEncoder:
    """A 3D ViT from a 2D timm ViT :class:`~slice2vol.encoders.Encoder` (the 2D one is untouched).

    Args:
        encoder: 2D encoder wrapping a timm VisionTransformer.
        mode: ``average`` or ``center`` patch-kernel inflation.
        depth_axis: volume axis treated as depth (2 = Z).
        input_size: (X, Y, Z) volumes are resized to inside ``forward``; None rounds each size to a
            multiple of the patch size.
        depth_grid: length of the (zero-initialised) depth embedding; default the 2D grid height.

    Returns:
        Adapted3DEncoder mapping (B, C, X, Y, Z) in [0, 1] to (B, D).
    """
    vit = network_of(encoder)
    grid = getattr(getattr(vit, "patch_embed", None), "grid_size", (14, 14))
    trunk = ViT3DTrunk(vit, mode, depth_grid or int(grid[0]), pooling=getattr(encoder, "pooling", "cls"))
    if input_size is not None and any(n % trunk.patch_size for n in input_size):
        raise ValueError(f"input_size {tuple(input_size)} must be multiples of the patch size {trunk.patch_size}")
    dim = int(vit.num_features) * (2 if trunk.pooling == "cls_mean" else 1)
    return build_from_encoder("vit3d", encoder, trunk, dim, depth_axis=depth_axis,
                              input_size=input_size, pooling="none",
                              options={"mode": mode, "depth_grid": trunk.depth_pos_embed.shape[-1],
                                       "patch_size": trunk.patch_size})
