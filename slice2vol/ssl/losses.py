"""SSL losses as pure functions of tensors (no modules, no state), shared by the method files."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2B views.

    Each view's positive is the other view of the same sample; the 2B - 2 other views are negatives.

    Args:
        z1, z2: projections of the two views, shape (B, D) each; row i of both comes from sample i.
        temperature: softmax temperature tau.

    Returns:
        Scalar loss, the mean over all 2B anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (B, D) tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(z.device)
    return F.cross_entropy(sim, targets)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Voxel-wise reconstruction error, optionally weighted.

    Args:
        pred, target: images of the same shape (B, C, *spatial).
        kind: ``mse`` or ``l1``.
        weight: optional non-negative weights broadcastable to ``pred``; the loss is
            ``sum(w * err) / sum(w)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.float())
    err = err.pow(2) if kind == "mse" else err.abs() if kind == "l1" else None
    if err is None:
        raise ValueError(f"kind must be mse or l1, got {kind!r}")
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1e-8)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, C * p^d) patches, N in C order of the patch grid (as a conv patch embed).

    Every side must be divisible by ``patch_size``.
    """
    b, c, *sizes = images.shape
    if any(s % patch_size for s in sizes):
        raise ValueError(f"image sides {sizes} are not divisible by patch size {patch_size}")
    grid = [s // patch_size for s in sizes]
    shape = [b, c]
    for g in grid:
        shape += [g, patch_size]
    x = images.reshape(shape)
    d = len(sizes)
    grid_axes = [2 + 2 * i for i in range(d)]
    inner_axes = [3 + 2 * i for i in range(d)]
    x = x.permute(0, *grid_axes, 1, *inner_axes)  # (B, g1.., C, p1..)
    return x.reshape(b, int(torch.tensor(grid).prod()), c * patch_size ** d)


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               norm_pix: bool = True) -> torch.Tensor:
    """MAE loss: mean squared error on masked patches only.

    Args:
        pred: predicted patches (B, N, P).
        target: true patches (B, N, P), e.g. from :func:`patchify`.
        mask: (B, N), 1 where the patch was hidden from the encoder.
        norm_pix: normalise each target patch by its own mean/std (MAE's ``norm_pix_loss``).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of pretext-class logits (B, K) against integer labels (B,) (jigsaw, rotation)."""
    return F.cross_entropy(logits.float(), labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(1) == labels).float().mean())
