"""Likelihood evaluation: the full variational bound in bits per dimension.

Chapter: book/04_variational_bound
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .diffusion import (
    MeanType,
    VarType,
    check_data_range,
    check_mean_type,
    check_var_type,
    p_mean_variance,
    predict_eps_from_x0,
    q_sample,
)
from .losses import mean_flat, prior_bpd, vlb_term_bpd
from .schedules import Schedule

__all__ = ["BpdResult", "bits_per_dim"]


class BpdResult(NamedTuple):
    """The variational bound of each example, and its pieces.

    Fields (B examples, T steps of the evaluated chain):
        total: ``(B,)`` bits/dim, ``terms.sum(1) + prior``.
        prior: ``(B,)`` ``L_prior`` in bits/dim.
        terms: ``(B, T)`` ``L_t`` in bits/dim, **forward time order**: column ``k`` is ``t = k`` (column 0 is
            the decoder term ``L_0``). The authors' ``calc_bpd_loop`` stores the reverse order.
        x0_mse: ``(B, T)`` ``mean_flat((pred_x0 - x0)^2)`` at each ``t``, same order.
        eps_mse: ``(B, T)`` ``mean_flat((eps_from_pred_x0 - eps)^2)`` at each ``t``, same order (eps
            re-derived from the possibly clipped ``pred_x0``, as the authors do).
    """

    total: Tensor
    prior: Tensor
    terms: Tensor
    x0_mse: Tensor
    eps_mse: Tensor


@torch.no_grad()
def bits_per_dim(
    model: Callable[..., Tensor],
    s: Schedule,
    x0: Tensor,
    *,
    mean_type: MeanType = "eps",
    var_type: VarType = "learned_range",
    clip_x0: bool = True,
    rescale_timesteps: bool = True,
    generator: torch.Generator | None = None,
    noise_fn: Callable[[int], Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> BpdResult:
    """The variational bound ``L_vlb = L_prior + sum_t L_t`` of each example, in bits/dim.

    Each ``L_t`` is estimated with a single fresh ``x_t ~ q(x_t | x0)`` (one model call per ``t``, ``t``
    running ``T-1 ... 0``), like the authors' ``calc_bpd_loop``; average over many images for a low-variance
    number.
    On a respaced schedule this is the bound of the *respaced* (shorter) chain, as in the authors'
    ``image_nll.py --timestep_respacing``. Put the model in ``eval()`` mode yourself (dropout).

    Args:
        model: ``model(x_t, t_model, **model_kwargs) -> (B, C_out, ...)``.
        s: the schedule of the chain to evaluate.
        x0: ``(B, C, ...)`` data in ``[-1, 1]`` on the 256-level grid (``uint8 / 127.5 - 1``).
        mean_type, var_type: the model's parameterisation (see :func:`~iddpm.diffusion.p_mean_variance`).
        clip_x0: clamp ``pred_x0`` to ``[-1, 1]`` (the authors' ``image_nll.py`` default: True).
        rescale_timesteps: how the model was trained to see ``t``.
        generator: RNG for the noise (the global one if None).
        noise_fn: alternatively, ``noise_fn(t) -> (B, C, ...)`` gives the noise for step ``t`` (e.g. fixed
            noise for a reproducible figure). Give at most one of ``generator`` and ``noise_fn``.
        model_kwargs: extra keyword arguments for the model.
        progress: show a tqdm progress bar.

    Returns:
        :class:`BpdResult`.
    """
    check_mean_type(mean_type)
    check_var_type(var_type)
    if generator is not None and noise_fn is not None:
        raise ValueError("give at most one of generator and noise_fn")
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.dtype.is_floating_point:
        raise ValueError(f"x0 must be a floating (B, C, ...) tensor, got {getattr(x0, 'shape', type(x0))}")
    check_data_range(x0)
    batch, num_steps = x0.shape[0], s.num_steps
    terms = torch.zeros(batch, num_steps, dtype=x0.dtype, device=x0.device)
    x0_mse = torch.zeros_like(terms)
    eps_mse = torch.zeros_like(terms)

    steps = range(num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is only needed for the progress bar

        steps = tqdm(steps, desc="bits/dim")
    for i in steps:
        t = torch.full((batch,), i, dtype=torch.int64, device=x0.device)
        if noise_fn is not None:
            noise = noise_fn(i)
            if noise.shape != x0.shape:
                raise ValueError(
                    f"noise_fn({i}) must return x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}"
                )
        else:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = q_sample(s, x0, t, noise)
        out = model(x_t, s.model_timesteps(t, rescale_timesteps), **(model_kwargs or {}))
        p = p_mean_variance(s, out, x_t, t, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0)
        terms[:, i] = vlb_term_bpd(s, x0, x_t, t, p)
        x0_mse[:, i] = mean_flat((p.pred_x0 - x0) ** 2)
        eps_mse[:, i] = mean_flat((predict_eps_from_x0(s, x_t, t, p.pred_x0) - noise) ** 2)

    prior = prior_bpd(s, x0)
    return BpdResult(terms.sum(dim=1) + prior, prior, terms, x0_mse, eps_mse)
