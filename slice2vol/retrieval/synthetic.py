"""Seeded embedding-like vectors for tests and benchmarks of approximate indexes.

Isotropic Gaussian noise is the wrong test set: in 384 dimensions all its points are nearly
equidistant and no approximate index reaches useful recall (HNSW recall@20 of 0.13-0.37 at 100k was
measured on such data during development). Real volume embeddings instead share a large common direction, vary in a
low-dimensional subspace with a decaying spectrum, and form clusters (site, age, sex, scanner).
:func:`clustered_embeddings` draws from such a model; :class:`FittedMixture` fits the same kind of
model (PCA + Gaussian mixture + isotropic residual) to real cached embeddings and samples from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def clustered_embeddings(n: int, dim: int, *, n_clusters: int = 64, rank: int = 32, common: float = 2.0,
                         spread: float = 0.6, noise: float = 0.05, seed: int = 0,
                         chunk: int = 200_000) -> np.ndarray:
    """Draws (n, dim) float32 unit vectors from a clustered low-rank mixture.

    Model: ``x = common * m + B (c_k + spread * e) + noise * g`` then L2-normalised, with ``m`` a
    shared unit direction, ``B`` a random (dim, rank) orthonormal basis, cluster centres ``c_k``
    and within-cluster ``e`` drawn with a 1/i variance spectrum over the rank, unequal cluster
    weights (Dirichlet), and ``g`` isotropic.

    Args:
        n: number of vectors.
        dim: embedding dimension.
        n_clusters: mixture components.
        rank: dimension of the subspace the vectors vary in.
        common: weight of the shared direction (cosine between random pairs ~0.5-0.9).
        spread: within-cluster scale relative to the between-cluster scale.
        noise: isotropic noise per coordinate (times sqrt(rank / dim) so it stays a small fraction).
        seed: random seed; the same seed gives the same model and points.
        chunk: rows generated at a time (memory).
    """
    rng = np.random.default_rng(seed)
    rank = min(rank, dim)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank + 1)))
    shared, basis = basis[:, 0], basis[:, 1:]
    scale = 1.0 / np.sqrt(np.arange(1, rank + 1))  # decaying spectrum
    centres = rng.normal(size=(n_clusters, rank)) * scale
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    out = np.empty((n, dim), dtype=np.float32)
    iso = noise * np.sqrt(rank / dim)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        comp = rng.choice(n_clusters, size=m, p=weights)
        z = centres[comp] + spread * rng.normal(size=(m, rank)) * scale
        x = common * shared + z @ basis.T + iso * rng.normal(size=(m, dim))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


@dataclass
class FittedMixture:
    """PCA + Gaussian mixture + isotropic residual fitted to real embeddings, for sampling.

    Attributes:
        mean: (D,) mean of the (normalised) embeddings.
        components: (r, D) PCA axes.
        gmm: the sklearn GaussianMixture fitted in PCA space.
        residual_std: per-coordinate std of what PCA leaves out.
    """

    mean: np.ndarray
    components: np.ndarray
    gmm: object
    residual_std: float

    @classmethod
    def fit(cls, x: np.ndarray, *, rank: int = 32, n_components: int = 8, seed: int = 0) -> "FittedMixture":
        """Fits the model to (N, D) embeddings (rank and components are capped by N)."""
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        n = len(x)
        rank = max(1, min(rank, n - 1, x.shape[1]))
        pca = PCA(n_components=rank, random_state=seed).fit(x)
        z = pca.transform(x)
        k = max(1, min(n_components, n // max(4, rank // 4)))
        gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-6, random_state=seed).fit(z)
        resid = x - pca.inverse_transform(z)
        return cls(pca.mean_, pca.components_, gmm, float(resid.std()))

    def sample(self, n: int, seed: int = 0, chunk: int = 200_000) -> np.ndarray:
        """(n, D) float32 unit vectors drawn from the fitted model."""
        rng = np.random.default_rng(seed)
        gmm = self.gmm
        out = np.empty((n, self.mean.shape[0]), dtype=np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            comp = rng.choice(len(gmm.weights_), size=m, p=gmm.weights_)
            z = gmm.means_[comp] + rng.normal(size=(m, gmm.means_.shape[1])) * np.sqrt(gmm.covariances_[comp])
            x = self.mean + z @ self.components + self.residual_std * rng.normal(size=(m, self.mean.shape[0]))
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out
