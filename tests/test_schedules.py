"""Tests for iddpm.schedules: the schedules' closed forms, the derived quantities, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from iddpm.schedules import (
    Schedule,
    betas_from_alpha_bar,
    cosine_alpha_bar,
    cosine_betas,
    extract,
    get_betas,
    linear_betas,
)

COSINE_T = [10, 16, 20, 50, 1000, 4000]  # every T the spec checked: only the last beta is clipped


def _f(u: float, s: float = 0.008) -> float:
    """The paper's f (Eq. 17) in plain python floats, as an independent reference."""
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


# ---------------------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,first,last", [(1000, 1e-4, 0.02), (4000, 2.5e-5, 5e-3), (50, 2e-3, 0.4)])
def test_linear_endpoints_scale_with_1000_over_T(T: int, first: float, last: float) -> None:
    b = linear_betas(T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert float(b[0]) == pytest.approx(first, rel=1e-12)
    assert float(b[-1]) == pytest.approx(last, rel=1e-12)
    torch.testing.assert_close(b.diff(), torch.full((T - 1,), (last - first) / (T - 1), dtype=torch.float64))


def test_linear_sum_is_arithmetic_series() -> None:
    # sum of an arithmetic sequence = T (first + last) / 2 = 1000 * (1e-4 + 0.02) / 2 = 10.05 (spec Sec. 1)
    assert float(linear_betas(1000).sum()) == pytest.approx(10.05, rel=1e-12)


@pytest.mark.parametrize("T", [1, 10, 20])
def test_linear_needs_more_than_20_steps(T: int) -> None:
    with pytest.raises(ValueError, match="num_steps > 20"):
        linear_betas(T)
    assert linear_betas(21)[-1] < 1


# ---------------------------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", COSINE_T)
def test_cosine_alpha_bar_follows_f_until_the_clip(T: int) -> None:
    b = cosine_betas(T)
    # only the last beta reaches the 0.999 clip
    assert float(b[-1]) == 0.999
    assert (b[:-1] < 0.999).all()
    # before the clip, the consecutive ratios telescope: alpha_bar[i] = f((i+1)/T) / f(0) (paper Eq. 17)
    abar = torch.cumprod(1 - b, 0)
    want = torch.tensor([_f((i + 1) / T) / _f(0) for i in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(abar[:-1], want, rtol=1e-9, atol=1e-15)


def test_cosine_worked_values_from_the_spec() -> None:
    b1000, b4000 = cosine_betas(1000), cosine_betas(4000)
    # spec Sec. 1 (values printed by the authors' code): sums and the first / second-to-last betas
    assert float(b1000.sum()) == pytest.approx(12.4415, abs=5e-5)
    assert float(b4000.sum()) == pytest.approx(15.2104, abs=5e-5)
    assert float(b1000[0]) == pytest.approx(4.1284e-05, rel=1e-4)
    assert float(b1000[-2]) == pytest.approx(0.74999939, abs=1e-8)
    # beta_0 = 1 - f(1/T) / f(0) directly
    assert float(b1000[0]) == pytest.approx(1 - _f(1 / 1000) / _f(0), rel=1e-12)
    assert float(torch.cumprod(1 - b1000, 0)[-1]) == pytest.approx(2.43e-9, rel=1e-2)


def test_cosine_alpha_bar_function() -> None:
    assert float(cosine_alpha_bar(0.5)) == pytest.approx(_f(0.5), rel=1e-14)
    assert cosine_alpha_bar(torch.tensor([0.0, 1.0])).shape == (2,)
    with pytest.raises(ValueError, match="s must be >= 0"):
        cosine_alpha_bar(0.1, s=-0.1)


def test_betas_from_alpha_bar() -> None:
    # abar(u) = 1 - u: beta_i = 1 - (1 - (i+1)/T) / (1 - i/T) = 1 / (T - i), last one clipped
    b = betas_from_alpha_bar(lambda u: 1 - u, 4, max_beta=0.9)
    torch.testing.assert_close(b, torch.tensor([1 / 4, 1 / 3, 1 / 2, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_beta"):
        betas_from_alpha_bar(lambda u: 1 - u, 4, max_beta=1.5)
    for bad in (1.0, 0.0):  # beta = 1 was accepted, then sampling and bits/dim were NaN
        with pytest.raises(ValueError, match=r"max_beta must be in \(0, 1\)"):
            cosine_betas(10, max_beta=bad)
    with pytest.raises(ValueError, match="strictly decreasing"):
        betas_from_alpha_bar(lambda u: 1.0, 4)
    with pytest.raises(TypeError, match="int"):
        betas_from_alpha_bar(lambda u: 1 - u, 4.0)


def test_get_betas() -> None:
    torch.testing.assert_close(get_betas("cosine", 20), cosine_betas(20))
    with pytest.raises(ValueError, match=r"unknown noise schedule 'quad'.*\('linear', 'cosine'\)"):
        get_betas("quad", 100)


# ---------------------------------------------------------------------------------------------------------
# Schedule: derived quantities
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,T", [("cosine", 20), ("linear", 50), ("cosine", 1000)])
def test_posterior_variance_identity(name: str, T: int) -> None:
    s = Schedule.named(name, T)
    # beta~_t = 1 / (1 / (1 - abar_{t-1}) + alpha_t / beta_t): the precision of a product of two Gaussians
    want = 1 / (1 / (1 - s.alpha_bar[:-1]) + s.alphas[1:] / s.betas[1:])
    torch.testing.assert_close(s.posterior_var[1:], want, rtol=1e-10, atol=0)
    assert float(s.posterior_var[0]) == 0.0


def test_posterior_mean_coefs_from_gaussian_product() -> None:
    s = Schedule.named("cosine", 20)
    t = torch.arange(1, 20)
    var = 1 / (1 / (1 - s.alpha_bar[t - 1]) + s.alphas[t] / s.betas[t])
    # mean = var * (precision_1 * mean_1 + precision_2 * mean_2) with q(x_{t-1} | x0) =
    # N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and q(x_t | x_{t-1}) proportional to N(x_t/sqrt(a_t), b_t/a_t)
    coef1 = var * s.alpha_bar[t - 1].sqrt() / (1 - s.alpha_bar[t - 1])
    coef2 = var * (s.alphas[t] / s.betas[t]) / s.alphas[t].sqrt()
    torch.testing.assert_close(s.posterior_mean_coef1[t], coef1, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2[t], coef2, rtol=1e-10, atol=0)
    # t = 0: the posterior is the point x0
    assert float(s.posterior_mean_coef1[0]) == pytest.approx(1.0, rel=1e-14)
    assert float(s.posterior_mean_coef2[0]) == 0.0


def test_clipped_log_variance_at_t0() -> None:
    s = Schedule.named("linear", 50)
    torch.testing.assert_close(s.posterior_log_var_clipped[1:], torch.log(s.posterior_var[1:]))
    assert float(s.posterior_log_var_clipped[0]) == float(torch.log(s.posterior_var[1]))
    one = Schedule.from_betas([0.3])  # a one-step chain has no beta~_1: its decoder variance is beta_0
    assert float(one.posterior_log_var_clipped[0]) == pytest.approx(math.log(0.3))


def test_other_derived_fields() -> None:
    s = Schedule.named("cosine", 20)
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - s.betas, 0))
    torch.testing.assert_close(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    assert float(s.alpha_bar_prev[0]) == 1.0 and float(s.alpha_bar_next[-1]) == 0.0
    torch.testing.assert_close(s.alpha_bar_next[:-1], s.alpha_bar[1:])
    torch.testing.assert_close(s.sqrt_recip_alpha_bar**2, 1 / s.alpha_bar)
    torch.testing.assert_close(s.sqrt_recipm1_alpha_bar**2, 1 / s.alpha_bar - 1)
    torch.testing.assert_close(s.snr, s.alpha_bar / (1 - s.alpha_bar))
    assert s.num_steps == 20 and s.original_num_steps == 20 and not s.is_respaced
    assert all(getattr(s, f).dtype == torch.float64 for f in ("betas", "alpha_bar", "posterior_var"))


def test_model_timesteps_rescale() -> None:
    s = Schedule.from_betas([0.1, 0.2, 0.3], timesteps=[0, 10, 39], original_num_steps=40)
    assert s.is_respaced
    t = torch.tensor([2, 0, 1])
    assert s.model_timesteps(t).tolist() == [39, 0, 10]
    scaled = s.model_timesteps(t, rescale=True)
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaled, torch.tensor([39, 0, 10]) * 1000 / 40)
    with pytest.raises(ValueError, match=r"t must be in \[0, 3\)"):
        s.model_timesteps(torch.tensor([3]))


def test_check_t_errors() -> None:
    s = Schedule.named("cosine", 10)
    s.check_t(torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="int64 tensor"):
        s.check_t([0, 1])
    with pytest.raises(TypeError, match="integer"):
        s.check_t(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        s.check_t(torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 0\]"):
        s.check_t(torch.tensor([-1, 0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(betas=[[0.1, 0.2]]), "1-D"),
        (dict(betas=[]), "non-empty"),
        (dict(betas=[0.1, 0.0]), r"in \(0, 1\)"),
        (dict(betas=[0.1, 1.2]), r"in \(0, 1\)"),
        (dict(betas=[0.1, float("nan")]), r"in \(0, 1\)"),
        (dict(betas=[0.1, 1.0]), r"in \(0, 1\) \(beta = 1 destroys x0.*NaN\); got \[1.0\]"),
        (dict(betas=[0.1, 0.2], timesteps=[0]), r"shape \(2,\)"),
        (dict(betas=[0.1, 0.2], timesteps=[3, 3]), "strictly increasing"),
        (dict(betas=[0.1, 0.2], timesteps=[5, 2]), "strictly increasing"),
        (dict(betas=[0.1, 0.2], timesteps=[-1, 2]), ">= 0"),
        (dict(betas=[0.1, 0.2], timesteps=[0, 9], original_num_steps=5), "outside the original chain"),
    ],
)
def test_from_betas_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule.from_betas(**kwargs)


def test_from_betas_does_not_alias_input() -> None:
    betas = torch.tensor([0.1, 0.2], dtype=torch.float64)
    s = Schedule.from_betas(betas)
    betas[0] = 0.5
    assert float(s.betas[0]) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------
# extract and to()
# ---------------------------------------------------------------------------------------------------------


def test_extract_shapes_and_dtypes() -> None:
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 3  # not representable in float32
    t = torch.tensor([2, 0])
    out32 = extract(a, t, torch.zeros(2, 3, 4, 5))
    assert out32.shape == (2, 1, 1, 1) and out32.dtype == torch.float32
    out64 = extract(a, t, torch.zeros(2, 3, dtype=torch.float64))
    assert out64.shape == (2, 1) and out64.dtype == torch.float64
    assert float(out64[0, 0]) == float(a[2])  # float64 inputs get the exact float64 coefficient
    assert extract(a, t, torch.zeros(2, 3, dtype=torch.int64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        extract(a, torch.tensor([0, 1, 2]), torch.zeros(2, 3))


def test_to_cpu_copies_every_field() -> None:
    s = Schedule.named("cosine", 10)
    c = s.to("cpu")
    assert isinstance(c, Schedule) and c is not s
    for name in ("betas", "alpha_bar", "posterior_log_var_clipped", "timesteps"):
        assert torch.equal(getattr(c, name), getattr(s, name))
        assert getattr(c, name).dtype == getattr(s, name).dtype
    assert c.original_num_steps == s.original_num_steps
