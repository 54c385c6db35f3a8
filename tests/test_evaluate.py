"""Tests for iddpm.evaluate.bits_per_dim, using models whose reverse process is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from iddpm.diffusion import p_mean_variance, q_sample
from iddpm.evaluate import BpdResult, bits_per_dim
from iddpm.losses import prior_bpd, vlb_term_bpd
from iddpm.schedules import Schedule

MU, SIGMA = 0.1, 0.2  # the Gaussian "data" of the closed-form tests


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    """``(n, 1, 4, 4)`` samples of N(MU, SIGMA^2) per dim, quantised to the 8-bit grid of [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = MU + SIGMA * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def discrete_entropy_bits() -> float:
    """Entropy (bits/dim) of N(MU, SIGMA^2) quantised to the 256 bins of the decoder: about 6.72.

    Close to the continuous ``0.5 log2(2 pi e SIGMA^2) - log2(2/255)`` = -0.275 + 6.995 = 6.72.
    """
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    cdf = Normal(MU, SIGMA).cdf
    p = cdf(grid + 1 / 255) - cdf(grid - 1 / 255)
    p[0], p[-1] = cdf(grid[0] + 1 / 255), 1 - cdf(grid[-1] - 1 / 255)
    return float(-(p * p.log2()).sum())


def optimal_model(s: Schedule, learned: bool):
    """The Bayes-optimal predictor for Gaussian data; the model is shown the raw integer t.

    With x0 ~ N(mu, sigma^2) and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, (x0, eps, x_t) are jointly
    Gaussian: E[eps | x_t] = sqrt(1-abar) (x_t - sqrt(abar) mu) / (abar sigma^2 + 1 - abar) and
    Var[x0 | x_t] = sigma^2 (1-abar) / (abar sigma^2 + 1 - abar). The true reverse step q(x_{t-1} | x_t) is
    then Gaussian with variance beta~_t + coef1_t^2 Var[x0 | x_t] (law of total variance over the posterior),
    which a "learned" variance model can output exactly as a log-variance.
    """

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = s.alpha_bar[t][:, None, None, None]
        denom = ab * SIGMA**2 + 1 - ab
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * MU) / denom
        if not learned:
            return eps
        var_x0 = SIGMA**2 * (1 - ab) / denom
        coef1 = s.posterior_mean_coef1[t][:, None, None, None]
        log_var = torch.log(s.posterior_var[t][:, None, None, None] + coef1**2 * var_x0)
        return torch.cat([eps, log_var.expand_as(x_t)], 1)

    return model


def zero_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_t)


def test_shapes_and_total(cosine20: Schedule, grid_x0) -> None:
    x0 = grid_x0(3, 2, 2, 2)
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], 1)
    r = bits_per_dim(model, cosine20, x0, generator=torch.Generator().manual_seed(0))
    assert isinstance(r, BpdResult)
    assert r.total.shape == r.prior.shape == (3,)
    assert r.terms.shape == r.x0_mse.shape == r.eps_mse.shape == (3, 20)
    torch.testing.assert_close(r.total, r.terms.sum(1) + r.prior)
    torch.testing.assert_close(r.prior, prior_bpd(cosine20, x0))
    assert torch.isfinite(r.terms).all() and (r.terms >= 0).all()


def test_columns_are_in_forward_time_order(cosine20: Schedule, grid_x0) -> None:
    """Column k holds the term at t = k: recompute it from the same noise."""
    s, x0 = cosine20, grid_x0(2, 1, 3)
    noises = {
        i: torch.randn(x0.shape, generator=torch.Generator().manual_seed(i), dtype=x0.dtype)
        for i in range(20)
    }
    calls: list[int] = []

    def noise_fn(i: int) -> torch.Tensor:
        calls.append(i)
        return noises[i]

    model = lambda x, t: torch.cat([0.3 * x, torch.full_like(x, 0.2)], 1)
    r = bits_per_dim(model, s, x0, noise_fn=noise_fn, rescale_timesteps=False)
    assert calls == list(range(19, -1, -1))  # evaluated from t = T-1 down to 0, like the authors
    for k in (0, 1, 19):
        t = torch.full((2,), k)
        x_t = q_sample(s, x0, t, noises[k])
        p = p_mean_variance(s, model(x_t, t), x_t, t)
        torch.testing.assert_close(r.terms[:, k], vlb_term_bpd(s, x0, x_t, t, p))
        torch.testing.assert_close(r.x0_mse[:, k], ((p.pred_x0 - x0) ** 2).mean((1, 2)))


def _bpd(model, s: Schedule, x0: torch.Tensor, var_type: str, seed: int = 1, **kw) -> BpdResult:
    """bits_per_dim of a model shown the raw integer t, with its own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return bits_per_dim(model, s, x0, var_type=var_type, rescale_timesteps=False, generator=g, **kw)


def test_exact_reverse_model_reaches_the_data_entropy() -> None:
    """With the exact reverse process the bound is tight up to the decoder and prior: ~ the entropy.

    Measured (T = 20, 256 images, seed 1): 6.735 bits/dim vs the entropy 6.720; the standard error of the mean
    is ~0.025, so 0.15 is a 6-sigma tolerance.
    """
    s = Schedule.named("cosine", 20)
    x0 = gaussian_data(256)
    r = _bpd(optimal_model(s, learned=True), s, x0, "learned", clip_x0=False)
    assert torch.isfinite(r.total).all()
    assert r.total.mean().item() == pytest.approx(discrete_entropy_bits(), abs=0.15)
    # the variance-fixed variants of the same mean are worse bounds, and a zero model is much worse
    for var_type in ("fixed_small", "fixed_large"):
        fixed = _bpd(optimal_model(s, learned=False), s, x0, var_type, clip_x0=False)
        assert fixed.total.mean() > r.total.mean()
    zero = _bpd(zero_model, s, x0, "fixed_large")
    assert zero.total.mean() > r.total.mean() + 1.0
    # a perfect eps-predictor has ~zero eps error at t = T-1 (x_t is almost pure noise there)
    assert r.eps_mse[:, -1].mean() < 1e-3


def test_optimal_beats_zero_model_on_eps_mse(linear50: Schedule) -> None:
    x0 = gaussian_data(16)
    opt = _bpd(optimal_model(linear50, False), linear50, x0, "fixed_large", seed=2)
    zero = _bpd(zero_model, linear50, x0, "fixed_large", seed=2)
    assert opt.total.mean() < zero.total.mean()
    assert (opt.eps_mse.mean(0) < zero.eps_mse.mean(0)).all()


def test_prior_is_negligible_for_cosine() -> None:
    # cosine T = 1000 ends at abar = 2.4e-9, and
    # KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)) = (-log(1 - abar) - abar + abar x^2) / 2 ~ abar x^2 / 2 ~ 1e-9
    s = Schedule.named("cosine", 1000)
    x0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    assert 0 < prior_bpd(s, x0).item() < 1e-8
    ab = float(s.alpha_bar[-1])
    want = (0.5 * (-math.log(1 - ab) - ab + ab * 2 / 3)) / math.log(2)  # mean of x^2 over {-1, 0, 1} is 2/3
    assert prior_bpd(s, x0).item() == pytest.approx(want, rel=1e-6)


def test_respaced_schedule(cosine20: Schedule, grid_x0) -> None:
    base, kept = cosine20, [0, 4, 9, 14, 19]
    abar = base.alpha_bar[kept]
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    s = Schedule.from_betas(betas, timesteps=kept, original_num_steps=20)
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        seen.append(t_model)
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)

    x0 = grid_x0(2, 1, 2, 2)
    r = bits_per_dim(model, s, x0, generator=torch.Generator().manual_seed(0))
    assert r.terms.shape == (2, 5)
    # the model sees original-chain timesteps on the 0..1000 scale, in reverse order
    assert [float(t[0]) for t in seen] == [k * 1000 / 20 for k in reversed(kept)]
    # both chains end at the same abar, so they have the same prior term
    torch.testing.assert_close(r.prior, prior_bpd(base, x0))


def test_reproducible_and_progress(cosine20: Schedule, grid_x0) -> None:
    x0 = grid_x0(2, 1, 2)
    model = lambda x, t: torch.cat([0.2 * x, torch.zeros_like(x)], 1)
    a = bits_per_dim(model, cosine20, x0, generator=torch.Generator().manual_seed(5))
    b = bits_per_dim(model, cosine20, x0, generator=torch.Generator().manual_seed(5), progress=True)
    torch.testing.assert_close(a.total, b.total, rtol=0, atol=0)


def test_errors(cosine20: Schedule, grid_x0) -> None:
    x0 = grid_x0(2, 1, 2)
    with pytest.raises(ValueError, match="at most one"):
        bits_per_dim(zero_model, cosine20, x0, generator=torch.Generator(), noise_fn=lambda i: x0)
    with pytest.raises(ValueError, match=r"noise_fn\(19\) must return"):
        bits_per_dim(zero_model, cosine20, x0, var_type="fixed_small", noise_fn=lambda i: x0[:1])
    with pytest.raises(ValueError, match="unknown var_type"):
        bits_per_dim(zero_model, cosine20, x0, var_type="nope")
    with pytest.raises(ValueError, match="floating"):
        bits_per_dim(zero_model, cosine20, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="must output 2 channels"):
        bits_per_dim(zero_model, cosine20, x0, var_type="learned_range")
