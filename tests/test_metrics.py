"""Sample-quality metrics against closed forms and constructed cases (FD, precision / recall, KID)."""

import math

import numpy as np
import pytest
import torch

from iddpm.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_cov(d: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned, non-diagonal SPD matrix: A A^T / d + 0.5 I."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)


def _closed_form_fd(mu1, s1, mu2, s2) -> float:
    """The textbook formula with an independent matrix square root (scipy's Schur-based ``sqrtm``)."""
    linalg = pytest.importorskip("scipy.linalg")
    r1 = np.real(linalg.sqrtm(s1.numpy()))
    covmean = np.real(linalg.sqrtm(r1 @ s2.numpy() @ r1))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean))


# --------------------------------------------------------------------------------------------------- FD


def test_gaussian_stats_match_numpy_mean_and_unbiased_cov(gen):
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64) * 3 + 1
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-12)  # N - 1
    assert mu.dtype == sigma.dtype == torch.float64


def test_fd_from_stats_exact_for_commuting_covariances():
    # Diagonal covariances commute, so (S1^1/2 S2 S1^1/2)^1/2 = diag(sqrt(a b)) and the trace term is
    # sum(a + b - 2 sqrt(a b)) = sum((sqrt a - sqrt b)^2): here (1-2)^2 + (3-1)^2 + 0 = 5, plus ||dmu||^2 = 9.
    a = torch.tensor([1.0, 9.0, 4.0], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 4.0], dtype=torch.float64)
    mu1 = torch.zeros(3, dtype=torch.float64)
    mu2 = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    fd = frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd == pytest.approx(14.0, abs=1e-12)


def test_fd_from_stats_matches_closed_form_for_general_covariances(gen):
    s1, s2 = _random_cov(5, gen), _random_cov(5, gen)
    mu1, mu2 = torch.randn(5, generator=gen, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    expected = _closed_form_fd(mu1, s1, mu2, s2)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # numpy stats work too
    assert frechet_distance_from_stats(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(
        expected, rel=1e-10
    )


def test_fd_of_large_gaussian_samples_approaches_the_closed_form(gen):
    d, n = 4, 40_000
    s1, s2 = _random_cov(d, gen), _random_cov(d, gen)
    mu1 = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    mu2 = torch.zeros(d, dtype=torch.float64)
    x = mu1 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    expected = _closed_form_fd(mu1, s1, mu2, s2)
    # Sampling error of the fitted means and covariances is O(1/sqrt(n)) ~ 0.5% of entries of order 1.
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric(gen):
    x = torch.randn(300, 16, generator=gen)
    y = torch.randn(200, 16, generator=gen) * 1.5 + 0.3
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 1.0


def test_fd_is_finite_when_there_are_fewer_samples_than_features(gen):
    x = torch.randn(5, 64, generator=gen)  # rank-4 covariances
    y = torch.randn(7, 64, generator=gen) + 1.0
    fd = frechet_distance(x, y)
    assert math.isfinite(fd) and fd > 0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_fd_accepts_numpy_and_mixed_inputs(gen):
    x = torch.randn(100, 8, generator=gen)
    y = torch.randn(120, 8, generator=gen) + 0.5
    ref = frechet_distance(x, y)
    assert frechet_distance(x.numpy(), y.numpy()) == pytest.approx(ref, rel=1e-12)
    assert frechet_distance(x.numpy().astype(np.float32), y) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "error", "match"),
    [
        (torch.zeros(10), torch.zeros(10, 3), ValueError, r"shape \(N, D\)"),
        (torch.zeros(10, 3, 1), torch.zeros(10, 3), ValueError, r"shape \(N, D\)"),
        (torch.zeros(1, 3), torch.zeros(10, 3), ValueError, "at least 2 rows"),
        (torch.zeros(10, 3), torch.zeros(10, 4), ValueError, "same feature size D, got 3 and 4"),
        (torch.full((10, 3), float("nan")), torch.zeros(10, 3), ValueError, "NaN"),
        ([[0.0, 1.0], [1.0, 0.0]], torch.zeros(10, 2), TypeError, "torch tensor or numpy array"),
    ],
)
def test_fd_bad_inputs_give_clear_errors(a, b, error, match):
    with pytest.raises(error, match=match):
        frechet_distance(a, b)


def test_fd_from_stats_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# --------------------------------------------------------------------------------------------------- P / R


def _mixture(n: int, centres: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``n`` points spread evenly over unit-variance Gaussian clusters at ``centres`` ``(K, D)``."""
    idx = torch.arange(n) % centres.shape[0]
    return centres[idx] + torch.randn(n, centres.shape[1], generator=gen)


@pytest.fixture
def centres() -> torch.Tensor:
    # 4 clusters 20*sqrt(2) apart in 8 dims, far beyond any 3-NN radius (~2-3 in a unit-variance cluster).
    return 20.0 * torch.eye(8)[:4]


def test_knn_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    # neighbours of 0: 1, 3, 6 -> 1st = 1, 2nd = 3; of 6: 3, 1, 0 -> 1st = 3, 2nd = 5
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]
    assert knn_radii(x, k=2, batch_size=1).tolist() == [3.0, 2.0, 3.0, 5.0]


def test_identical_sets_give_precision_and_recall_one(gen, centres):
    x = _mixture(400, centres, gen)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_far_apart_sets_give_precision_and_recall_zero(gen, centres):
    x = _mixture(400, centres, gen)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_same_distribution_scores_high(gen, centres):
    p, r = precision_recall(_mixture(1000, centres, gen), _mixture(1000, centres, gen))
    assert p > 0.8 and r > 0.8


def test_mode_dropping_lowers_recall_but_keeps_precision(gen, centres):
    real = _mixture(1000, centres, gen)
    fake = _mixture(1000, centres[:1], gen)  # every sample from the first of 4 clusters
    p, r = precision_recall(real, fake)
    assert p > 0.8  # the samples are realistic
    assert r < 0.35  # ~1/4 of the real points are covered (those of the one mode kept)


def test_spread_samples_lower_precision(gen, centres):
    real = _mixture(1000, centres, gen)
    fake = _mixture(1000, centres, gen) + 3.0 * torch.randn(1000, 8, generator=gen)  # "blurred" off-manifold
    p_good, _ = precision_recall(real, _mixture(1000, centres, gen))
    p, _ = precision_recall(real, fake)
    assert p < 0.3 < p_good


def test_precision_recall_is_batch_size_independent_and_takes_numpy(gen, centres):
    real, fake = _mixture(300, centres, gen), _mixture(200, centres[:2], gen) * 1.1
    ref = precision_recall(real, fake)
    assert precision_recall(real, fake, batch_size=7) == ref
    assert precision_recall(real.numpy(), fake.numpy()) == ref


def test_precision_recall_swaps_with_its_arguments(gen, centres):
    real, fake = _mixture(300, centres, gen), _mixture(200, centres[:2], gen)
    p, r = precision_recall(real, fake)
    assert precision_recall(fake, real) == (r, p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be a positive int"),
        ({"k": 10}, "at least 11 rows"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_precision_recall_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        precision_recall(torch.randn(10, 2), torch.randn(10, 2), **kwargs)


def test_precision_recall_rejects_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="real_feats and fake_feats must have the same feature size"):
        precision_recall(torch.randn(10, 2), torch.randn(10, 3))


# --------------------------------------------------------------------------------------------------- KID


def test_kid_matches_a_naive_unbiased_mmd():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 3, generator=gen, dtype=torch.float64) + 0.5

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m = 12
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    # One subset of all 12 rows: the permutation does not change the sums.
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two(gen):
    a, b = torch.randn(600, 16, generator=gen), torch.randn(600, 16, generator=gen)
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=200, generator=gen)
    diff, diff_std = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200, generator=gen)
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 10 * (same_std + diff_std)


def test_kid_is_reproducible_with_a_generator(gen):
    a, b = torch.randn(100, 4, generator=gen), torch.randn(100, 4, generator=gen) + 0.2
    runs = [
        kernel_inception_distance(a, b, subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_kid_bad_arguments():
    with pytest.raises(ValueError, match="subset_size must be an int >= 2"):
        kernel_inception_distance(torch.randn(10, 2), torch.randn(10, 2), subset_size=1)
    with pytest.raises(ValueError, match="subsets must be a positive int"):
        kernel_inception_distance(torch.randn(10, 2), torch.randn(10, 2), subsets=0)
