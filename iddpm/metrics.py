"""Sample-quality metrics on feature vectors: Fréchet distance, improved precision / recall, KID.

Every function takes two sets of features, each a torch tensor or a numpy array of shape ``(N, D)`` (one row
per image; ``N`` may differ between the sets, ``D`` may not), and returns Python floats. The features come
from any network: :func:`iddpm.features.digit_features` gives the digit classifier's penultimate layer, whose
Fréchet distance is called **digit-FID** (:func:`iddpm.features.digit_fid`) and is *not* comparable with the
Inception FID of the literature.

* :func:`frechet_distance` (Heusel et al. 2017): fit a Gaussian to each set (mean, ``N - 1`` covariance, as
  the reference ``fid_score`` code does) and return
  ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``, in float64.
* :func:`precision_recall` (Kynkäänniemi et al. 2019, "Improved precision and recall"): each set's manifold is
  the union of balls around its points, each reaching the point's k-th nearest neighbour in the same set;
  precision is the share of fake points inside the real manifold, recall the share of real points inside the
  fake manifold. Mode dropping lowers recall; blurry or off-manifold samples lower precision.
* :func:`kernel_inception_distance` (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial
  kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over random subsets (mean and standard deviation).

All the work happens in torch, in batches, on the device of the first set when it is a tensor (CPU for numpy).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GaussianStats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "kernel_inception_distance",
    "knn_radii",
    "precision_recall",
]

Features = Tensor | np.ndarray


class GaussianStats(NamedTuple):
    """A Gaussian fitted to a feature set: ``mu`` ``(D,)`` and ``sigma`` ``(D, D)``, both float64."""

    mu: Tensor
    sigma: Tensor


def _features(x: Features, name: str, *, min_rows: int = 2, device: torch.device | None = None) -> Tensor:
    """Check one feature set and return it as a float64 ``(N, D)`` tensor."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch tensor or numpy array of shape (N, D), got {type(x).__name__}"
        )
    if x.ndim != 2:
        raise ValueError(
            f"{name} must have shape (N, D) (one feature row per image), got shape {tuple(x.shape)}"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (feature vectors), got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no feature columns (shape {tuple(x.shape)})")
    x = x.to(device=device, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _pair(a: Features, b: Features, names: tuple[str, str], min_rows: int = 2) -> tuple[Tensor, Tensor]:
    """Both sets as float64 tensors on one device (the first tensor's), with matching feature sizes."""
    device = a.device if isinstance(a, Tensor) else torch.device("cpu")
    x = _features(a, names[0], min_rows=min_rows, device=device)
    y = _features(b, names[1], min_rows=min_rows, device=device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same feature size D, got {x.shape[1]} and {y.shape[1]}"
        )
    return x, y


# --------------------------------------------------------------------------------------------------- FID


def gaussian_stats(feats: Features) -> GaussianStats:
    """Mean and unbiased (``N - 1``) covariance of a feature set, in float64.

    Args:
        feats: ``(N, D)`` features, ``N >= 2``.

    Returns:
        :class:`GaussianStats` ``(mu (D,), sigma (D, D))``, the same as ``np.mean(f, 0)`` and
        ``np.cov(f, rowvar=False)`` of the reference FID code.
    """
    x = _features(feats, "feats", device=feats.device if isinstance(feats, Tensor) else None)
    mu = x.mean(dim=0)  # (D,)
    centred = x - mu  # (N, D)
    sigma = centred.T @ centred / (x.shape[0] - 1)  # (D, D)
    return GaussianStats(mu, sigma)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues -> 0."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _stats_tensor(x: Features, name: str, ndim: int, device: torch.device) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def frechet_distance_from_stats(mu1: Features, sigma1: Features, mu2: Features, sigma2: Features) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    ``d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})``. The last trace equals
    the reference code's ``tr(sqrtm(S1 S2))`` (``S1 S2`` is similar to ``S1^{1/2} S2 S1^{1/2}``), but the
    symmetric form has real, non-negative eigenvalues, so it is computed with ``eigh`` and needs no
    ``sqrtm`` of a non-symmetric matrix, no epsilon on the diagonal, and stays finite for singular
    covariances (fewer samples than features). Rounding can leave a tiny negative total for equal inputs;
    it is clamped to 0.

    Args:
        mu1, mu2: ``(D,)`` means.
        sigma1, sigma2: ``(D, D)`` symmetric positive semi-definite covariances.

    Returns:
        The squared Fréchet distance (what "FID" reports), a float >= 0.
    """
    device = mu1.device if isinstance(mu1, Tensor) else torch.device("cpu")
    m1 = _stats_tensor(mu1, "mu1", 1, device)
    m2 = _stats_tensor(mu2, "mu2", 1, device)
    s1 = _stats_tensor(sigma1, "sigma1", 2, device)
    s2 = _stats_tensor(sigma2, "sigma2", 2, device)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            "shapes must be mu (D,) and sigma (D, D) with one D; got "
            f"{tuple(m1.shape)}, {tuple(s1.shape)}, {tuple(m2.shape)}, {tuple(s2.shape)}"
        )
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1  # (D, D), symmetric PSD up to rounding
    evals = torch.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = evals.clamp_min(0).sqrt().sum()
    fd = (m1 - m2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def frechet_distance(feats_a: Features, feats_b: Features) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    Args:
        feats_a: ``(N_a, D)`` features, e.g. of real images; ``N_a >= 2``.
        feats_b: ``(N_b, D)`` features, e.g. of generated images; ``N_b >= 2``.

    Returns:
        The squared Fréchet distance, a float >= 0; symmetric in its arguments. Finite even when ``N < D``
        (singular covariances), though such estimates are strongly biased upwards: compare values only at
        equal sample counts.
    """
    x, y = _pair(feats_a, feats_b, ("feats_a", "feats_b"))
    return frechet_distance_from_stats(*gaussian_stats(x), *gaussian_stats(y))


# --------------------------------------------------------------------------------------------------- P / R


def _check_batch(k: int, batch_size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def knn_radii(feats: Features, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, the point itself excluded.

    Args:
        feats: ``(N, D)`` features with ``N > k``.
        k: neighbourhood size (3 in Kynkäänniemi et al.).
        batch_size: rows per ``torch.cdist`` call; memory is ``batch_size x N`` distances.

    Returns:
        ``(N,)`` float64 radii. A duplicated point counts as a neighbour at distance 0.
    """
    _check_batch(k, batch_size)
    x = _features(feats, "feats", min_rows=k + 1, device=feats.device if isinstance(feats, Tensor) else None)
    radii = []
    for rows in x.split(batch_size):
        dist = torch.cdist(rows, x)  # (b, N); the point itself sits at distance 0
        # The (k+1)-th smallest distance, counting the point itself, is its k-th neighbour's.
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(queries: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
    """Share of ``queries`` ``(M, D)`` inside at least one ball ``||q - centres[j]|| <= radii[j]``."""
    inside = 0
    for rows in queries.split(batch_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for start in range(0, centres.shape[0], batch_size):
            dist = torch.cdist(rows, centres[start : start + batch_size])  # (b, b')
            hit |= (dist <= radii[start : start + batch_size]).any(dim=1)
        inside += int(hit.sum())
    return inside / queries.shape[0]


def precision_recall(
    real_feats: Features, fake_feats: Features, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features against real ones.

    Each set's manifold is the union of balls centred on its points with radius the distance to the point's
    k-th nearest neighbour in that set (:func:`knn_radii`). Then

    * precision = share of fake points inside the real manifold (are the samples realistic?),
    * recall = share of real points inside the fake manifold (is the data's variety covered?).

    Computed in ``batch_size x batch_size`` blocks of ``torch.cdist``, so 10k x 10k sets fit in memory.

    Args:
        real_feats: ``(N_r, D)`` features of real images, ``N_r > k``.
        fake_feats: ``(N_f, D)`` features of generated images, ``N_f > k``.
        k: neighbourhood size (the paper uses 3).
        batch_size: block size of the distance computations.

    Returns:
        ``(precision, recall)``, each in ``[0, 1]``; ``(1, 1)`` for identical sets.
    """
    _check_batch(k, batch_size)
    real, fake = _pair(real_feats, fake_feats, ("real_feats", "fake_feats"), min_rows=k + 1)
    real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    precision = _coverage(fake, real, real_radii, batch_size)
    recall = _coverage(real, fake, fake_radii, batch_size)
    return precision, recall


# --------------------------------------------------------------------------------------------------- KID


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``k(x, y) = (x.y / D + 1)^3`` for all pairs: ``(m, D), (n, D) -> (m, n)``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(
    feats_a: Features,
    feats_b: Features,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel distance (KID when the features are Inception's): unbiased MMD^2, cubic polynomial kernel.

    For each of ``subsets`` draws, ``m`` rows of each set are picked without replacement and
    ``MMD^2 = [sum_{i!=j} k(a_i, a_j) + sum_{i!=j} k(b_i, b_j)] / (m (m - 1)) - 2 mean_{i,j} k(a_i, b_j)``
    with ``k(x, y) = (x.y / D + 1)^3``, as in Bińkowski et al. (2018) and torch-fidelity. Unlike FID it is
    unbiased, so small sample counts do not inflate it (it can be slightly negative for equal distributions).

    Args:
        feats_a: ``(N_a, D)`` features.
        feats_b: ``(N_b, D)`` features.
        subsets: number of random subsets.
        subset_size: rows per subset; capped at ``min(N_a, N_b)`` (which must be >= 2).
        generator: CPU generator for the subset draws (None: torch's global one).

    Returns:
        ``(mean, std)`` of MMD^2 over the subsets (std 0 for a single subset).
    """
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be a positive int, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size must be an int >= 2, got {subset_size!r}")
    x, y = _pair(feats_a, feats_b, ("feats_a", "feats_b"))
    m = min(subset_size, x.shape[0], y.shape[0])
    values = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        a = x[torch.randperm(x.shape[0], generator=generator)[:m].to(x.device)]  # (m, D)
        b = y[torch.randperm(y.shape[0], generator=generator)[:m].to(y.device)]  # (m, D)
        kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)  # (m, m) each
        within = (kaa.sum() - kaa.diagonal().sum() + kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
        values[i] = within - 2 * kab.mean()
    std = float(values.std(unbiased=False)) if subsets > 1 else 0.0
    return float(values.mean()), std


def __getattr__(name: str):
    """``iddpm.metrics.digit_fid`` etc.: the digit-classifier metrics live in :mod:`iddpm.features`."""
    if name in _FROM_FEATURES:
        from . import features

        return getattr(features, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FROM_FEATURES = ("digit_features", "digit_fid", "digit_precision_recall")
