"""Tests of the exact denoisers in :mod:`iddpm.analytic` (float64, fast)."""

from __future__ import annotations

import pytest
import torch

from iddpm.analytic import (
    empirical_eps_model,
    empirical_posterior_x0,
    gaussian_eps_model,
    gaussian_mixture_eps_model,
    gaussian_posterior_x0,
)
from iddpm.diffusion import p_mean_variance, predict_x0_from_eps, q_sample
from iddpm.respace import respace, space_timesteps
from iddpm.sampling import sample
from iddpm.schedules import Schedule

F64 = torch.float64


@pytest.fixture
def s() -> Schedule:
    return Schedule.named("cosine", 100)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gaussian_model_matches_closed_form_eps(s: Schedule) -> None:
    g = _gen(1)
    mu = torch.tensor([0.3, -0.5, 0.1], dtype=F64)[:, None, None]  # (C, 1, 1)
    var = torch.tensor([0.2, 1.0, 0.05], dtype=F64)[:, None, None]
    x = torch.randn(6, 3, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([0, 5, 20, 50, 90, 99])
    eps = gaussian_eps_model(s, mu, var)(x, t)
    a = s.alpha_bar[t].reshape(-1, 1, 1, 1)
    expected = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * var + 1 - a)  # the docstring's formula
    torch.testing.assert_close(eps, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_equals_one_component_mixture(s: Schedule) -> None:
    g = _gen(2)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    t = torch.randint(0, 100, (8,), generator=g)
    mu, std = torch.tensor([0.4, -0.2], dtype=F64), torch.tensor([0.7, 0.3], dtype=F64)
    out_g = gaussian_eps_model(s, mu, std**2)(x, t)
    out_m = gaussian_mixture_eps_model(s, mu[None], std[None])(x, t)
    torch.testing.assert_close(out_g, out_m, rtol=1e-10, atol=1e-10)


def test_gaussian_posterior_by_monte_carlo() -> None:
    """E[x0 | x_t] of a Gaussian prior == importance-weighted average over prior samples (self-normalised)."""
    g = _gen(3)
    mu, var = 0.5, 0.3
    prior = mu + var**0.5 * torch.randn(200_000, 1, generator=g, dtype=F64)
    x_t = torch.tensor([[-1.0], [0.0], [0.8], [2.0]], dtype=F64)
    abar = torch.full((4,), 0.6, dtype=F64)
    exact = gaussian_posterior_x0(x_t, abar, mu, var)
    mc = empirical_posterior_x0(x_t, abar, prior)
    torch.testing.assert_close(mc, exact, rtol=0, atol=1e-2)


def test_eps_is_orthogonal_to_x_t_by_monte_carlo(s: Schedule) -> None:
    """eps* = E[eps | x_t] makes the residual eps - eps*(x_t) uncorrelated with any function of x_t."""
    g = _gen(4)
    n, mu, var = 400_000, -0.3, 0.5
    x0 = mu + var**0.5 * torch.randn(n, 1, generator=g, dtype=F64)
    noise = torch.randn(n, 1, generator=g, dtype=F64)
    t = torch.full((n,), 40)
    x_t = q_sample(s, x0, t, noise)
    resid = noise - gaussian_eps_model(s, mu, var)(x_t, t)
    for f in (torch.ones_like(x_t), x_t, x_t**2):
        assert abs(float((resid * f).mean())) < 5e-3
    # a slightly wrong denoiser (variance off) is NOT orthogonal: the test can fail
    resid_bad = noise - gaussian_eps_model(s, mu, 2 * var)(x_t, t)
    assert abs(float((resid_bad * x_t).mean())) > 2e-2


def test_single_point_returns_that_point(s: Schedule) -> None:
    point = torch.tensor([[0.25, -0.75]], dtype=F64)
    model = empirical_eps_model(s, point, mean_type="x0")
    x = 3 * torch.randn(5, 2, generator=_gen(5), dtype=F64)
    t = torch.tensor([0, 10, 50, 98, 99])
    torch.testing.assert_close(model(x, t), point.expand(5, 2), rtol=0, atol=0)
    # and as eps, converting back with Eq. 9 gives the point again
    eps = empirical_eps_model(s, point)(x, t)
    torch.testing.assert_close(predict_x0_from_eps(s, x, t, eps), point.expand(5, 2), rtol=0, atol=1e-12)


def test_nearest_point_as_alpha_bar_to_one() -> None:
    data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=F64)
    x = torch.randn(50, 2, generator=_gen(6), dtype=F64)
    abar = torch.full((50,), 1 - 1e-6, dtype=F64)
    out = empirical_posterior_x0(x, abar, data)
    nearest = data[torch.cdist(x / abar[:, None].sqrt(), data).argmin(1)]
    torch.testing.assert_close(out, nearest, rtol=0, atol=1e-9)
    # at abar -> 0 the posterior is the prior: the data mean
    out0 = empirical_posterior_x0(x, torch.full((50,), 1e-12, dtype=F64), data)
    torch.testing.assert_close(out0, data.mean(0).expand(50, 2), rtol=0, atol=1e-5)


def test_denoise_noised_training_point_at_small_t(s: Schedule) -> None:
    g = _gen(7)
    data = torch.rand(64, 1, 4, 4, generator=g, dtype=F64) * 2 - 1
    model = empirical_eps_model(s, data)
    idx = torch.arange(0, 64, 8)
    x0 = data[idx]
    t = torch.zeros(len(idx), dtype=torch.int64)
    x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    p = p_mean_variance(s, model(x_t, t), x_t, t, mean_type="eps", var_type="fixed_small", clip_x0=False)
    torch.testing.assert_close(p.pred_x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(p.mean, x0, rtol=0, atol=1e-9)  # at t = 0 the posterior mean is x0 itself


def test_empirical_agrees_with_tiny_std_mixture(s: Schedule) -> None:
    g = _gen(8)
    pts = torch.randn(5, 3, generator=g, dtype=F64)
    x = torch.randn(20, 3, generator=g, dtype=F64)
    t = torch.randint(0, 100, (20,), generator=g)
    e = empirical_eps_model(s, pts)(x, t)
    m = gaussian_mixture_eps_model(s, pts, 1e-7)(x, t)
    torch.testing.assert_close(e, m, rtol=1e-6, atol=1e-6)
    # unequal weights too
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    e = empirical_eps_model(s, pts, weights=w)(x, t)
    m = gaussian_mixture_eps_model(s, pts, 1e-7, w)(x, t)
    torch.testing.assert_close(e, m, rtol=1e-6, atol=1e-6)


def test_respaced_schedule_uses_original_timesteps(s: Schedule) -> None:
    """Under respacing the model sees sr.model_timesteps(t) (original indices) and uses the original abar."""
    kept = space_timesteps(100, "5")
    sr = respace(s, kept)
    abar = s.alpha_bar[kept]  # the original abar at the kept steps
    data = torch.randn(7, 2, generator=_gen(9), dtype=F64)
    model = empirical_eps_model(s, data)
    x = torch.randn(5, 2, generator=_gen(10), dtype=F64)
    t = torch.arange(5)
    t_model = sr.model_timesteps(t, False)
    assert t_model.tolist() == kept
    eps = model(x, t_model)
    x0_expected = empirical_posterior_x0(x, abar, data)
    torch.testing.assert_close(predict_x0_from_eps(sr, x, t, eps), x0_expected, rtol=0, atol=1e-10)
    # feeding the respaced index instead would be a different (wrong) answer
    assert not torch.allclose(model(x, t), eps)


def test_rescaled_timesteps(s: Schedule) -> None:
    data = torch.randn(4, 2, generator=_gen(11), dtype=F64)
    x = torch.randn(3, 2, generator=_gen(12), dtype=F64)
    t = torch.tensor([0, 37, 99])
    plain = empirical_eps_model(s, data)(x, s.model_timesteps(t, False))
    scaled = empirical_eps_model(s, data, rescale_timesteps=True)(x, s.model_timesteps(t, True))
    torch.testing.assert_close(plain, scaled, rtol=0, atol=0)
    with pytest.raises(TypeError, match="rescale_timesteps=False"):
        empirical_eps_model(s, data)(x, s.model_timesteps(t, True))


def test_learned_v_channels_and_learned_range(s: Schedule) -> None:
    x = torch.randn(4, 3, 2, 2, generator=_gen(13), dtype=F64)
    t = torch.tensor([0, 1, 50, 99])
    base = gaussian_eps_model(s, 0.0, 1.0)(x, t)
    for v, log_bound in ((-1.0, s.posterior_log_var_clipped), (1.0, torch.log(s.betas))):
        out = gaussian_eps_model(s, 0.0, 1.0, learned_v=v)(x, t)
        assert out.shape == (4, 6, 2, 2)
        torch.testing.assert_close(out[:, :3], base, rtol=0, atol=0)
        p = p_mean_variance(s, out, x, t, var_type="learned_range", clip_x0=False)
        torch.testing.assert_close(p.log_var, log_bound[t].reshape(-1, 1, 1, 1).expand_as(x))


def test_float32_input_computed_in_float64(s: Schedule) -> None:
    data = torch.randn(30, 2, generator=_gen(14), dtype=F64)
    x = torch.randn(6, 2, generator=_gen(15), dtype=F64)
    t = torch.tensor([0, 0, 1, 2, 50, 99])
    ref = empirical_eps_model(s, data)(x, t)
    out32 = empirical_eps_model(s, data.float())(x.float(), t)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, ref.float(), rtol=1e-5, atol=1e-5)


def test_input_validation(s: Schedule) -> None:
    data = torch.zeros(3, 2, dtype=F64)
    respaced = respace(s, [0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="ORIGINAL"):
        empirical_eps_model(respaced, data)
    with pytest.raises(ValueError, match="mean_type"):
        empirical_eps_model(s, data, mean_type="xprev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N >= 1"):
        empirical_eps_model(s, torch.zeros(0, 2, dtype=F64))
    with pytest.raises(ValueError, match="var"):
        gaussian_eps_model(s, 0.0, -1.0)
    with pytest.raises(ValueError, match="stds"):
        gaussian_mixture_eps_model(s, data, torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        gaussian_mixture_eps_model(s, data, 0.1, torch.tensor([1.0, 0.0, 1.0]))
    model = empirical_eps_model(s, data)
    with pytest.raises(ValueError, match="event shape"):
        model(torch.zeros(2, 3, dtype=F64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        model(torch.zeros(2, 2, dtype=F64), torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="t_model"):
        model(torch.zeros(2, 2, dtype=F64), torch.tensor([0]))


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_sampling_with_the_exact_gaussian_denoiser_recovers_the_data(method: str, one_thread: None) -> None:
    """End to end: the reverse process driven by eps* of N(mu, sigma^2) data gives N(mu, sigma^2) samples."""
    s = Schedule.named("cosine", 200)
    mu, sigma = 0.3, 0.5

    def draw(model):
        g = torch.Generator().manual_seed(0)
        kw = dict(method=method, var_type="fixed_small", clip_x0=False, rescale_timesteps=False)
        return sample(model, s, (20_000, 1), generator=g, dtype=F64, **kw)

    x = draw(gaussian_eps_model(s, mu, sigma**2))
    # standard errors are ~0.004 (mean) and ~0.003 (std); the rest is the 200-step discretisation
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - sigma) < 0.02
    wrong = draw(gaussian_eps_model(s, mu, (2 * sigma) ** 2))  # a denoiser for the wrong data: detected
    assert abs(float(wrong.std()) - sigma) > 0.2
