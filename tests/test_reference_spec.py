"""The package against an independent float64 NumPy oracle of the authors' code (tests/reference_numpy.py).

The oracle was written from ``official-code-spec.md`` only, with the authors' names, and without the float32
cast of ``_extract_into_tensor``; here both run on the same seeded float64 inputs and must agree to ~1e-10.
Mapping of the loss names: authors' ``RESCALED_MSE`` == package ``hybrid`` with ``vlb_weight=1e-3``; authors'
plain ``MSE`` with a learned sigma == ``hybrid`` with ``vlb_weight=1/T``; with a fixed sigma == ``simple``;
``RESCALED_KL`` == package ``vlb`` (whose ``"vlb"`` term is the authors' plain ``KL`` loss). The package's
``bits_per_dim`` terms are in forward time order, the authors' ``calc_bpd_loop`` columns in reverse.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import reference_numpy as ref  # pytest (default "prepend" import mode) puts tests/ on sys.path
import torch

import iddpm

RTOL = 1e-10
ATOL = 1e-10
MEAN_TYPES = {"eps": "EPSILON", "x0": "START_X", "xprev": "PREVIOUS_X"}
VAR_TYPES = {
    "learned": "LEARNED",
    "learned_range": "LEARNED_RANGE",
    "fixed_large": "FIXED_LARGE",
    "fixed_small": "FIXED_SMALL",
}
LEARNED = ("learned", "learned_range")


def close(got, want, rtol=RTOL, atol=ATOL):
    if isinstance(got, torch.Tensor):
        got = got.detach().cpu().double().numpy()
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol)


def decoder_slack(x0, mean, log_var):
    """Per-example float64 noise floor (bits/dim) of the decoder NLL, from the oracle's bin probability P.

    ``0.5 (1 + tanh z)`` loses absolute precision ~1e-16 in the tails, so log P is only good to ~1e-16 / P
    (spec gotcha 9: the cancellation in ``cdf_plus - cdf_min``); equivalent float64 formulas differ that much.
    """
    c = x0 - mean
    inv = np.exp(-0.5 * np.broadcast_to(log_var, x0.shape))
    cdf_plus = ref.approx_standard_normal_cdf(inv * (c + 1 / 255))
    cdf_min = ref.approx_standard_normal_cdf(inv * (c - 1 / 255))
    prob = np.where(x0 < -0.999, cdf_plus, np.where(x0 > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
    return ref.mean_flat(4e-15 / np.maximum(prob, 1e-12)) / math.log(2)


def slack_at_t0(d, out, x0, x_t, t, clip):
    pm = d.p_mean_variance(out, x_t, t, clip_denoised=clip)
    return np.where(np.asarray(t) == 0, decoder_slack(x0, pm["mean"], pm["log_variance"]), 0.0)


def close_bpd(got, want, slack, rtol=1e-10, atol=1e-12):
    """``close`` plus an extra absolute slack per element (the decoder's float64 noise floor)."""
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    err = np.abs(got - want)
    bound = rtol * np.abs(want) + atol + slack
    assert (err <= bound).all(), (
        f"max excess {np.max(err - bound)} at {np.argmax(err - bound)}: {got} vs {want}"
    )


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def tidx(a):
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


@functools.cache
def _ref_betas(name, T):
    return ref.get_named_beta_schedule(name, T)


def ref_diffusion(name, T, kept=None, mean="eps", var="learned_range", loss="RESCALED_MSE"):
    betas = _ref_betas(name, T).copy()
    kw = dict(model_mean_type=MEAN_TYPES[mean], model_var_type=VAR_TYPES[var], loss_type=loss)
    if kept is None:
        return ref.GaussianDiffusion(betas, **kw)
    return ref.GaussianDiffusion.spaced(betas, kept, **kw)


@functools.cache
def _pkg_schedule(name, T, kept):
    s = iddpm.Schedule.named(name, T)
    return s if kept is None else iddpm.respace(s, list(kept))


def pkg_schedule(name, T, kept=None):
    return _pkg_schedule(name, T, None if kept is None else tuple(sorted(kept)))


# A deterministic "network": the same function of (x_t, original timestep k) in NumPy and torch.
def np_model(C, learned):
    def f(x, k):
        k = np.asarray(k, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        mean_part = 1.6 * np.sin(1.7 * x + 0.013 * k + 0.2)
        if not learned:
            return mean_part
        v = 1.3 * np.tanh(0.9 * x - 0.002 * k + 0.3)  # |v| up to 1.3: the range is not clamped
        return np.concatenate([mean_part, v], axis=1)

    return f


class TorchModel:
    """Recovers the original index ``k`` from what the package shows the model, and records it."""

    def __init__(self, C, learned, original_num_steps, rescale):
        self.f = np_model(C, learned)
        self.T0 = original_num_steps
        self.rescale = rescale
        self.seen = []

    def __call__(self, x, t_model):
        if self.rescale:
            assert t_model.is_floating_point()
            k = torch.round(t_model.double() * self.T0 / 1000).long()
            np.testing.assert_allclose(
                t_model.double().numpy(), k.double().numpy() * 1000 / self.T0, rtol=1e-6
            )
        else:
            assert not t_model.is_floating_point()
            k = t_model.long()
        self.seen.append(k.clone())
        return t64(self.f(x.detach().numpy(), k.numpy()))


def rand_x0(rng, shape):
    """Data on the 256-level grid, with both edge bins present."""
    x = rng.integers(0, 256, size=shape).astype(np.float64)
    x.flat[0], x.flat[1] = 0.0, 255.0
    return x / 127.5 - 1.0


def rand_t(rng, T, B):
    t = rng.integers(0, T, size=B)
    t[0], t[-1] = 0, T - 1
    if B > 2:
        t[1] = min(1, T - 1)
    return t


# ----------------------------------------------------------------------------------------------------
# 1-2. Schedules and precomputed arrays

SCHEDULES = [("cosine", 10), ("cosine", 16), ("linear", 50), ("cosine", 50), ("linear", 1000)]
SCHEDULES += [("cosine", 1000), ("linear", 4000), ("cosine", 4000)]

ARRAYS = {
    "betas": "betas",
    "alphas": "alphas",
    "alpha_bar": "alphas_cumprod",
    "alpha_bar_prev": "alphas_cumprod_prev",
    "alpha_bar_next": "alphas_cumprod_next",
    "sqrt_alpha_bar": "sqrt_alphas_cumprod",
    "sqrt_one_minus_alpha_bar": "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alpha_bar": "log_one_minus_alphas_cumprod",
    "sqrt_recip_alpha_bar": "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alpha_bar": "sqrt_recipm1_alphas_cumprod",
    "posterior_var": "posterior_variance",
    "posterior_log_var_clipped": "posterior_log_variance_clipped",
    "posterior_mean_coef1": "posterior_mean_coef1",
    "posterior_mean_coef2": "posterior_mean_coef2",
}


@pytest.mark.parametrize("name,T", SCHEDULES)
def test_schedule_arrays(name, T):
    d = ref_diffusion(name, T)
    s = iddpm.Schedule.named(name, T)
    assert s.num_steps == T and s.betas.dtype == torch.float64
    for pkg_name, ref_name in ARRAYS.items():
        close(getattr(s, pkg_name), getattr(d, ref_name), rtol=1e-12, atol=0)
    close(s.timesteps, np.arange(T), rtol=0, atol=0)
    assert s.posterior_var[0].item() == 0.0  # only the log is clipped
    assert s.posterior_log_var_clipped[0].item() == pytest.approx(
        math.log(d.posterior_variance[1]), rel=1e-14
    )


def test_schedule_worked_values():
    c = ref.get_named_beta_schedule("cosine", 1000)
    pc = iddpm.Schedule.named("cosine", 1000)
    for betas, ab in ((c, np.cumprod(1 - c)), (pc.betas.numpy(), pc.alpha_bar.numpy())):
        assert betas[0] == pytest.approx(4.1284e-05, rel=1e-4)
        assert betas[-2] == pytest.approx(0.74999939, rel=1e-7)
        assert betas[-1] == 0.999
        assert ab[-1] == pytest.approx(2.43e-09, rel=1e-2)
        assert betas.sum() == pytest.approx(12.4415, abs=1e-4)
    for T in (10, 16, 20, 50, 1000, 4000):  # only the last cosine beta hits the clip
        b = iddpm.Schedule.named("cosine", T).betas.numpy()
        assert b[-1] == 0.999 and (b[:-1] < 0.999).all()
        close(b, ref.get_named_beta_schedule("cosine", T), rtol=1e-12, atol=0)
    assert iddpm.Schedule.named("linear", 1000).betas.sum().item() == pytest.approx(10.05, rel=1e-12)
    assert iddpm.Schedule.named("cosine", 4000).betas.sum().item() == pytest.approx(15.2104, abs=1e-4)
    close(ref.get_named_beta_schedule("linear", 4000)[[0, -1]], [2.5e-5, 5e-3], rtol=1e-14, atol=0)
    assert ref.get_named_beta_schedule("linear", 1000).sum() == pytest.approx(10.05, rel=1e-12)
    assert ref.get_named_beta_schedule("cosine", 4000).sum() == pytest.approx(15.2104, abs=1e-4)
    lin4000 = iddpm.Schedule.named("linear", 4000).betas
    assert lin4000[0].item() == pytest.approx(2.5e-5, rel=1e-14)
    assert lin4000[-1].item() == pytest.approx(5e-3, rel=1e-14)
    lin1000 = iddpm.Schedule.named("linear", 1000).betas
    assert (lin1000[0].item(), lin1000[-1].item()) == (pytest.approx(1e-4), pytest.approx(0.02))


# ----------------------------------------------------------------------------------------------------
# 11. space_timesteps and respacing

SPACINGS = [
    (1000, "ddim50"),
    (1000, "ddim10"),
    (6, "3"),
    (16, "15"),
    (300, "10,15,20"),
    (1000, "25,25"),
    (1000, "10"),
    (4000, "100"),
    (4000, "250"),
    (50, "7,3,1"),
    (1000, [1, 2, 3]),
    (100, "ddim25"),
    (10, "10"),
]


@pytest.mark.parametrize("T,sections", SPACINGS)
def test_space_timesteps(T, sections):
    assert iddpm.space_timesteps(T, sections) == sorted(ref.space_timesteps(T, sections))


def test_space_timesteps_worked_examples():
    assert iddpm.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert iddpm.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert iddpm.space_timesteps(6, "3") == [0, 2, 5] == sorted(ref.space_timesteps(6, "3"))
    assert sorted(ref.space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    k = iddpm.space_timesteps(1000, "10")
    assert k[:2] == [0, 111] and k[-1] == 999 and len(k) == 10
    k = iddpm.space_timesteps(1000, "25,25")
    assert k[:4] == [0, 21, 42, 62] and k[-2:] == [978, 999] and len(k) == 50
    k = iddpm.space_timesteps(4000, "100")
    assert k[:4] == [0, 40, 81, 121] and k[-2:] == [3959, 3999]
    # i*stride / round-half-up would differ from the accumulated-float banker's rounding here
    for T, sec in ((16, "15"), (300, "10,15,20")):
        assert iddpm.space_timesteps(T, sec) == sorted(ref.space_timesteps(T, sec))


RESPACED = [
    ("cosine", 1000, "ddim50"),
    ("cosine", 4000, "100"),
    ("linear", 1000, "25,25"),
    ("cosine", 50, "7"),
]


@pytest.mark.parametrize("name,T,sections", RESPACED)
def test_respaced_arrays(name, T, sections):
    kept = ref.space_timesteps(T, sections)
    d = ref_diffusion(name, T, kept)
    s = pkg_schedule(name, T, kept)
    assert s.num_steps == len(kept) and s.original_num_steps == T
    close(s.timesteps, d.timestep_map, rtol=0, atol=0)
    for pkg_name, ref_name in ARRAYS.items():
        close(getattr(s, pkg_name), getattr(d, ref_name), rtol=1e-11, atol=0)
    close(s.alpha_bar, ref_diffusion(name, T).alphas_cumprod[d.timestep_map], rtol=1e-10, atol=0)


def test_model_sees_original_timesteps():
    kept = ref.space_timesteps(4000, "100")
    s = pkg_schedule("cosine", 4000, kept)
    t = tidx([0, 1, 50, 99])
    want = np.array(sorted(kept))[[0, 1, 50, 99]]
    close(s.model_timesteps(t, False), want, rtol=0, atol=0)
    assert s.model_timesteps(t, True).dtype == torch.float32
    close(s.model_timesteps(t, True), want * 1000 / 4000, rtol=1e-7, atol=0)


# ----------------------------------------------------------------------------------------------------
# 3-5. Forward process, posterior, reverse process

CASES = [("cosine", 1000, None), ("linear", 50, None), ("cosine", 4000, "ddim50"), ("cosine", 16, None)]


def _setup(name, T, sections, seed, C=3, B=7):
    rng = np.random.default_rng(seed)
    kept = None if sections is None else ref.space_timesteps(T, sections)
    K = T if kept is None else len(kept)
    x0 = rand_x0(rng, (B, C, 4, 4))
    t = rand_t(rng, K, B)
    noise = rng.standard_normal(x0.shape)
    return rng, kept, x0, t, noise


@pytest.mark.parametrize("name,T,sections", CASES)
def test_q_sample_and_posterior(name, T, sections):
    rng, kept, x0, t, noise = _setup(name, T, sections, 1)
    d = ref_diffusion(name, T, kept)
    s = pkg_schedule(name, T, kept)
    x_t = d.q_sample(x0, t, noise)
    close(iddpm.q_sample(s, t64(x0), tidx(t), t64(noise)), x_t)
    qm = iddpm.q_mean_variance(s, t64(x0), tidx(t))
    for got, want in zip(qm, d.q_mean_variance(x0, t), strict=True):
        close(torch.broadcast_to(got, x0.shape), want)
    post = iddpm.q_posterior(s, t64(x0), t64(x_t), tidx(t))
    m, v, lv = d.q_posterior_mean_variance(x0, x_t, t)
    close(post.mean, m)
    close(torch.broadcast_to(post.var, x0.shape), v, atol=0)
    close(torch.broadcast_to(post.log_var, x0.shape), lv)
    assert (torch.broadcast_to(post.var, x0.shape)[0] == 0).all()  # t=0: plain variance is 0


@pytest.mark.parametrize("name,T,sections", CASES)
@pytest.mark.parametrize("mean", list(MEAN_TYPES))
@pytest.mark.parametrize("var", list(VAR_TYPES))
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance(name, T, sections, mean, var, clip):
    rng, kept, x0, t, noise = _setup(name, T, sections, 2)
    d = ref_diffusion(name, T, kept, mean=mean, var=var)
    s = pkg_schedule(name, T, kept)
    x_t = d.q_sample(x0, t, noise)
    out = np_model(x0.shape[1], var in LEARNED)(x_t, d.model_timesteps(t))
    want = d.p_mean_variance(out, x_t, t, clip_denoised=clip)
    got = iddpm.p_mean_variance(s, t64(out), t64(x_t), tidx(t), mean_type=mean, var_type=var, clip_x0=clip)
    close(got.pred_x0, want["pred_xstart"])
    close(got.mean, want["mean"])
    close(torch.broadcast_to(got.log_var, x0.shape), want["log_variance"])
    close(torch.broadcast_to(got.var, x0.shape), want["variance"], atol=0)
    if clip:
        assert got.pred_x0.abs().max() <= 1.0


@pytest.mark.parametrize("mean", ["eps", "x0", "xprev"])
def test_p_mean_variance_denoised_fn(mean):
    """``denoised_fn`` is applied to x0 first, then the clamp (spec section 5)."""
    rng, kept, x0, t, noise = _setup("cosine", 50, None, 10)
    d = ref_diffusion("cosine", 50, mean=mean, var="learned_range")
    s = pkg_schedule("cosine", 50)
    x_t = d.q_sample(x0, t, noise)
    out = np_model(x0.shape[1], True)(x_t, d.model_timesteps(t))
    want = d.p_mean_variance(out, x_t, t, clip_denoised=True, denoised_fn=lambda z: 0.3 * z**3 + 0.5)
    got = iddpm.p_mean_variance(
        s,
        t64(out),
        t64(x_t),
        tidx(t),
        mean_type=mean,
        var_type="learned_range",
        denoised_fn=lambda z: 0.3 * z**3 + 0.5,
    )
    close(got.pred_x0, want["pred_xstart"])
    close(got.mean, want["mean"])


@pytest.mark.parametrize("kept", [None, "ddim10"])
def test_t0_variances(kept):
    """t=0: clipped log var; FIXED_LARGE uses beta~[1]; LEARNED_RANGE spans log beta~[1] .. log beta[0]."""
    T = 1000
    kept = None if kept is None else ref.space_timesteps(T, kept)
    s = pkg_schedule("cosine", T, kept)
    betas = s.betas.numpy()
    pv1 = (betas[1] * (1 - s.alpha_bar[0].item()) / (1 - s.alpha_bar[1].item())).item()
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    eps = torch.zeros_like(x)
    v = t64(np.array([-1.0, 1.0, 0.0]).reshape(3, 1, 1, 1))
    lr = iddpm.p_mean_variance(s, torch.cat([eps, v], 1), x, t, var_type="learned_range", clip_x0=False)
    close(
        lr.log_var.flatten(), [math.log(pv1), math.log(betas[0]), 0.5 * (math.log(pv1) + math.log(betas[0]))]
    )
    fl = iddpm.p_mean_variance(s, eps, x, t, var_type="fixed_large", clip_x0=False)
    close(torch.broadcast_to(fl.var, x.shape).flatten(), [pv1] * 3, rtol=1e-13, atol=0)
    fs = iddpm.p_mean_variance(s, eps, x, t, var_type="fixed_small", clip_x0=False)
    close(torch.broadcast_to(fs.var, x.shape).flatten(), [0.0] * 3, atol=0)
    close(torch.broadcast_to(fs.log_var, x.shape).flatten(), [math.log(pv1)] * 3)
    # respaced LEARNED_RANGE at t>0 uses the respaced beta', not the original chain's beta
    if kept is not None:
        t1 = torch.full((3,), 3, dtype=torch.long)
        lr = iddpm.p_mean_variance(s, torch.cat([eps, v], 1), x, t1, var_type="learned_range", clip_x0=False)
        d = ref_diffusion("cosine", T, kept)
        assert lr.log_var.flatten()[1].item() == pytest.approx(math.log(d.betas[3]), rel=1e-12)
        assert d.betas[3] > ref.get_named_beta_schedule("cosine", T)[d.timestep_map[3]] * 10


# ----------------------------------------------------------------------------------------------------
# 6. Likelihood primitives


def test_normal_kl_cdf_dgll():
    rng = np.random.default_rng(3)
    a = [rng.standard_normal((5, 2, 3, 3)) * sc for sc in (1.0, 2.0, 1.0, 2.0)]
    close(iddpm.normal_kl(*map(t64, a)), ref.normal_kl(*a))
    close(iddpm.normal_kl(t64(a[0]), t64(a[1]), 0.0, 0.0), ref.normal_kl(a[0], a[1], 0.0, 0.0))
    z = np.linspace(-6, 6, 1001)
    close(iddpm.approx_standard_normal_cdf(t64(z)), ref.approx_standard_normal_cdf(z), atol=1e-15)
    x = rand_x0(rng, (6, 3, 8, 8))
    for log_scale in (-6.0, -3.0, -1.0, 0.0):
        means = x + 0.02 * rng.standard_normal(x.shape) * math.exp(log_scale + 3)
        ls = np.full(x.shape, log_scale) + 0.1 * rng.standard_normal(x.shape)
        want = ref.discretized_gaussian_log_likelihood(x, means, ls)
        close(
            iddpm.discretized_gaussian_log_likelihood(t64(x), t64(means), t64(ls)), want, rtol=1e-9, atol=1e-9
        )
    # far tails hit the 1e-12 floor
    far = ref.discretized_gaussian_log_likelihood(x, x + 0.5, np.full(x.shape, -6.0))
    got = iddpm.discretized_gaussian_log_likelihood(t64(x), t64(x + 0.5), t64(np.full(x.shape, -6.0)))
    close(got, far)
    assert np.isclose(far.min(), math.log(1e-12))


# ----------------------------------------------------------------------------------------------------
# 7-8. VLB terms and training losses


@pytest.mark.parametrize("name,T,sections", CASES)
@pytest.mark.parametrize("mean", list(MEAN_TYPES))
@pytest.mark.parametrize("var", list(VAR_TYPES))
def test_vlb_term_and_prior(name, T, sections, mean, var):
    rng, kept, x0, t, noise = _setup(name, T, sections, 4)
    d = ref_diffusion(name, T, kept, mean=mean, var=var)
    s = pkg_schedule(name, T, kept)
    x_t = d.q_sample(x0, t, noise)
    out = np_model(x0.shape[1], var in LEARNED)(x_t, d.model_timesteps(t))
    for clip in (True, False):
        want = d._vb_terms_bpd(out, x0, x_t, t, clip_denoised=clip)["output"]
        p = iddpm.p_mean_variance(s, t64(out), t64(x_t), tidx(t), mean_type=mean, var_type=var, clip_x0=clip)
        slack = slack_at_t0(d, out, x0, x_t, t, clip)
        close_bpd(iddpm.vlb_term_bpd(s, t64(x0), t64(x_t), tidx(t), p), want, slack)
    close(iddpm.prior_bpd(s, t64(x0)), d._prior_bpd(x0))


LOSS_CASES = [
    # (package loss_type, vlb_weight or None for 1/T, authors' loss type, var types)
    ("hybrid", 1e-3, "RESCALED_MSE", LEARNED),
    ("hybrid", None, "MSE", LEARNED),
    ("simple", 1e-3, "MSE", ("fixed_small", "fixed_large")),
    ("vlb", 1e-3, "RESCALED_KL", tuple(VAR_TYPES)),
]


@pytest.mark.parametrize("name,T,sections", CASES)
@pytest.mark.parametrize("loss_type,vlb_weight,ref_loss,var_types", LOSS_CASES)
@pytest.mark.parametrize("mean", list(MEAN_TYPES))
@pytest.mark.parametrize("rescale", [True, False])
def test_training_losses(name, T, sections, loss_type, vlb_weight, ref_loss, var_types, mean, rescale):
    rng, kept, x0, t, noise = _setup(name, T, sections, 5)
    s = pkg_schedule(name, T, kept)
    for var in var_types:
        d = ref_diffusion(name, T, kept, mean=mean, var=var, loss=ref_loss)
        learned = var in LEARNED
        want = d.training_losses(np_model(x0.shape[1], learned), x0, t, noise)
        model = TorchModel(x0.shape[1], learned, T, rescale)
        w = 1.0 / s.num_steps if vlb_weight is None else vlb_weight
        got = iddpm.training_losses(
            s, model, t64(x0), tidx(t), loss_type=loss_type, mean_type=mean, var_type=var, vlb_weight=w,
            rescale_timesteps=rescale, noise=t64(noise),
        )  # fmt: skip
        close(model.seen[0], d.model_timesteps(t), rtol=0, atol=0)
        x_t = d.q_sample(x0, t, noise)
        slack = slack_at_t0(d, np_model(x0.shape[1], learned)(x_t, d.model_timesteps(t)), x0, x_t, t, False)
        scale = {"RESCALED_MSE": d.num_timesteps / 1000, "MSE": 1.0, "RESCALED_KL": d.num_timesteps}[ref_loss]
        close_bpd(got["loss"], want["loss"], slack * scale)
        if "mse" in want:
            close(got["mse"], want["mse"])
            assert ("vlb" in got) == ("vb" in want)
        if loss_type == "hybrid":
            close_bpd(got["vlb"] * scale, want["vb"], slack * scale)
        if loss_type == "vlb":
            kl = ref_diffusion(name, T, kept, mean=mean, var=var, loss="KL")
            close_bpd(
                got["vlb"], kl.training_losses(np_model(x0.shape[1], learned), x0, t, noise)["loss"], slack
            )


def test_hybrid_frozen_mean_gradient():
    """The VLB part of L_hybrid reaches only the variance channels (stop-gradient on the mean)."""
    rng, kept, x0, t, noise = _setup("cosine", 50, None, 6)
    out = torch.zeros(x0.shape[0], 6, 4, 4, dtype=torch.float64, requires_grad=True)

    def model(x, tm):
        return out + 0.0

    s = pkg_schedule("cosine", 50)
    loss = iddpm.training_losses(s, model, t64(x0), tidx(t), loss_type="hybrid", noise=t64(noise))
    (g_vlb,) = torch.autograd.grad(loss["vlb"].sum(), out, retain_graph=True)
    assert (g_vlb[:, :3] == 0).all() and g_vlb[:, 3:].abs().sum() > 0
    (g_mse,) = torch.autograd.grad(loss["mse"].sum(), out)
    assert (g_mse[:, 3:] == 0).all()


# ----------------------------------------------------------------------------------------------------
# 9. Likelihood evaluation


@pytest.mark.parametrize(
    "name,T,sections,mean,var",
    [
        ("cosine", 10, None, "eps", "learned_range"),
        ("linear", 50, None, "x0", "fixed_large"),
        ("cosine", 16, None, "xprev", "learned"),
        ("cosine", 1000, "ddim10", "eps", "learned_range"),
        ("cosine", 50, "7", "eps", "fixed_small"),
    ],
)
@pytest.mark.parametrize("clip", [True, False])
def test_bits_per_dim(name, T, sections, mean, var, clip):
    rng, kept, x0, t, _ = _setup(name, T, sections, 7, B=4)
    d = ref_diffusion(name, T, kept, mean=mean, var=var)
    noises = {k: rng.standard_normal(x0.shape) for k in range(d.num_timesteps)}
    want = d.calc_bpd_loop(np_model(x0.shape[1], var in LEARNED), x0, noises.__getitem__, clip_denoised=clip)
    s = pkg_schedule(name, T, kept)
    model = TorchModel(x0.shape[1], var in LEARNED, T, True)
    got = iddpm.bits_per_dim(
        model, s, t64(x0), mean_type=mean, var_type=var, clip_x0=clip, noise_fn=lambda k: t64(noises[int(k)])
    )
    t0 = np.zeros(x0.shape[0], dtype=np.int64)
    x_1 = d.q_sample(x0, t0, noises[0])
    slack = slack_at_t0(
        d, np_model(x0.shape[1], var in LEARNED)(x_1, d.model_timesteps(t0)), x0, x_1, t0, clip
    )
    terms = got.terms.flip(1)  # package: forward order; authors' calc_bpd_loop: reverse (column k is t=T-1-k)
    close(terms[:, :-1], want["vb"][:, :-1])
    close_bpd(terms[:, -1], want["vb"][:, -1], slack)
    close(got.x0_mse.flip(1), want["xstart_mse"])
    close(got.eps_mse.flip(1), want["mse"])
    close(got.prior, want["prior_bpd"])
    close_bpd(got.total, want["total_bpd"], slack)


# ----------------------------------------------------------------------------------------------------
# 10. Sampling


@pytest.mark.parametrize(
    "name,T,sections,mean,var,method,eta",
    [
        ("cosine", 16, None, "eps", "learned_range", "ancestral", 0.0),
        ("linear", 50, "10", "x0", "fixed_large", "ancestral", 0.0),
        ("cosine", 50, None, "xprev", "fixed_small", "ancestral", 0.0),
        ("cosine", 1000, "ddim10", "eps", "learned", "ancestral", 0.0),
        ("cosine", 1000, "ddim10", "eps", "learned_range", "ddim", 0.0),
        ("cosine", 16, None, "x0", "fixed_small", "ddim", 0.0),
        ("cosine", 16, None, "eps", "fixed_large", "ddim", 0.7),
        ("linear", 1000, "ddim25", "eps", "learned_range", "ddim", 1.0),
    ],
)
def test_sampling_chain(name, T, sections, mean, var, method, eta):
    """Every step of the package's chain equals the authors' p_sample / ddim_sample on the same noise."""
    kept = None if sections is None else ref.space_timesteps(T, sections)
    d = ref_diffusion(name, T, kept, mean=mean, var=var)
    s = pkg_schedule(name, T, kept)
    shape = (3, 2, 4, 4)
    x_T = np.random.default_rng(8).standard_normal(shape) * 1.5
    model = TorchModel(shape[1], var in LEARNED, T, True)
    gen = torch.Generator().manual_seed(123)
    steps = list(
        iddpm.sample_progressive(
            model, s, shape, method=method, eta=eta, mean_type=mean, var_type=var, noise=t64(x_T),
            generator=gen, dtype=torch.float64, rescale_timesteps=True,
        )
    )  # fmt: skip
    assert [st.t for st in steps] == list(range(d.num_timesteps))[::-1]
    # the per-step noise the package drew: one standard normal of the sample's shape per step, in order
    replay = torch.Generator().manual_seed(123)
    stochastic = method == "ancestral" or eta > 0
    x = x_T
    f = np_model(shape[1], var in LEARNED)
    for i, st in enumerate(steps):
        t = np.full(shape[0], st.t)
        close(model.seen[i], d.model_timesteps(t), rtol=0, atol=0)
        z = (
            torch.randn(shape, generator=replay, dtype=torch.float64).numpy()
            if stochastic
            else np.zeros(shape)
        )
        if method == "ancestral":
            want = d.p_sample(f(x, d.model_timesteps(t)), x, t, z)
        else:
            want = d.ddim_sample(f(x, d.model_timesteps(t)), x, t, z, eta=eta)
        close(st.pred_x0, want["pred_xstart"], rtol=1e-9, atol=1e-9)
        close(st.x_t, want["sample"], rtol=1e-9, atol=1e-9)
        x = st.x_t.numpy()


# ----------------------------------------------------------------------------------------------------
# 12. Loss-second-moment sampler


@pytest.mark.parametrize("T", [10, 50])
def test_loss_second_moment_weights(T):
    rng = np.random.default_rng(9)
    pkg = iddpm.LossSecondMomentSampler(T)
    orc = ref.LossSecondMomentResampler(T)
    for step in range(200):
        ts = rng.integers(0, T, size=16)
        losses = rng.gamma(2.0, 1.0 + ts / T, size=16)
        pkg.update(tidx(ts), t64(losses))
        orc.update_with_all_losses(ts, losses)
        w = pkg.weights()
        if not orc._warmed_up():
            close(w, np.ones(T), rtol=0, atol=0)  # uniform until every t has 10 losses
        else:
            close(w, orc.weights(), rtol=1e-12, atol=1e-15)
            close(w.sum(), 1.0, rtol=1e-12)
        if step == 199:
            assert orc._warmed_up()
    # ScheduleSampler.sample: t ~ p, loss weight 1 / (T p_t)
    t, w = pkg.sample(256, "cpu", generator=torch.Generator().manual_seed(0))
    close(w, 1.0 / (T * orc.sample_probs()[t.numpy()]), rtol=1e-6, atol=0)
