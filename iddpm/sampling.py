"""Sampling: run the learned reverse process from pure noise down to data (ancestral or DDIM).

Both samplers walk ``t = T-1, ..., 0`` over the chain of the schedule ``s`` they are given. For a respaced
schedule (:func:`iddpm.respace.respace`) that is a short chain, and the network still sees original-chain
timesteps through ``s.model_timesteps``. Each step:

1. ``out = model(x_t, s.model_timesteps(t, rescale_timesteps), **model_kwargs)`` (no gradients);
2. ``p = p_mean_variance(s, out, x_t, t, ...)``: the mean of ``p(x_{t-1} | x_t)`` and ``pred_x0`` (clipped to
   ``[-1, 1]`` first if ``clip_x0``);
3. ancestral (Ho et al. Alg. 2): ``x_{t-1} = mean + 1[t != 0] exp(0.5 log_var) z``;
   DDIM (Song et al. 2021): ``eps = predict_eps_from_x0(x_t, pred_x0)`` (re-derived from the *clipped*
   ``pred_x0``), ``x_{t-1} = pred_x0 sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) eps + 1[t != 0] sigma
   z``, ``sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)``. DDIM ignores a
   learned variance.

Randomness: the initial ``x_T`` and one ``z`` per step are drawn in that order, ``z`` also at ``t = 0`` where
it is not used, exactly like the authors' code, so a replay with the same generator state is RNG-exact. The
noise is drawn on the generator's device and then moved, so a CPU generator gives the same samples on
any device.

Chapter: book/03_reverse_process
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .diffusion import (
    MeanType,
    VarType,
    check_mean_type,
    check_var_type,
    p_mean_variance,
    predict_eps_from_x0,
)
from .schedules import Schedule, extract

__all__ = ["METHODS", "SampleMethod", "SampleStep", "ddim_invert", "sample", "sample_progressive"]

SampleMethod = Literal["ancestral", "ddim"]
METHODS: tuple[str, ...] = ("ancestral", "ddim")


class SampleStep(NamedTuple):
    """One reverse step, yielded right after it is taken.

    Attributes:
        t: the 0-based index (in the chain of ``s``) at which the model was evaluated; the steps come as
            ``t = T-1, ..., 0``, so this is step ``k = T - t`` of ``T``.
        x_t: the sample **after** the step, ``(B, C, ...)``: it has the noise level ``alpha_bar_prev[t]``
            (``alpha_bar[t-1]``), which is the paper's ``x_t`` in its 1-based numbering. The last step
            (``t = 0``) yields the final sample ``x_0``.
        pred_x0: ``(B, C, ...)`` the model's estimate of ``x_0`` at this step (clipped if ``clip_x0``).
    """

    t: int
    x_t: Tensor
    pred_x0: Tensor


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints like (B, C, H, W), got {shape!r}") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"shape must be (B, C, ...) with every size >= 1, got {tuple(shape)}")
    return dims


def _default_device(model: Callable[..., Tensor], noise: Tensor | None) -> torch.device:
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise; drawn on the generator's device (so results do not depend on ``device``)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _ddim_sigma(s: Schedule, t: Tensor, x: Tensor, eta: float) -> Tensor:
    """DDIM's ``sigma_t(eta)`` (Song et al. 2021, Eq. 16), ``(B, 1, ..., 1)``; eta = 1 gives sqrt(beta~_t)."""
    abar, abar_prev = extract(s.alpha_bar, t, x), extract(s.alpha_bar_prev, t, x)
    return eta * ((1.0 - abar_prev) / (1.0 - abar)).sqrt() * (1.0 - abar / abar_prev).sqrt()


def _check_eta(s: Schedule, eta: float) -> None:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0.0:
        raise ValueError(
            f"eta must be a number >= 0 (0 = deterministic DDIM, 1 = ancestral-like), got {eta!r}"
        )
    # sqrt(1 - abar_prev - sigma^2) must be real: sigma^2 = eta^2 * beta~'_t <= 1 - abar_prev holds for eta <=
    # 1, but a larger eta can break it at some step. Report the largest eta this schedule allows.
    sigma1_sq = (1.0 - s.alpha_bar_prev) / (1.0 - s.alpha_bar) * (1.0 - s.alpha_bar / s.alpha_bar_prev)
    room = 1.0 - s.alpha_bar_prev
    positive = sigma1_sq > 0
    if positive.any():
        eta_max = float((room[positive] / sigma1_sq[positive]).sqrt().min())
        if eta > eta_max * (1 + 1e-12):
            raise ValueError(
                f"eta={eta} makes sigma^2 exceed 1 - alpha_bar_prev at some step of this schedule; "
                f"use eta <= {eta_max:.6g}"
            )


def sample_progressive(
    model: Callable[..., Tensor],
    s: Schedule,
    shape: Sequence[int],
    *,
    method: SampleMethod = "ancestral",
    eta: float = 0.0,
    mean_type: MeanType = "eps",
    var_type: VarType = "learned_range",
    clip_x0: bool = True,
    rescale_timesteps: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Iterator[SampleStep]:
    """Run the reverse chain of ``s`` from ``x_T`` to ``x_0``, yielding a :class:`SampleStep` after each step.

    Args:
        model: ``model(x_t, t_model, **model_kwargs) -> (B, C_out, ...)``; ``C_out = 2C`` for learned
            variances. Called under ``torch.no_grad()``; put it in ``eval()`` mode yourself.
        s: the schedule to sample on (respaced or not); ``T = s.num_steps`` steps are taken.
        shape: ``(B, C, ...)`` of the samples, e.g. ``(16, 3, 32, 32)``.
        method: ``"ancestral"`` (the paper's sampler) or ``"ddim"``.
        eta: DDIM noise scale, >= 0 (0: deterministic; 1: the ancestral posterior variance). The ancestral
            sampler ignores it.
        mean_type: what the network predicts, ``"eps"``, ``"x0"`` or ``"xprev"``.
        var_type: ``"fixed_small"``, ``"fixed_large"``, ``"learned"`` or ``"learned_range"``.
        clip_x0: clamp ``pred_x0`` to ``[-1, 1]`` before forming the step (image data).
        rescale_timesteps: show the network ``t * 1000 / T_original`` (float) instead of the integer index;
            must match how the model was trained.
        denoised_fn: optional map applied to ``pred_x0`` before the clamp.
        noise: the initial ``x_T`` of shape ``shape`` (cast to ``device`` and ``dtype``); drawn from
            ``N(0, I)`` if None.
        generator: a ``torch.Generator`` for every random draw (the global RNG if None).
        model_kwargs: extra keyword arguments for the model, e.g. ``{"y": labels}`` for class conditioning.
        device: where to sample; defaults to ``noise``'s device, else the model's parameters', else CPU.
        dtype: floating dtype of the samples (float32; float64 for exact tests).
        progress: show a ``tqdm`` progress bar.

    Returns:
        An iterator of ``T`` :class:`SampleStep` s, for ``t = T-1, ..., 0``; the last one holds the final
        sample. The arguments are checked and ``x_T`` is drawn when this function is called.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    check_mean_type(mean_type)
    check_var_type(var_type)
    if method == "ddim":
        _check_eta(s, eta)
    elif not isinstance(eta, (int, float)) or not eta >= 0.0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    shape = _check_shape(shape)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(
            f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}"
        )
    device = torch.device(device) if device is not None else _default_device(model, noise)
    s = s.to(device)

    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise (the initial x_T) must have shape {shape}, got {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=dtype)
    else:
        x = _randn(shape, generator, device, dtype)

    return _reverse_chain(
        model,
        s,
        x,
        method=method,
        eta=eta,
        mean_type=mean_type,
        var_type=var_type,
        clip_x0=clip_x0,
        rescale_timesteps=rescale_timesteps,
        denoised_fn=denoised_fn,
        generator=generator,
        model_kwargs=model_kwargs,
        progress=progress,
    )


def _reverse_chain(
    model: Callable[..., Tensor],
    s: Schedule,
    x: Tensor,
    *,
    method: str,
    eta: float,
    mean_type: MeanType,
    var_type: VarType,
    clip_x0: bool,
    rescale_timesteps: bool,
    denoised_fn: Callable[[Tensor], Tensor] | None,
    generator: torch.Generator | None,
    model_kwargs: dict[str, Any],
    progress: bool,
) -> Iterator[SampleStep]:
    """The loop of :func:`sample_progressive`, on validated inputs (``s`` and ``x_T`` already on the device).

    A separate generator function so that :func:`sample_progressive` validates its arguments when called,
    not at the first ``next()``.
    """
    shape, device, dtype = tuple(x.shape), x.device, x.dtype
    steps: Iterator[int] = iter(range(s.num_steps - 1, -1, -1))
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is only needed for the bar

        steps = tqdm(steps, total=s.num_steps, desc=f"{method} sampling")

    for i in steps:
        # Grad mode is switched off per step, not around the loop: a `with` around a `yield` would leak
        # no_grad into the caller's code between steps.
        with torch.no_grad():
            t = torch.full((shape[0],), i, dtype=torch.int64, device=device)
            out = model(x, s.model_timesteps(t, rescale_timesteps), **model_kwargs)
            p = p_mean_variance(
                s, out, x, t, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0, denoised_fn=denoised_fn
            )
            # Drawn at t = 0 too, although unused there: keeps the RNG stream aligned with the authors' code.
            z = _randn(shape, generator, device, dtype)
            # The last step returns the mean: noise of variance ~beta~_1 would only blur the final sample.
            nonzero = float(i != 0)
            if method == "ancestral":
                x = p.mean + nonzero * torch.exp(0.5 * p.log_var) * z
            else:
                # DDIM (Song et al. 2021): re-derive eps from the (clipped) pred_x0 (consistent step).
                eps = predict_eps_from_x0(s, x, t, p.pred_x0)
                abar_prev = extract(s.alpha_bar_prev, t, x)
                sigma = _ddim_sigma(s, t, x, eta)
                direction = (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt() * eps
                x = p.pred_x0 * abar_prev.sqrt() + direction + nonzero * sigma * z
        yield SampleStep(i, x, p.pred_x0)


def sample(
    model: Callable[..., Tensor],
    s: Schedule,
    shape: Sequence[int],
    *,
    method: SampleMethod = "ancestral",
    eta: float = 0.0,
    mean_type: MeanType = "eps",
    var_type: VarType = "learned_range",
    clip_x0: bool = True,
    rescale_timesteps: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Tensor:
    """The final sample ``x_0`` of :func:`sample_progressive` (same arguments), ``(B, C, ...)``."""
    final = None
    for step in sample_progressive(
        model,
        s,
        shape,
        method=method,
        eta=eta,
        mean_type=mean_type,
        var_type=var_type,
        clip_x0=clip_x0,
        rescale_timesteps=rescale_timesteps,
        denoised_fn=denoised_fn,
        noise=noise,
        generator=generator,
        model_kwargs=model_kwargs,
        device=device,
        dtype=dtype,
        progress=progress,
    ):
        final = step.x_t
    assert final is not None  # a schedule has at least one step
    return final


def ddim_invert(
    model: Callable[..., Tensor],
    s: Schedule,
    x0: Tensor,
    *,
    mean_type: MeanType = "eps",
    var_type: VarType = "learned_range",
    clip_x0: bool = True,
    rescale_timesteps: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> Tensor:
    """Deterministic DDIM (eta = 0) run forwards, ``x_0 -> x_T``: the approximate inverse of DDIM sampling.

    For ``t = 0, ..., T-1``: ``pred_x0, eps`` from the model at ``(x, t)`` as in a DDIM step, then
    ``x <- pred_x0 sqrt(abar_next) + sqrt(1 - abar_next) eps`` (the authors' ``ddim_reverse_sample``). The
    first step treats the data as ``x`` at index 0, and ``abar_next = 0`` at the last step, so the result is
    the model's noise estimate. The inversion is exact only as the step size goes to 0.

    Args:
        model, s, mean_type, var_type, clip_x0, rescale_timesteps, model_kwargs, progress: as in
            :func:`sample_progressive`.
        x0: ``(B, C, ...)`` data to encode; its device and dtype are used.

    Returns:
        ``x_T`` of ``x0``'s shape.
    """
    check_mean_type(mean_type)
    check_var_type(var_type)
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.dtype.is_floating_point:
        raise ValueError("x0 must be a floating-point tensor of shape (B, C, ...)")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    s = s.to(x0.device)
    x = x0
    steps: Iterator[int] = iter(range(s.num_steps))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=s.num_steps, desc="DDIM inversion")
    with torch.no_grad():  # no yield inside, so the context cannot leak
        for i in steps:
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            out = model(x, s.model_timesteps(t, rescale_timesteps), **model_kwargs)
            p = p_mean_variance(s, out, x, t, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0)
            eps = predict_eps_from_x0(s, x, t, p.pred_x0)
            abar_next = extract(s.alpha_bar_next, t, x)
            x = p.pred_x0 * abar_next.sqrt() + (1.0 - abar_next).sqrt() * eps
    return x
