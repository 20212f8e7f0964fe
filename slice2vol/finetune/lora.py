"""Low-rank adapters (LoRA, Hu et al. 2022) on ``nn.Linear`` layers, with merging back into the weights.

``LoRALinear`` wraps a frozen linear layer W (out, in) and adds ``(alpha / r) * B A x`` with A (r, in)
initialised like a linear layer (Kaiming uniform) and B (out, r) at zero, so the wrapped model starts
exactly as the original. After training, :func:`merge_lora` folds ``W + (alpha / r) B A`` back in and
restores plain ``nn.Linear`` modules: the merged model has the original architecture and parameter
names, so its state dict is an ordinary checkpoint of the model family.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn as nn

#: Attention projections of timm ViTs (``blocks.N.attn.qkv`` and ``blocks.N.attn.proj``).
DEFAULT_TARGETS = (r"attn\.qkv$", r"attn\.proj$")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the linear layer to adapt (its parameters are set to ``requires_grad=False``).
        rank: r, the rank of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input (0 disables it).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update (out, in) = scaling * B @ A."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight (a new module)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def inject_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0) -> list[str]:
    """Replaces, in place, every ``nn.Linear`` whose qualified name matches a ``targets`` regex.

    Args:
        model: the network (e.g. a timm ViT).
        targets: regular expressions searched in module names (``re.search``).
        rank, alpha, dropout: see :class:`LoRALinear`.

    Returns:
        The names of the adapted layers.

    Raises:
        ValueError: no linear layer matches (e.g. LoRA asked for a CNN).
    """
    patterns = [re.compile(t) for t in targets]
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(p.search(n) for p in patterns)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"LoRA: no nn.Linear layer matches {list(targets)}; linear layers here include {linears}")
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Folds every :class:`LoRALinear` of ``model`` back into a plain ``nn.Linear``, in place."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged())
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRA layer)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
