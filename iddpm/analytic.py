"""Exact (analytic) denoisers: the best possible "networks" for data whose distribution we know.

For data ``x_0 ~ p_data`` and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, the network
that minimises ``L_simple = E ||eps - eps_theta(x_t, t)||^2`` is the posterior mean
``eps*(x_t, t) = E[eps | x_t]``; equivalently ``x0*(x_t, t) = E[x_0 | x_t]``, tied by ``q_sample``:
``eps* = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t)``. When ``p_data`` is a Gaussian, a Gaussian mixture, or
a finite set of points, that posterior mean has a closed form, so we get a perfect denoiser with no training.
The book uses them to study the reverse process (chapter 03_reverse_process) without a network in the way;
the tests use them as models whose output is known exactly.

Each builder returns a *model* in the package's sense (see ``docs/ARCHITECTURE.md``): a callable
``model(x_t, t_model, **model_kwargs) -> out`` with ``x_t`` of shape ``(B, *event)`` (e.g. ``(B, C, H, W)`` or
``(B, 2)`` for toy points) and ``t_model = s.model_timesteps(t, rescale_timesteps)``: the **original-chain**
index. The model therefore looks up ``abar`` in the **original** (un-respaced) schedule it was built with, and
works unchanged when sampling on a respaced chain. By default the models expect ``rescale_timesteps=False``
(integer ``t_model``); build them with ``rescale_timesteps=True`` to accept the authors' float 0..1000 scale.

Output: ``eps*`` (``mean_type="eps"``) or ``x0*`` (``mean_type="x0"``), shape ``(B, *event)``. With
``learned_v=v`` (a float) the output has ``2C`` channels, ``cat([eps*, v], dim=1)``, for the
``learned_range`` variance (``v = -1`` gives ``beta~_t``, ``v = 1`` gives ``beta_t``; paper Eq. 15).

The maths is done in float64 by default (``compute_dtype``), then cast back to ``x_t``'s dtype: the empirical
denoiser's softmax logits scale like ``1 / (1 - abar_t)``, about ``1e5`` at ``t = 0``.

Chapter: book/03_reverse_process, book/04_variational_bound
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .diffusion import predict_eps_from_x0
from .schedules import Schedule

__all__ = [
    "AnalyticMeanType",
    "empirical_eps_model",
    "empirical_posterior_x0",
    "gaussian_eps_model",
    "gaussian_mixture_eps_model",
    "gaussian_mixture_posterior_x0",
    "gaussian_posterior_x0",
]

AnalyticMeanType = Literal["eps", "x0"]
ANALYTIC_MEAN_TYPES: tuple[str, ...] = ("eps", "x0")

Model = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------------------------
# Posterior means E[x_0 | x_t] as pure functions of (x_t, abar)
# ----------------------------------------------------------------------------------------------------------


def _abar_like(alpha_bar: Tensor, x: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcasting against ``x`` (same dtype and device as ``x``)."""
    if alpha_bar.ndim != 1 or alpha_bar.shape[0] != x.shape[0]:
        raise ValueError(
            f"alpha_bar must have shape ({x.shape[0]},) to match x_t of shape {tuple(x.shape)}; "
            f"got {tuple(alpha_bar.shape)}"
        )
    if not ((alpha_bar > 0) & (alpha_bar < 1)).all():
        raise ValueError("alpha_bar must lie in (0, 1): at abar = 1 there is no noise, at 0 no signal")
    return alpha_bar.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_posterior_x0(
    x_t: Tensor, alpha_bar: Tensor, mean: Tensor | float, var: Tensor | float
) -> Tensor:
    """``E[x_0 | x_t]`` for ``x_0 ~ N(mean, var)`` independently per element.

    ``(x_0, x_t)`` are jointly Gaussian with ``Cov(x_0, x_t) = sqrt(abar) var`` and
    ``Var(x_t) = abar var + 1 - abar``, so (Gaussian conditioning)
    ``E[x_0 | x_t] = mean + sqrt(abar) var (x_t - sqrt(abar) mean) / (abar var + 1 - abar)``.

    Args:
        x_t: ``(B, *event)``.
        alpha_bar: ``(B,)`` values of ``abar`` in (0, 1), one per row.
        mean, var: floats or tensors broadcastable to ``event`` (``var >= 0``).

    Returns:
        ``(B, *event)`` in ``x_t``'s dtype.
    """
    a = _abar_like(alpha_bar, x_t)
    mean = torch.as_tensor(mean, dtype=x_t.dtype, device=x_t.device)
    var = torch.as_tensor(var, dtype=x_t.dtype, device=x_t.device)
    return mean + a.sqrt() * var * (x_t - a.sqrt() * mean) / (a * var + 1.0 - a)


def empirical_posterior_x0(
    x_t: Tensor, alpha_bar: Tensor, data: Tensor, log_weights: Tensor | None = None
) -> Tensor:
    """``E[x_0 | x_t]`` when ``x_0`` is drawn from the ``N`` points of ``data`` (a mixture of point masses).

    Bayes: ``p(i | x_t) ∝ w_i N(x_t; sqrt(abar) x_i, (1 - abar) I)``, so
    ``E[x_0 | x_t] = sum_i softmax_i(log w_i - ||x_t - sqrt(abar) x_i||^2 / (2 (1 - abar))) x_i``.
    ``||x_t||^2`` is the same for every ``i`` and cancels in the softmax, so the logits are computed as
    ``(sqrt(abar) <x_t, x_i> - abar ||x_i||^2 / 2) / (1 - abar)``: one ``(B, D) @ (D, N)`` matmul, then a
    log-sum-exp-stable softmax.

    Args:
        x_t: ``(B, *event)``.
        alpha_bar: ``(B,)`` values in (0, 1).
        data: ``(N, *event)`` the training points.
        log_weights: optional ``(N,)`` unnormalised log mixture weights (default: equal weights).

    Returns:
        ``(B, *event)`` in ``x_t``'s dtype: a convex combination of the data points.
    """
    a = _abar_like(alpha_bar, x_t).reshape(-1, 1)  # (B, 1)
    xf = x_t.reshape(x_t.shape[0], -1)  # (B, D)
    df = data.to(device=x_t.device, dtype=x_t.dtype).reshape(data.shape[0], -1)  # (N, D)
    logits = (a.sqrt() * (xf @ df.T) - 0.5 * a * (df * df).sum(1)) / (1.0 - a)  # (B, N)
    if log_weights is not None:
        logits = logits + log_weights.to(device=x_t.device, dtype=x_t.dtype)
    probs = torch.softmax(logits, dim=1)  # subtracts the row max: stable even when 1 - abar ~ 1e-5
    return (probs @ df).reshape(x_t.shape)


def gaussian_mixture_posterior_x0(
    x_t: Tensor, alpha_bar: Tensor, means: Tensor, stds: Tensor, weights: Tensor
) -> Tensor:
    """``E[x_0 | x_t]`` for ``x_0 ~ sum_k w_k N(m_k, diag(s_k^2))``.

    Given component ``k``, ``x_t ~ N(sqrt(abar) m_k, v_k)`` with ``v_k = abar s_k^2 + 1 - abar`` (per
    element), and ``E[x_0 | x_t, k]`` is the Gaussian formula of :func:`gaussian_posterior_x0`. The
    responsibilities are ``r_k ∝ w_k N(x_t; sqrt(abar) m_k, v_k)`` (a softmax of log densities), and
    ``E[x_0 | x_t] = sum_k r_k E[x_0 | x_t, k]``.

    Args:
        x_t: ``(B, *event)``.
        alpha_bar: ``(B,)`` values in (0, 1).
        means: ``(K, *event)``.
        stds: ``(K,)`` (isotropic components) or ``(K, *event)`` (diagonal), ``>= 0``.
        weights: ``(K,)`` positive mixture weights (normalised here).

    Returns:
        ``(B, *event)`` in ``x_t``'s dtype.
    """
    B, K = x_t.shape[0], means.shape[0]
    a = _abar_like(alpha_bar, x_t).reshape(B, 1, 1)  # (B, 1, 1)
    xf = x_t.reshape(B, 1, -1)  # (B, 1, D)
    m = means.to(device=x_t.device, dtype=x_t.dtype).reshape(1, K, -1)  # (1, K, D)
    s2 = stds.to(device=x_t.device, dtype=x_t.dtype).reshape(K, -1).expand(K, m.shape[-1]).pow(2)[None]
    v = a * s2 + 1.0 - a  # (B, K, D) marginal variance of x_t given k
    resid = xf - a.sqrt() * m  # (B, K, D)
    log_w = torch.log(weights.to(device=x_t.device, dtype=x_t.dtype) / weights.sum())
    log_lik = -0.5 * (resid.pow(2) / v + torch.log(2 * math.pi * v)).sum(-1)  # (B, K)
    r = torch.softmax(log_w + log_lik, dim=1)  # (B, K)
    x0_k = m + a.sqrt() * s2 * resid / v  # (B, K, D)
    return (r[..., None] * x0_k).sum(1).reshape(x_t.shape)


# ----------------------------------------------------------------------------------------------------------
# Models: look up abar of the original-chain timestep, compute E[x_0 | x_t], return eps or x0
# ----------------------------------------------------------------------------------------------------------


def _check_schedule(schedule: Schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be an iddpm Schedule, got {type(schedule).__name__}")
    if schedule.is_respaced or not torch.equal(schedule.timesteps, torch.arange(schedule.num_steps)):
        raise ValueError(
            "build an analytic model with the ORIGINAL (un-respaced) schedule: the model receives "
            "original-chain timesteps (s.model_timesteps maps a respaced index back), so it looks abar up in "
            "the original chain. The same model then works with the original and every respaced schedule."
        )


def _make_model(
    schedule: Schedule,
    posterior_x0: Callable[[Tensor, Tensor], Tensor],
    event_shape: tuple[int, ...] | None,
    *,
    mean_type: str,
    learned_v: float | None,
    rescale_timesteps: bool,
    compute_dtype: torch.dtype | None,
    name: str,
) -> Model:
    """Wrap ``posterior_x0(x_t, abar) -> E[x_0 | x_t]`` (both in ``compute_dtype``) as a package model."""
    _check_schedule(schedule)
    if mean_type not in ANALYTIC_MEAN_TYPES:
        raise ValueError(
            f"unknown mean_type {mean_type!r} for an analytic model; choose one of {ANALYTIC_MEAN_TYPES} "
            "('xprev' depends on the chain being sampled, which a model does not know)"
        )
    if learned_v is not None and not math.isfinite(float(learned_v)):
        raise ValueError(f"learned_v must be a finite float or None, got {learned_v!r}")
    alpha_bar = schedule.alpha_bar  # (T_orig,) float64
    T = schedule.num_steps
    on_device: dict[torch.device, Schedule] = {schedule.betas.device: schedule}  # cache: one .to() per device

    def model(x_t: Tensor, t_model: Tensor, **model_kwargs: object) -> Tensor:
        """``(B, *event)``, ``(B,)`` original-chain t -> ``(B, *event)`` (``2C`` channels with a ``v``)."""
        del model_kwargs  # an analytic denoiser is unconditional; accept and ignore class labels etc.
        if not isinstance(x_t, Tensor) or not x_t.dtype.is_floating_point or x_t.ndim < 2:
            raise TypeError(f"{name}: x_t must be a floating tensor of shape (B, C, ...), got {x_t!r:.80}")
        if event_shape is not None and tuple(x_t.shape[1:]) != event_shape:
            raise ValueError(
                f"{name}: x_t has event shape {tuple(x_t.shape[1:])} but the data has {event_shape}"
            )
        if not isinstance(t_model, Tensor) or t_model.shape != (x_t.shape[0],):
            raise ValueError(f"{name}: t_model must be a ({x_t.shape[0]},) tensor, got {t_model!r:.80}")
        if rescale_timesteps:
            # The authors' scale: t_model = t_orig * 1000 / T_orig (float). Invert it and round to an index.
            idx = torch.round(t_model.double() * (T / 1000.0)).long()
        elif t_model.dtype.is_floating_point:
            raise TypeError(
                f"{name} was built for rescale_timesteps=False and expects integer original-chain timesteps; "
                f"got dtype {t_model.dtype}. Sample with rescale_timesteps=False, or build the model with "
                "rescale_timesteps=True."
            )
        else:
            idx = t_model.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= T):
            raise ValueError(f"{name}: timesteps must be in [0, {T}) of the original chain: {idx.tolist()}")
        dtype = compute_dtype or x_t.dtype
        if x_t.device.type == "mps" and dtype == torch.float64:
            dtype = torch.float32  # MPS has no float64
        xc = x_t.to(dtype)
        abar = alpha_bar.to(x_t.device)[idx.to(x_t.device)].to(dtype)  # (B,)
        x0 = posterior_x0(xc, abar)
        if mean_type == "eps":
            # q_sample solved for eps, by the package's conversion on the original schedule (idx is its t).
            if x_t.device not in on_device:
                on_device[x_t.device] = schedule.to(x_t.device)
            out = predict_eps_from_x0(on_device[x_t.device], xc, idx.to(x_t.device), x0)
        else:
            out = x0
        out = out.to(x_t.dtype)
        if learned_v is not None:
            out = torch.cat([out, torch.full_like(out, float(learned_v))], dim=1)
        return out

    model.__name__ = name
    model.__qualname__ = name
    return model


def _as_float_tensor(x: Tensor | float, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real number or tensor, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


def gaussian_eps_model(
    schedule: Schedule,
    mean: Tensor | float,
    var: Tensor | float,
    *,
    mean_type: AnalyticMeanType = "eps",
    learned_v: float | None = None,
    rescale_timesteps: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
) -> Model:
    """The exact denoiser for data ``x_0 ~ N(mean, var)`` (independent elements).

    Derivation: ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` with ``x_0 ~ N(mu, sigma^2)`` and
    ``eps ~ N(0, 1)`` independent, so ``(eps, x_t)`` is jointly Gaussian with ``E[x_t] = sqrt(abar) mu``,
    ``Var(x_t) = abar sigma^2 + 1 - abar`` and ``Cov(eps, x_t) = sqrt(1 - abar)``. Gaussian conditioning gives
    ``eps*(x_t, t) = E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sigma^2 + 1 - abar)``, the
    minimiser of ``L_simple`` for this data. (The model computes ``E[x_0 | x_t]`` and
    converts it with ``q_sample``'s relation, which gives the same number.)

    Args:
        schedule: the ORIGINAL (un-respaced) schedule; the model works on any respacing of it.
        mean, var: floats or tensors broadcastable to the event shape ``(C, ...)``; ``var >= 0``.
        mean_type: ``"eps"`` (output ``eps*``) or ``"x0"`` (output ``E[x_0 | x_t]``).
        learned_v: ``None`` for ``C`` output channels, or a float ``v`` appended as ``C`` constant channels
            (``2C`` in all) for ``var_type="learned_range"``.
        rescale_timesteps: what the sampler passes (default False: integer original-chain ``t``).
        compute_dtype: dtype of the maths (default float64); ``None`` uses ``x_t``'s dtype.

    Returns:
        ``model(x_t (B, C, ...), t_model (B,), **kw) -> (B, C or 2C, ...)``.
    """
    mean_t = _as_float_tensor(mean, "mean")
    var_t = _as_float_tensor(var, "var")
    if (var_t < 0).any():
        raise ValueError("var must be >= 0")

    def post(x: Tensor, abar: Tensor) -> Tensor:
        return gaussian_posterior_x0(x, abar, mean_t.to(x.device, x.dtype), var_t.to(x.device, x.dtype))

    return _make_model(
        schedule,
        post,
        None,
        mean_type=mean_type,
        learned_v=learned_v,
        rescale_timesteps=rescale_timesteps,
        compute_dtype=compute_dtype,
        name="gaussian_eps_model",
    )


def empirical_eps_model(
    schedule: Schedule,
    data: Tensor,
    *,
    weights: Tensor | None = None,
    mean_type: AnalyticMeanType = "eps",
    learned_v: float | None = None,
    rescale_timesteps: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
) -> Model:
    """The exact denoiser for the *empirical* distribution of a finite dataset: ``x_0`` uniform on ``data``.

    This is what a network trained to the global optimum of ``L_simple`` on ``data`` would compute (it would
    only ever reproduce training points). ``E[x_0 | x_t]`` is a softmax-weighted average of the points (see
    :func:`empirical_posterior_x0`); as ``abar -> 1`` the softmax picks the nearest point to
    ``x_t / sqrt(abar)``, as ``abar -> 0`` it returns the data mean.

    Args:
        schedule: the ORIGINAL (un-respaced) schedule; the model works on any respacing of it.
        data: ``(N, *event)`` points, e.g. ``(N, 2)`` for 2-D toys or ``(N, C, H, W)`` for images.
        weights: optional ``(N,)`` positive weights (default uniform).
        mean_type, learned_v, rescale_timesteps, compute_dtype: as in :func:`gaussian_eps_model`.

    Returns:
        ``model(x_t (B, *event), t_model (B,), **kw) -> (B, *event)`` (``2C`` channels with ``learned_v``).
    """
    if not isinstance(data, Tensor) or not data.dtype.is_floating_point:
        raise TypeError("data must be a floating tensor of shape (N, *event)")
    if data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must have shape (N, *event) with N >= 1, got {tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("data must be finite")
    data64 = data.detach().to(torch.float64)
    log_w = None
    if weights is not None:
        w = _as_float_tensor(weights, "weights")
        if w.shape != (data.shape[0],) or (w <= 0).any():
            raise ValueError(f"weights must be ({data.shape[0]},) and positive, got shape {tuple(w.shape)}")
        log_w = torch.log(w)

    # The data set can be large (e.g. 5000 images): move/cast it once per (device, dtype), not at every step.
    cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}

    def post(x: Tensor, abar: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            lw = None if log_w is None else log_w.to(device=x.device, dtype=x.dtype)
            cache[key] = (data64.to(device=x.device, dtype=x.dtype), lw)
        return empirical_posterior_x0(x, abar, *cache[key])

    return _make_model(
        schedule,
        post,
        tuple(data.shape[1:]),
        mean_type=mean_type,
        learned_v=learned_v,
        rescale_timesteps=rescale_timesteps,
        compute_dtype=compute_dtype,
        name="empirical_eps_model",
    )


def gaussian_mixture_eps_model(
    schedule: Schedule,
    means: Tensor,
    stds: Tensor | float,
    weights: Tensor | None = None,
    *,
    mean_type: AnalyticMeanType = "eps",
    learned_v: float | None = None,
    rescale_timesteps: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
) -> Model:
    """The exact denoiser for ``x_0 ~ sum_k w_k N(m_k, diag(s_k^2))`` (:func:`gaussian_mixture_posterior_x0`).

    With one component it is :func:`gaussian_eps_model`; as every ``s_k -> 0`` it becomes
    :func:`empirical_eps_model` on the means.

    Args:
        schedule: the ORIGINAL (un-respaced) schedule.
        means: ``(K, *event)``.
        stds: a float, ``(K,)`` or ``(K, *event)``, ``>= 0``.
        weights: ``(K,)`` positive (normalised here); default equal.
        mean_type, learned_v, rescale_timesteps, compute_dtype: as in :func:`gaussian_eps_model`.

    Returns:
        ``model(x_t (B, *event), t_model (B,), **kw) -> (B, *event)`` (``2C`` channels with ``learned_v``).
    """
    if not isinstance(means, Tensor) or means.ndim < 2 or means.shape[0] == 0:
        raise ValueError("means must be a tensor of shape (K, *event) with K >= 1")
    K = means.shape[0]
    means64 = _as_float_tensor(means.detach(), "means")
    stds64 = _as_float_tensor(stds, "stds")
    if stds64.ndim == 0:
        stds64 = stds64.expand(K)
    if stds64.shape not in ((K,), tuple(means.shape)):
        raise ValueError(f"stds must be a float, ({K},) or {tuple(means.shape)}; got {tuple(stds64.shape)}")
    if (stds64 < 0).any():
        raise ValueError("stds must be >= 0")
    w64 = torch.ones(K, dtype=torch.float64) if weights is None else _as_float_tensor(weights, "weights")
    if w64.shape != (K,) or (w64 <= 0).any():
        raise ValueError(f"weights must be ({K},) and positive, got shape {tuple(w64.shape)}")

    def post(x: Tensor, abar: Tensor) -> Tensor:
        return gaussian_mixture_posterior_x0(x, abar, means64, stds64, w64)

    return _make_model(
        schedule,
        post,
        tuple(means.shape[1:]),
        mean_type=mean_type,
        learned_v=learned_v,
        rescale_timesteps=rescale_timesteps,
        compute_dtype=compute_dtype,
        name="gaussian_mixture_eps_model",
    )
