"""MRI augmentations for contrastive views, built from MONAI array transforms (2D or 3D).

A view is a random resized crop, flips, a small affine, an MR bias field, gamma/contrast and
intensity scaling/shift, blur and Gaussian noise. Transforms run per sample; each sample's MONAI
random state is seeded from the torch generator, so a run is reproducible from torch's RNG state
alone (which the trainer checkpoints), whatever MONAI does internally.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class MRIAugment:
    """Random views of a batch of crops or slices.

    Args:
        spatial_dims: 2 or 3.
        size: output spatial size of a view.
        crop_scale: (min, max) side fraction of the random crop before resizing back to ``size``.
        flip_prob: per-axis flip probability.
        affine_prob, rotate_deg, scale: small random affine (rotation up to ``rotate_deg`` per axis,
            isotropic-ish scaling by 1 +- ``scale``).
        bias_prob, bias_coeff: smooth multiplicative MR bias field (polynomial, degree 3).
        gamma_prob, gamma: intensity gamma (contrast) range.
        intensity_prob, intensity_scale, intensity_shift: ``x * (1 + s) + o`` with s, o uniform.
        smooth_prob, smooth_sigma: Gaussian blur, sigma in voxels.
        noise_prob, noise_std: additive Gaussian noise (std drawn up to ``noise_std``).
    """

    def __init__(self, spatial_dims: int, size: Sequence[int], crop_scale: Sequence[float] = (0.6, 1.0),
                 flip_prob: float = 0.5, affine_prob: float = 0.5, rotate_deg: float = 10.0, scale: float = 0.1,
                 bias_prob: float = 0.5, bias_coeff: float = 0.3, gamma_prob: float = 0.5,
                 gamma: Sequence[float] = (0.7, 1.5), intensity_prob: float = 0.8, intensity_scale: float = 0.2,
                 intensity_shift: float = 0.1, smooth_prob: float = 0.2, smooth_sigma: Sequence[float] = (0.5, 1.0),
                 noise_prob: float = 0.5, noise_std: float = 0.05) -> None:
        import monai.transforms as T

        self.spatial_dims, self.size = spatial_dims, tuple(size)
        rad = math.radians(rotate_deg)
        sigma = tuple(smooth_sigma)
        transforms = [
            T.RandScaleCrop(roi_scale=crop_scale[0], max_roi_scale=crop_scale[1], random_size=True),
            T.Resize(self.size, mode="trilinear" if spatial_dims == 3 else "bilinear"),
            *[T.RandFlip(prob=flip_prob, spatial_axis=a) for a in range(spatial_dims)],
            T.RandAffine(prob=affine_prob, rotate_range=(rad,) * (3 if spatial_dims == 3 else 1),
                         scale_range=(scale,) * spatial_dims, padding_mode="zeros", mode="bilinear"),
            T.RandBiasField(degree=3, coeff_range=(0.0, bias_coeff), prob=bias_prob),
            T.RandAdjustContrast(prob=gamma_prob, gamma=tuple(gamma)),
            T.RandScaleIntensity(factors=intensity_scale, prob=intensity_prob),
            T.RandShiftIntensity(offsets=intensity_shift, prob=intensity_prob),
            T.RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=smooth_prob),
            T.RandGaussianNoise(prob=noise_prob, std=noise_std),
        ]
        self.transform = T.Compose(transforms)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> one random view per sample, (B, C, *size), float32 on the input's device."""
        seeds = torch.randint(0, 2 ** 31 - 1, (batch.shape[0],)).tolist()
        views = []
        for sample, seed in zip(batch, seeds):
            self.transform.set_random_state(seed=seed)
            out = self.transform(sample)
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            views.append(out.to(device=batch.device, dtype=torch.float32))
        return torch.stack(views)
