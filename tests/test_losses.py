"""Tests for iddpm.losses: likelihood primitives against torch.distributions / exact formulas, and the
training losses' targets, scaling and gradient routing."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from iddpm.diffusion import p_mean_variance, q_posterior, q_sample
from iddpm.losses import (
    LOSS_TYPES,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    prior_bpd,
    training_losses,
    vlb_term_bpd,
)
from iddpm.schedules import Schedule

LN2 = math.log(2)
GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every value 8-bit data can take


def test_mean_flat() -> None:
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5], dtype=torch.float64))
    torch.testing.assert_close(mean_flat(x[:, 0, 0]), x[:, 0, 0])
    with pytest.raises(ValueError, match="batch"):
        mean_flat(torch.tensor(1.0))


def test_normal_kl_matches_torch_distributions(gen: torch.Generator) -> None:
    m1, m2 = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(2))
    lv1, lv2 = (3 * torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(2))
    want = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-12)


def test_normal_kl_identical_is_zero_and_scalars(gen: torch.Generator) -> None:
    m = torch.randn(10, generator=gen, dtype=torch.float64)
    lv = torch.randn(10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=torch.float64))
    zero = torch.zeros(10, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, 0.0, 0.0), normal_kl(m, lv, zero, zero))
    assert normal_kl(m, lv, 0.0, 0.0).dtype == torch.float64
    with pytest.raises(TypeError, match="at least one tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_cdf_close_to_erf_but_not_equal() -> None:
    x = torch.linspace(-6, 6, 24001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    err = (approx_standard_normal_cdf(x) - exact).abs()
    assert err.max() < 2e-4
    # it *is* the tanh approximation, not erf: the error peaks at ~1.79e-4 near |x| = 1.24 (spec Sec. 6) and
    # again near |x| = 2.59
    assert err.max() > 1.7e-4
    assert err[(x.abs() - 1.24).abs() < 0.05].max() > 1.7e-4


@pytest.mark.parametrize("mean", [-1.0, -0.3, 0.0, 0.77, 1.2])
@pytest.mark.parametrize("log_scale", [-6.0, -3.0, -1.0, 0.0, 1.0])
def test_decoder_probabilities_sum_to_one(mean: float, log_scale: float) -> None:
    # The 256 bins tile the real line (edge bins open to +-inf), so the probabilities telescope to 1. Tiny
    # bins far from the mean are clamped up to 1e-12 each, adding at most 256e-12.
    logp = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, log_scale)
    )
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert (logp <= 0).all()


def test_decoder_matches_exact_gaussian_bins() -> None:
    """Inner bins: Phi((x+1/255-m)/s) - Phi((x-1/255-m)/s), up to the tanh-CDF error (2 x 2e-4)."""
    mean, log_scale = 0.1, -2.5
    exact_cdf = Normal(mean, math.exp(log_scale)).cdf
    logp = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, log_scale)
    )
    probs = exact_cdf(GRID + 1 / 255) - exact_cdf(GRID - 1 / 255)
    probs[0], probs[-1] = exact_cdf(GRID[0] + 1 / 255), 1 - exact_cdf(GRID[-1] - 1 / 255)
    torch.testing.assert_close(logp.exp(), probs, rtol=0, atol=4e-4)


def test_decoder_nll_vanishes_as_scale_shrinks() -> None:
    x = GRID[torch.tensor([0, 1, 100, 254, 255])]
    for log_scale in (-8.0, -12.0):
        logp = discretized_gaussian_log_likelihood(x, x.clone(), torch.tensor(log_scale, dtype=torch.float64))
        assert logp.abs().max() < 1e-9  # all the mass sits in the right bin
    # one bin off, with a tiny scale, the probability is clamped at 1e-12
    logp = discretized_gaussian_log_likelihood(x[2:3], x[2:3] + 2 / 255, torch.tensor(-12.0))
    assert logp.item() == pytest.approx(math.log(1e-12))


def test_decoder_shape_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(()))
    with pytest.raises(ValueError, match="does not broadcast"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4))


def test_vlb_term_selects_decoder_at_t0(cosine20: Schedule, gen: torch.Generator, grid_x0) -> None:
    s = cosine20
    x0 = grid_x0(4, 2, 3)
    t = torch.tensor([0, 3, 0, 19])
    x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    out = torch.randn(4, 4, 3, generator=gen, dtype=torch.float64)
    p = p_mean_variance(s, out, x_t, t, var_type="learned_range", clip_x0=False)
    got = vlb_term_bpd(s, x0, x_t, t, p)
    assert got.shape == (4,)
    for i in range(4):
        if t[i] == 0:
            # decoder NLL -log p(x0 | x1) with the discretised Gaussian, log_scale = log_var / 2
            ll = discretized_gaussian_log_likelihood(x0[i], p.mean[i], 0.5 * p.log_var[i])
            want = -ll.mean() / LN2
        else:
            q = q_posterior(s, x0, x_t, t)
            std_q, std_p = (0.5 * q.log_var[i]).exp(), (0.5 * p.log_var[i]).exp()
            want = kl_divergence(Normal(q.mean[i], std_q), Normal(p.mean[i], std_p)).mean() / LN2
        assert got[i].item() == pytest.approx(want.item(), rel=1e-12)


def test_vlb_term_zero_when_p_is_the_posterior(cosine20: Schedule, gen: torch.Generator, grid_x0) -> None:
    # true eps + fixed_small variance: p(x_{t-1}|x_t) = q(x_{t-1}|x_t,x0) exactly, so every KL term is 0
    s = cosine20
    x0, t = grid_x0(19, 2), torch.arange(1, 20)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = q_sample(s, x0, t, eps)
    p = p_mean_variance(s, eps, x_t, t, var_type="fixed_small", clip_x0=False)
    assert vlb_term_bpd(s, x0, x_t, t, p).abs().max() < 1e-9


def test_prior_bpd_closed_form(linear50: Schedule, grid_x0) -> None:
    s = linear50
    x0 = grid_x0(3, 2, 2)
    ab = s.alpha_bar[-1]
    want = kl_divergence(Normal(ab.sqrt() * x0, (1 - ab).sqrt()), Normal(0.0, 1.0)).mean((1, 2)) / LN2
    torch.testing.assert_close(prior_bpd(s, x0), want, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# training_losses
# ---------------------------------------------------------------------------------------------------------


class Fixed:
    """A 'model' returning a fixed (trainable) output and recording the timesteps it was shown."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out
        self.seen: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t_model: torch.Tensor, **kwargs) -> torch.Tensor:
        self.seen.append(t_model)
        return self.out


def _data(gen: torch.Generator, grid_x0, b: int = 4, c: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return grid_x0(b, c, 3), torch.randn(b, c, 3, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "xprev"])
def test_simple_loss_targets(cosine20: Schedule, gen: torch.Generator, grid_x0, mean_type: str) -> None:
    """A model that outputs the right target for its mean type has zero MSE."""
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([0, 5, 11, 19])

    def perfect(x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        if mean_type == "eps":
            return noise
        if mean_type == "x0":
            return x0
        # xprev: the Bayes posterior mean, from its textbook coefficients (paper Eq. 7)
        ab, ab_prev = s.alpha_bar[t][:, None, None], s.alpha_bar_prev[t][:, None, None]
        b, a = s.betas[t][:, None, None], s.alphas[t][:, None, None]
        return ab_prev.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t

    got = training_losses(
        s, perfect, x0, t, loss_type="simple", mean_type=mean_type, var_type="fixed_large", noise=noise
    )
    assert set(got) == {"loss", "mse"}
    assert got["loss"].abs().max() < 1e-24  # exactly 0 up to float64 rounding of the xprev coefficients
    # and a wrong output gives the mean-over-dims squared error against that target
    off = perfect(q_sample(s, x0, t, noise), t) + 0.5
    got = training_losses(
        s, Fixed(off), x0, t, loss_type="simple", mean_type=mean_type, var_type="fixed_small", noise=noise
    )
    torch.testing.assert_close(got["mse"], torch.full((4,), 0.25, dtype=torch.float64))


def test_hybrid_scaling_and_vlb_key(cosine20: Schedule, gen: torch.Generator, grid_x0) -> None:
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([0, 5, 11, 19])
    out = torch.randn(4, 4, 3, generator=gen, dtype=torch.float64)
    got = training_losses(s, Fixed(out), x0, t, noise=noise, vlb_weight=1e-3)
    assert set(got) == {"loss", "mse", "vlb"}
    torch.testing.assert_close(got["loss"], got["mse"] + 1e-3 * 20 * got["vlb"])
    # vlb is the unscaled L_t of the model's reverse step, computed without clipping x0
    x_t = q_sample(s, x0, t, noise)
    p = p_mean_variance(s, out, x_t, t, clip_x0=False)
    torch.testing.assert_close(got["vlb"], vlb_term_bpd(s, x0, x_t, t, p))
    torch.testing.assert_close(got["mse"], ((out[:, :2] - noise) ** 2).mean((1, 2)))


def test_hybrid_at_T4000_is_authors_rescaled_mse(gen: torch.Generator, grid_x0) -> None:
    # lambda * T = 1e-3 * 4000 = 4 = the authors' `vb *= num_timesteps / 1000`
    s = Schedule.named("cosine", 4000)
    x0, noise = _data(gen, grid_x0)
    out = torch.randn(4, 4, 3, generator=gen, dtype=torch.float64)
    got = training_losses(s, Fixed(out), x0, torch.tensor([0, 1, 2000, 3999]), noise=noise)
    torch.testing.assert_close(got["loss"] - got["mse"], 4000 / 1000 * got["vlb"])


def test_hybrid_vlb_gradient_reaches_only_the_variance(
    cosine20: Schedule, gen: torch.Generator, grid_x0
) -> None:
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([0, 5, 11, 19])
    out = torch.randn(4, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    got = training_losses(s, Fixed(out), x0, t, noise=noise)
    got["loss"].sum().backward()
    grad = out.grad
    # eps channels: exactly the MSE gradient d/d eps mean_flat((noise - eps)^2) = 2 (eps - noise) / D
    torch.testing.assert_close(grad[:, :2], 2 * (out[:, :2] - noise).detach() / 6, rtol=1e-12, atol=1e-15)
    # v channels: the gradient of lambda T L_t alone (MSE does not see v), and it is not zero
    v = out[:, 2:].detach().clone().requires_grad_(True)
    p = p_mean_variance(
        s, torch.cat([out[:, :2].detach(), v], 1), q_sample(s, x0, t, noise), t, clip_x0=False
    )
    (1e-3 * 20 * vlb_term_bpd(s, x0, q_sample(s, x0, t, noise), t, p)).sum().backward()
    torch.testing.assert_close(grad[:, 2:], v.grad)
    assert v.grad.abs().min() > 0


def test_vlb_loss_is_T_times_L_t_and_trains_the_mean(
    cosine20: Schedule, gen: torch.Generator, grid_x0
) -> None:
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([0, 5, 11, 19])
    out = torch.randn(4, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    got = training_losses(s, Fixed(out), x0, t, loss_type="vlb", noise=noise)
    assert set(got) == {"loss", "vlb"}
    torch.testing.assert_close(got["loss"], 20 * got["vlb"])
    got["loss"].sum().backward()
    assert out.grad[1:, :2].abs().sum() > 0  # unlike hybrid, the VLB trains the mean too (t >= 1 here)


def test_vlb_loss_with_fixed_variance(cosine20: Schedule, gen: torch.Generator, grid_x0) -> None:
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([1, 5, 11, 19])
    got = training_losses(s, Fixed(noise), x0, t, loss_type="vlb", var_type="fixed_small", noise=noise)
    assert got["vlb"].abs().max() < 1e-9  # the true eps with beta~ is the exact posterior (t >= 1)


def test_timesteps_the_model_sees(cosine20: Schedule, gen: torch.Generator, grid_x0) -> None:
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([0, 5, 11, 19])
    m = Fixed(torch.zeros(4, 4, 3, dtype=torch.float64))
    training_losses(s, m, x0, t, noise=noise, rescale_timesteps=True)
    training_losses(s, m, x0, t, noise=noise, rescale_timesteps=False)
    torch.testing.assert_close(m.seen[0], t.float() * 1000 / 20)
    assert m.seen[1].dtype == torch.int64 and torch.equal(m.seen[1], t)


def test_model_kwargs_and_generator(cosine20: Schedule, grid_x0) -> None:
    s = cosine20
    x0 = grid_x0(3, 1, 2)
    t = torch.tensor([0, 1, 2])

    def model(x_t: torch.Tensor, t_model: torch.Tensor, *, scale: float) -> torch.Tensor:
        return torch.cat([scale * x_t, torch.zeros_like(x_t)], 1)

    a = training_losses(
        s, model, x0, t, generator=torch.Generator().manual_seed(3), model_kwargs={"scale": 0.5}
    )
    b = training_losses(
        s, model, x0, t, generator=torch.Generator().manual_seed(3), model_kwargs={"scale": 0.5}
    )
    c = training_losses(
        s, model, x0, t, generator=torch.Generator().manual_seed(4), model_kwargs={"scale": 0.5}
    )
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    assert not torch.allclose(a["loss"], c["loss"])


def test_training_losses_errors(cosine20: Schedule, gen: torch.Generator, grid_x0) -> None:
    s = cosine20
    x0, noise = _data(gen, grid_x0)
    t = torch.tensor([0, 1, 2, 3])
    m = Fixed(torch.zeros(4, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="use loss_type='hybrid'|Use loss_type='hybrid'"):
        training_losses(s, m, x0, t, loss_type="simple", var_type="learned_range", noise=noise)
    with pytest.raises(ValueError, match="only trains a learned"):
        training_losses(s, m, x0, t, loss_type="hybrid", var_type="fixed_small", noise=noise)
    with pytest.raises(ValueError, match=r"unknown loss_type 'kl'.*\('simple', 'hybrid', 'vlb'\)"):
        training_losses(s, m, x0, t, loss_type="kl")
    with pytest.raises(ValueError, match="not both"):
        training_losses(s, m, x0, t, noise=noise, generator=gen)
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        training_losses(s, m, x0, t, noise=noise[:, :1])
    with pytest.raises(ValueError, match="B = len"):
        training_losses(s, m, x0[:3], t)
    with pytest.raises(ValueError, match=r"t must be in \[0, 20\)"):
        training_losses(s, m, x0, t + 17)
    with pytest.raises(ValueError, match="must output 2 channels"):
        training_losses(s, m, x0, t, loss_type="simple", var_type="fixed_small")
    assert LOSS_TYPES == ("simple", "hybrid", "vlb")


def test_data_outside_minus_one_one_is_refused(cosine20: Schedule) -> None:
    from iddpm.evaluate import bits_per_dim

    def model(x, t):
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)

    t = torch.tensor([1, 2])
    for x0 in (torch.full((2, 1, 4, 4), 255.0), torch.full((2, 1, 4, 4), 0.5).index_fill_(0, t[:1], -1.5)):
        with pytest.raises(ValueError, match=r"x0 must be data scaled to \[-1, 1\].*got values in"):
            training_losses(cosine20, model, x0, t)
        with pytest.raises(ValueError, match=r"x0 must be data scaled to \[-1, 1\]"):
            bits_per_dim(model, cosine20, x0)
    ok = torch.full((2, 1, 4, 4), 1.0)  # the ends of the range are data
    assert training_losses(cosine20, model, ok, t)["loss"].shape == (2,)


def test_a_model_with_the_wrong_output_says_so(cosine20: Schedule) -> None:
    x0 = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    cases = [
        (
            lambda x, t: (torch.zeros(2, 6, 4, 4),),
            TypeError,
            r"one tensor of shape \(B, 6, \.\.\.\).*a tuple of 1",
        ),
        (lambda x, t: torch.zeros(2, 6, 2, 2), ValueError, r"must be \(2, 6, 4, 4\)"),
        (lambda x, t: torch.zeros(1, 6, 4, 4), ValueError, r"must be \(2, 6, 4, 4\)"),
        (lambda x, t: torch.zeros(2, 3, 4, 4), ValueError, "must output 6 channels"),
    ]
    for model, kind, match in cases:
        with pytest.raises(kind, match=match):
            training_losses(cosine20, model, x0, t)
        with pytest.raises(kind, match=match):
            p_mean_variance(cosine20, model(x0, t), x0, t)
