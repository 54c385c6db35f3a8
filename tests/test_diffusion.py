"""Tests for iddpm.diffusion: closed forms checked against independent derivations, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from iddpm.diffusion import (
    MEAN_TYPES,
    VAR_TYPES,
    model_out_channels,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_xprev,
    q_mean_variance,
    q_posterior,
    q_sample,
    split_model_output,
)
from iddpm.schedules import Schedule


def _all_t(s: Schedule) -> torch.Tensor:
    return torch.arange(s.num_steps)


def _bayes_posterior(s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
    """q(x_{t-1} | x_t, x0) for t >= 1 as the product of two Gaussians in x_{t-1} (Bayes' rule).

    As a function of x_{t-1}, q(x_t | x_{t-1}) = N(x_t; sqrt(a_t) x_{t-1}, b_t) is proportional to
    N(x_{t-1}; x_t / sqrt(a_t), b_t / a_t), and q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}).
    Precisions add; the mean is the precision-weighted average of the two means.
    """
    a, b = float(s.alphas[t]), float(s.betas[t])
    abar_prev = float(s.alpha_bar[t - 1])
    prec1, mean1 = a / b, x_t / math.sqrt(a)
    prec2, mean2 = 1.0 / (1.0 - abar_prev), math.sqrt(abar_prev) * x0
    var = 1.0 / (prec1 + prec2)
    return var * (prec1 * mean1 + prec2 * mean2), var


# ---------------------------------------------------------------------------------------------------------
# forward process
# ---------------------------------------------------------------------------------------------------------


def test_q_mean_variance_closed_form(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    x0 = torch.randn(s.num_steps, 3, generator=gen, dtype=torch.float64)
    q = q_mean_variance(s, x0, _all_t(s))
    ab = s.alpha_bar[:, None]
    torch.testing.assert_close(q.mean, ab.sqrt() * x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(q.var, 1 - ab, rtol=1e-15, atol=0)
    torch.testing.assert_close(q.log_var, torch.log(1 - ab), rtol=1e-14, atol=0)


@pytest.mark.parametrize("t", [0, 7, 19])
def test_q_sample_moments_empirical(cosine20: Schedule, gen: torch.Generator, t: int) -> None:
    s, n = cosine20, 40_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x_t = q_sample(s, x0, torch.full((n,), t), noise)
    ab = float(s.alpha_bar[t])
    # 5 standard errors: se(mean) = sd / sqrt(n); se(var) ~ var * sqrt(2 / n) for a Gaussian.
    assert abs(x_t.mean().item() - math.sqrt(ab) * 0.7) < 5 * math.sqrt((1 - ab) / n)
    assert abs(x_t.var().item() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n)


def test_markov_chain_matches_closed_form(linear50: Schedule, gen: torch.Generator) -> None:
    """Iterating x_k = sqrt(a_k) x_{k-1} + sqrt(b_k) eps_k from x0 gives q(x_t | x0) of Eq. 9."""
    s, n, t = linear50, 40_000, 30
    x0 = torch.full((n, 1), -0.4, dtype=torch.float64)
    x = x0.clone()
    # exact variance of the iterated chain: var_k = a_k var_{k-1} + b_k, var_{-1} = 0
    var = 0.0
    for k in range(t + 1):
        eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x = s.alphas[k].sqrt() * x + s.betas[k].sqrt() * eps
        var = float(s.alphas[k]) * var + float(s.betas[k])
    ab = float(s.alpha_bar[t])
    assert var == pytest.approx(1 - ab, rel=1e-12)  # the recursion sums to 1 - abar_t exactly
    closed = q_sample(s, x0, torch.full((n,), t), torch.randn(n, 1, generator=gen, dtype=torch.float64))
    for sample in (x, closed):
        assert abs(sample.mean().item() - math.sqrt(ab) * -0.4) < 5 * math.sqrt((1 - ab) / n)
        assert abs(sample.var().item() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n)
    # same distribution: compare a few quantiles of the two samples
    qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(x.quantile(qs), closed.quantile(qs), rtol=0, atol=0.03)


def test_q_sample_t0_already_noisy(cosine20: Schedule) -> None:
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    noise = torch.ones(1, 2, dtype=torch.float64)
    x_t = q_sample(cosine20, x0, torch.tensor([0]), noise)
    torch.testing.assert_close(x_t, torch.full((1, 2), float(cosine20.betas[0].sqrt()), dtype=torch.float64))


def test_q_sample_keeps_dtype(cosine20: Schedule) -> None:
    x0 = torch.zeros(2, 3, 4, 4)
    assert q_sample(cosine20, x0, torch.tensor([1, 2]), torch.randn_like(x0)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,T", [("cosine", 20), ("linear", 50)])
def test_eps_x0_round_trips(name: str, T: int, gen: torch.Generator) -> None:
    s = Schedule.named(name, T)
    x0 = torch.rand(T, 2, 3, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(T, 2, 3, generator=gen, dtype=torch.float64)
    t = _all_t(s)
    x_t = q_sample(s, x0, t, eps)
    torch.testing.assert_close(predict_x0_from_eps(s, x_t, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(predict_eps_from_x0(s, x_t, t, x0), eps, rtol=0, atol=1e-9)


def test_xprev_round_trip(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    x0 = torch.rand(20, 4, generator=gen, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    t = _all_t(s)
    mu = q_posterior(s, x0, x_t, t).mean
    torch.testing.assert_close(predict_x0_from_xprev(s, x_t, t, mu), x0, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# posterior
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,T", [("cosine", 20), ("linear", 50)])
def test_posterior_matches_bayes_rule(name: str, T: int, gen: torch.Generator) -> None:
    s = Schedule.named(name, T)
    x0 = torch.rand(T, 3, generator=gen, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    q = q_posterior(s, x0, x_t, _all_t(s))
    for t in range(1, T):
        mean, var = _bayes_posterior(s, x0[t], x_t[t], t)
        torch.testing.assert_close(q.mean[t], mean, rtol=1e-10, atol=1e-12)
        assert float(q.var[t]) == pytest.approx(var, rel=1e-10)
        assert float(q.log_var[t]) == pytest.approx(math.log(var), rel=1e-10)
    # t = 0: the posterior is a point mass at x0, its log-variance clipped to log beta~_1
    torch.testing.assert_close(q.mean[0], x0[0], rtol=0, atol=1e-15)
    assert float(q.var[0]) == 0.0
    assert float(q.log_var[0]) == pytest.approx(math.log(float(s.posterior_var[1])), rel=1e-14)


def test_posterior_shapes_broadcast(cosine20: Schedule) -> None:
    x = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    q = q_posterior(cosine20, x, x, torch.tensor([0, 3]))
    assert q.mean.shape == (2, 3, 4, 5)
    assert q.var.shape == q.log_var.shape == (2, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# p_mean_variance
# ---------------------------------------------------------------------------------------------------------


def _setup(s: Schedule, gen: torch.Generator, c: int = 2) -> tuple[torch.Tensor, ...]:
    T = s.num_steps
    x0 = torch.rand(T, c, 3, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(T, c, 3, generator=gen, dtype=torch.float64)
    t = _all_t(s)
    return x0, eps, t, q_sample(s, x0, t, eps)


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_true_eps_gives_true_posterior_mean(cosine20: Schedule, gen: torch.Generator, var_type: str) -> None:
    s = cosine20
    x0, eps, t, x_t = _setup(s, gen)
    out = eps if model_out_channels(2, var_type) == 2 else torch.cat([eps, torch.zeros_like(eps)], 1)
    p = p_mean_variance(s, out, x_t, t, mean_type="eps", var_type=var_type, clip_x0=False)
    torch.testing.assert_close(p.pred_x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(p.mean, q_posterior(s, x0, x_t, t).mean, rtol=0, atol=1e-9)
    assert p.mean.shape == p.var.shape == p.log_var.shape == p.pred_x0.shape == x_t.shape


def test_x0_mean_type(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    x0, _, t, x_t = _setup(s, gen)
    p = p_mean_variance(s, x0, x_t, t, mean_type="x0", var_type="fixed_small")
    torch.testing.assert_close(p.pred_x0, x0)
    torch.testing.assert_close(p.mean, q_posterior(s, x0, x_t, t).mean)


def test_xprev_mean_type(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    x0, _, t, x_t = _setup(s, gen)
    mu = q_posterior(s, x0, x_t, t).mean
    p = p_mean_variance(s, mu, x_t, t, mean_type="xprev", var_type="fixed_large", clip_x0=False)
    torch.testing.assert_close(p.mean, mu, rtol=0, atol=0)  # the output *is* the mean
    torch.testing.assert_close(p.pred_x0, x0, rtol=0, atol=1e-9)


def test_fixed_small_values(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    _, eps, t, x_t = _setup(s, gen)
    p = p_mean_variance(s, eps, x_t, t, var_type="fixed_small")
    torch.testing.assert_close(p.var[:, 0, 0], s.posterior_var)
    assert (p.var[0] == 0).all()  # no noise at the last step
    torch.testing.assert_close(p.log_var[:, 0, 0], s.posterior_log_var_clipped)
    torch.testing.assert_close(p.log_var[0], torch.log(s.posterior_var[1]).expand(2, 3))


def test_fixed_large_values(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    _, eps, t, x_t = _setup(s, gen)
    p = p_mean_variance(s, eps, x_t, t, var_type="fixed_large")
    torch.testing.assert_close(p.var[1:, 0, 0], s.betas[1:])
    # t = 0 uses beta~_1 instead of beta_0 (authors' choice for a better decoder likelihood, spec Sec. 5)
    assert float(p.var[0, 0, 0]) == float(s.posterior_var[1]) != float(s.betas[0])
    torch.testing.assert_close(p.log_var, torch.log(p.var))


def test_learned_values(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    _, eps, t, x_t = _setup(s, gen)
    v = torch.randn(eps.shape, generator=gen, dtype=torch.float64) - 5
    p = p_mean_variance(s, torch.cat([eps, v], 1), x_t, t, var_type="learned")
    torch.testing.assert_close(p.log_var, v, rtol=0, atol=0)
    torch.testing.assert_close(p.var, v.exp())


@pytest.mark.parametrize(
    "v,expected",
    [
        (1.0, lambda big, small: big),  # frac = 1: the upper bound beta_t
        (-1.0, lambda big, small: small),  # frac = 0: the lower bound beta~_t (clipped at t = 0)
        (0.0, lambda big, small: (big + small) / 2),  # the geometric mean of the two variances
        (3.0, lambda big, small: 2 * big - small),  # frac = 2: v is not clamped, so it extrapolates
    ],
)
def test_learned_range_values(cosine20: Schedule, gen: torch.Generator, v: float, expected) -> None:
    s = cosine20
    _, eps, t, x_t = _setup(s, gen)
    p = p_mean_variance(s, torch.cat([eps, torch.full_like(eps, v)], 1), x_t, t, var_type="learned_range")
    want = expected(torch.log(s.betas), s.posterior_log_var_clipped)
    torch.testing.assert_close(p.log_var[:, 0, 0], want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(p.var, p.log_var.exp())
    if v == -1.0:  # t = 0: log beta~_1, not log 0
        assert float(p.log_var[0, 0, 0]) == pytest.approx(math.log(float(s.posterior_var[1])), rel=1e-13)


def test_learned_range_uses_the_schedule_passed_in(cosine20: Schedule, gen: torch.Generator) -> None:
    """A respaced chain's bounds are its own beta' and beta~', not the original chain's."""
    base, kept = cosine20, [0, 4, 9, 14, 19]
    abar = base.alpha_bar[kept]
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    s = Schedule.from_betas(betas, timesteps=kept, original_num_steps=20)
    x = torch.zeros(5, 1, 2, dtype=torch.float64)
    out = torch.cat([x, torch.ones_like(x)], 1)
    p = p_mean_variance(s, out, x, torch.arange(5), var_type="learned_range")
    torch.testing.assert_close(p.log_var[:, 0, 0], torch.log(betas))
    assert not torch.allclose(p.log_var[:, 0, 0], torch.log(base.betas[kept]))


def test_clip_applies_before_posterior_mean(cosine20: Schedule) -> None:
    s = cosine20
    t = torch.tensor([10, 10])
    x_t = torch.tensor([[3.0], [-0.2]], dtype=torch.float64)
    eps = torch.tensor([[-2.0], [0.1]], dtype=torch.float64)
    raw = predict_x0_from_eps(s, x_t, t, eps)
    assert raw[0, 0] > 1  # the unclipped prediction leaves the data range
    p = p_mean_variance(s, eps, x_t, t, var_type="fixed_small", clip_x0=True)
    torch.testing.assert_close(p.pred_x0, raw.clamp(-1, 1))
    torch.testing.assert_close(p.mean, q_posterior(s, raw.clamp(-1, 1), x_t, t).mean)
    unclipped = p_mean_variance(s, eps, x_t, t, var_type="fixed_small", clip_x0=False)
    assert not torch.allclose(unclipped.mean, p.mean)


def test_denoised_fn_applies_before_clip(cosine20: Schedule, gen: torch.Generator) -> None:
    s = cosine20
    _, eps, t, x_t = _setup(s, gen)
    raw = predict_x0_from_eps(s, x_t, t, eps)
    p = p_mean_variance(s, eps, x_t, t, var_type="fixed_small", denoised_fn=lambda z: 10 * z)
    torch.testing.assert_close(p.pred_x0, (10 * raw).clamp(-1, 1))
    torch.testing.assert_close(p.mean, q_posterior(s, p.pred_x0, x_t, t).mean)


def test_float32_inputs_stay_float32(cosine20: Schedule) -> None:
    x = torch.zeros(2, 3, 4, 4)
    p = p_mean_variance(cosine20, torch.zeros(2, 6, 4, 4), x, torch.tensor([0, 5]))
    assert all(f.dtype == torch.float32 for f in p)


# ---------------------------------------------------------------------------------------------------------
# channels and errors
# ---------------------------------------------------------------------------------------------------------


def test_model_out_channels_and_split() -> None:
    assert [model_out_channels(3, v) for v in VAR_TYPES] == [3, 3, 6, 6]
    out = torch.arange(2 * 6 * 2).reshape(2, 6, 2).double()
    mean, v = split_model_output(out, 3, "learned_range")
    torch.testing.assert_close(mean, out[:, :3])
    torch.testing.assert_close(v, out[:, 3:])
    mean, v = split_model_output(out[:, :3], 3, "fixed_large")
    assert v is None and mean.shape == (2, 3, 2)
    with pytest.raises(ValueError, match="positive int"):
        model_out_channels(0, "learned")


@pytest.mark.parametrize("var_type,channels", [("learned_range", 2), ("learned", 2), ("fixed_small", 4)])
def test_wrong_channel_count_raises(cosine20: Schedule, var_type: str, channels: int) -> None:
    x = torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match=r"must output \d channels"):
        p_mean_variance(cosine20, torch.zeros(2, channels, 3), x, torch.tensor([0, 1]), var_type=var_type)


def test_bad_inputs_raise(cosine20: Schedule) -> None:
    s = cosine20
    x, out = torch.zeros(2, 2, 3), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"t must be in \[0, 20\)"):
        p_mean_variance(s, out, x, torch.tensor([0, 20]))
    with pytest.raises(ValueError, match=r"t must be in \[0, 20\)"):
        q_sample(s, x, torch.tensor([-1, 0]), x)
    with pytest.raises(TypeError, match="integer"):
        q_sample(s, x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match="unknown mean_type 'v'.*'eps', 'x0', 'xprev'"):
        p_mean_variance(s, out, x, torch.tensor([0, 1]), mean_type="v")
    with pytest.raises(ValueError, match="unknown var_type 'big'.*fixed_small"):
        p_mean_variance(s, out, x, torch.tensor([0, 1]), var_type="big")
    with pytest.raises(ValueError, match="B = len"):
        q_sample(s, x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="same shape"):
        q_sample(s, x, torch.tensor([0, 1]), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="same shape"):
        q_posterior(s, torch.zeros(2, 2, 4), x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating"):
        q_sample(s, torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0, 1]), torch.zeros(2, 2))
    assert set(MEAN_TYPES) == {"eps", "x0", "xprev"}


def test_q_sample_draws_its_noise_when_none_is_given(cosine20: Schedule) -> None:
    x0 = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 5, 19])
    g = torch.Generator().manual_seed(7)
    drawn = q_sample(cosine20, x0, t, generator=g)  # used to fail with AttributeError on None.shape
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=x0.dtype)
    torch.testing.assert_close(drawn, q_sample(cosine20, x0, t, eps))
    assert q_sample(cosine20, x0, t).shape == x0.shape  # global RNG
    with pytest.raises(ValueError, match="either noise or generator"):
        q_sample(cosine20, x0, t, eps, generator=g)
