"""Likelihood primitives, the terms of the variational bound, and the training losses.

Every loss here is a **per-dimension average** (``mean_flat`` over all non-batch dims), and the bound's
terms are in **bits per dimension** (nats / ln 2), exactly as in the authors' code, so numbers are comparable
with the paper's tables.

The bound, with 0-based ``t`` (index 0 is the paper's step 1)::

    L_vlb = L_prior + sum_{t=0}^{T-1} L_t
    L_t   = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      for t >= 1
    L_0   = -log p(x_0 | x_1)   (discretised Gaussian decoder)   at  t = 0
    L_prior = KL(q(x_T | x_0) || N(0, I))

Chapter: book/04_variational_bound
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from einops import reduce
from torch import Tensor

from .diffusion import (
    LEARNED_VAR_TYPES,
    MeanType,
    PMeanVar,
    VarType,
    check_data_range,
    check_mean_type,
    check_var_type,
    p_mean_variance,
    q_mean_variance,
    q_posterior,
    q_sample,
    split_model_output,
)
from .schedules import Schedule

__all__ = [
    "LOSS_TYPES",
    "LossType",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "prior_bpd",
    "training_losses",
    "vlb_term_bpd",
]

LossType = Literal["simple", "hybrid", "vlb"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)

_LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    if x.ndim == 0:
        raise ValueError("mean_flat needs a tensor with a batch dimension, got a scalar")
    if x.ndim == 1:
        return x
    return reduce(x, "b ... -> b", "mean")


def normal_kl(
    mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float
) -> Tensor:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))``, elementwise, in nats.

    ``0.5 (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)^2 exp(-lv2))``. Taking log-variances keeps it finite
    where a variance underflows. Arguments broadcast; python floats are allowed (e.g. ``0.0`` for N(0, 1)),
    but at least one argument must be a tensor (it sets the dtype and device).
    """
    args = (mean1, logvar1, mean2, logvar2)
    ref = next((a for a in args if isinstance(a, Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument (the others may be python floats)")
    m1, lv1, m2, lv2 = (
        a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=ref.dtype, device=ref.device) for a in args
    )
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF: ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    It differs from the exact ``0.5 (1 + erf(x / sqrt(2)))`` by up to about 1.8e-4 (near ``|x| = 1.24`` and
    ``|x| = 2.59``). We keep it on purpose: it is what the authors' code uses for the decoder term ``L_0``, so
    our bits/dim match theirs to the last digit instead of being off by a (tiny) systematic amount.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood, in nats, of 8-bit data under a Gaussian discretised to 256 bins (Ho et al., 2020).

    Pixel values ``0..255`` map to ``x = k / 127.5 - 1`` in ``[-1, 1]``: bin centres are ``2/255`` apart, so
    each bin is ``x +- 1/255``. The two edge bins (``x < -0.999`` and ``x > 0.999``) extend to ``-inf`` and
    ``+inf`` so that the 256 probabilities sum to one. Probabilities are clamped at ``1e-12`` before the log.

    Args:
        x: ``(B, C, ...)`` data on the 256-level grid of ``[-1, 1]``.
        means: the Gaussian means, same shape as ``x``.
        log_scales: log standard deviations (``0.5 * log_var``), broadcastable to ``x``.

    Returns:
        ``(B, C, ...)`` elementwise log-probabilities (<= 0).
    """
    if x.shape != means.shape:
        raise ValueError(
            f"x and means must have the same shape; got {tuple(x.shape)} and {tuple(means.shape)}"
        )
    try:
        torch.broadcast_shapes(log_scales.shape, x.shape)
    except RuntimeError as err:
        raise ValueError(
            f"log_scales of shape {tuple(log_scales.shape)} does not broadcast to x of shape {tuple(x.shape)}"
        ) from err
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # left edge bin: P(X < x + 1/255)
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # right edge bin: P(X > x - 1/255)
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def vlb_term_bpd(s: Schedule, x0: Tensor, x_t: Tensor, t: Tensor, p: PMeanVar) -> Tensor:
    """One term ``L_t`` of the variational bound, in bits per dimension.

    * ``t >= 1``: ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``, the posterior taken with
      its clipped log-variance.
    * ``t = 0``: the decoder NLL ``-log p(x_0 | x_1)`` under the discretised Gaussian with mean
      ``p.mean`` and ``log_scale = 0.5 p.log_var``.

    Both are computed for every example and selected with ``torch.where`` (a batch mixes timesteps).

    Args:
        s: the schedule.
        x0: ``(B, C, ...)`` clean data in ``[-1, 1]`` (on the 256-level grid for the decoder term).
        x_t: ``(B, C, ...)`` the noisy sample the model saw.
        t: ``(B,)`` int64 in ``[0, T)``.
        p: the model's reverse step at ``(x_t, t)``, from :func:`~iddpm.diffusion.p_mean_variance`.

    Returns:
        ``(B,)`` bits/dim.
    """
    q = q_posterior(s, x0, x_t, t)
    kl = mean_flat(normal_kl(q.mean, q.log_var, p.mean, p.log_var)) / _LN2
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_var)) / _LN2
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)


def prior_bpd(s: Schedule, x0: Tensor) -> Tensor:
    """``L_prior = KL(q(x_T | x_0) || N(0, I))`` in bits/dim, at the last index of ``s``.

    It has no trainable parameter: it measures how far the chain's end is from pure noise (≈ 0 for the cosine
    schedule, whose ``abar`` ends near 2e-9).

    Args:
        s: the schedule (a respaced one ends at the same ``abar`` as its original chain).
        x0: ``(B, C, ...)`` clean data.

    Returns:
        ``(B,)`` bits/dim.
    """
    t = torch.full((x0.shape[0],), s.num_steps - 1, dtype=torch.int64, device=x0.device)
    q = q_mean_variance(s, x0, t)
    return mean_flat(normal_kl(q.mean, q.log_var, 0.0, 0.0).expand_as(x0)) / _LN2


def training_losses(
    s: Schedule,
    model: Callable[..., Tensor],
    x0: Tensor,
    t: Tensor,
    *,
    loss_type: LossType = "hybrid",
    mean_type: MeanType = "eps",
    var_type: VarType = "learned_range",
    vlb_weight: float = 1e-3,
    rescale_timesteps: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Per-example training losses at timesteps ``t`` (not reduced over the batch).

    The model is called once: ``out = model(x_t, s.model_timesteps(t, rescale_timesteps), **model_kwargs)``
    with ``x_t = q_sample(s, x0, t, noise)``.

    * ``"simple"`` (Ho et al.): ``L_simple = mean_flat((target - out)^2)``, target = ``noise`` (``mean_type=
      "eps"``), ``x0`` (``"x0"``) or the posterior mean ``mu~_t`` (``"xprev"``). Only for a fixed variance:
      with a learned one, ``L_simple`` leaves the variance channels untrained, so it raises (use
      ``"hybrid"``).
    * ``"hybrid"`` (paper Sec. 3.1, Eq. 16): ``L_hybrid = L_simple + lambda * T * L_t`` with ``lambda =
      vlb_weight`` (0.001 in the paper). ``T * L_t`` is the single-sample estimate of ``L_vlb = sum_t L_t``
      under uniform ``t``, hence the factor T. With lambda = 0.001 and T = 4000 this is ``mse + 4 * L_t``,
      exactly the authors' ``RESCALED_MSE`` (``vb *= num_timesteps / 1000``). ``L_t`` is computed
      from ``cat([mean_part.detach(), v])`` with ``clip_x0=False``: the stop-gradient on the mean means the
      VLB trains only the variance, and ``L_simple`` alone trains the mean. Needs a learned variance.
    * ``"vlb"``: ``T * L_t`` (the authors' ``RESCALED_KL``), an unbiased single-sample estimate of the whole
      bound (minus ``L_prior``) under uniform ``t``; gradients flow into mean and variance.

    Args:
        s: the schedule (T = ``s.num_steps``).
        model: any callable ``model(x_t, t_model, **model_kwargs) -> (B, C_out, ...)``.
        x0: ``(B, C, ...)`` clean data in ``[-1, 1]``.
        t: ``(B,)`` int64 in ``[0, T)``.
        loss_type: one of :data:`LOSS_TYPES`.
        mean_type, var_type: the parameterisation (see :func:`~iddpm.diffusion.p_mean_variance`).
        vlb_weight: lambda of ``L_hybrid``.
        rescale_timesteps: show the model ``t * 1000 / T_orig`` (float) instead of the integer index.
        noise: the ``eps`` of ``q_sample``, ``x0``'s shape. If None it is drawn with ``torch.randn`` from
            ``generator`` (the global RNG if ``generator`` is None). Give one or the other, not both.
        generator: a ``torch.Generator`` on ``x0``'s device for the noise.
        model_kwargs: extra keyword arguments for the model (e.g. ``y`` class labels).

    Returns:
        dict of ``(B,)`` tensors: ``"loss"`` always; ``"mse"`` (for ``"simple"``/``"hybrid"``) and ``"vlb"``
        (for ``"hybrid"``/``"vlb"``: the **unscaled** ``L_t`` in bits/dim) when computed.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    check_mean_type(mean_type)
    check_var_type(var_type)
    learned = var_type in LEARNED_VAR_TYPES
    if loss_type == "simple" and learned:
        raise ValueError(
            f"loss_type='simple' with var_type={var_type!r}: the simple MSE never trains the variance "
            "channels. "
            "Use loss_type='hybrid' (or 'vlb') to learn the variance, or a fixed var_type "
            "('fixed_small', 'fixed_large') with 'simple'."
        )
    if loss_type == "hybrid" and not learned:
        raise ValueError(
            f"loss_type='hybrid' with var_type={var_type!r}: the VLB part of L_hybrid only trains a learned "
            "variance (the mean is stop-gradiented there), so it would add nothing. Use loss_type='simple', "
            "or var_type='learned_range'."
        )
    s.check_t(t)
    if x0.ndim < 2 or x0.shape[0] != t.shape[0]:
        raise ValueError(
            f"x0 must have shape (B, C, ...) with B = len(t) = {t.shape[0]}; "
            f"got x0 of shape {tuple(x0.shape)}"
        )
    check_data_range(x0)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif generator is not None:
        raise ValueError("give either noise or generator, not both (the generator would be unused)")
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")

    x_t = q_sample(s, x0, t, noise)
    out = model(x_t, s.model_timesteps(t, rescale_timesteps), **(model_kwargs or {}))
    mean_part, v = split_model_output(out, x0.shape[1], var_type, like=x0)
    num_steps = s.num_steps
    terms: dict[str, Tensor] = {}

    if loss_type == "vlb":
        p = p_mean_variance(s, out, x_t, t, mean_type=mean_type, var_type=var_type, clip_x0=False)
        terms["vlb"] = vlb_term_bpd(s, x0, x_t, t, p)
        terms["loss"] = num_steps * terms["vlb"]
        return terms

    if mean_type == "eps":
        target = noise
    elif mean_type == "x0":
        target = x0
    else:
        target = q_posterior(s, x0, x_t, t).mean
    terms["mse"] = mean_flat((target - mean_part) ** 2)

    if loss_type == "simple":
        terms["loss"] = terms["mse"]
        return terms

    # hybrid: the VLB sees the mean as a constant (stop-gradient), so its gradient reaches v alone.
    frozen = torch.cat([mean_part.detach(), v], dim=1)
    p = p_mean_variance(s, frozen, x_t, t, mean_type=mean_type, var_type=var_type, clip_x0=False)
    terms["vlb"] = vlb_term_bpd(s, x0, x_t, t, p)
    # lambda * T * L_t: T * L_t estimates L_vlb = sum_t L_t, lambda = vlb_weight (paper Eq. 16).
    terms["loss"] = terms["mse"] + vlb_weight * num_steps * terms["vlb"]
    return terms
