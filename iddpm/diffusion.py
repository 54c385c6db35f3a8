"""The Gaussian diffusion maths: forward process, posterior, and the reverse-process parameterisations.

Everything here is a pure function of a :class:`~iddpm.schedules.Schedule` ``s`` and tensors: no network, no
hidden randomness. The network's *output* goes into :func:`p_mean_variance`; calling the network is the job of
:mod:`iddpm.losses`, :mod:`iddpm.sampling` and :mod:`iddpm.evaluate`.

Conventions (see :mod:`iddpm.schedules`): ``t`` is a 0-based int64 ``(B,)`` tensor in ``[0, T)``, index 0
is the paper's step 1; ``x0``, ``x_t`` are ``(B, C, ...)``; coefficients are gathered with :func:`extract`,
which casts the float64 schedule to the dtype of the tensor they multiply.

Chapter: book/01_forward_process, book/03_reverse_process
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from .schedules import Schedule, extract

__all__ = [
    "LEARNED_VAR_TYPES",
    "MEAN_TYPES",
    "VAR_TYPES",
    "Gaussian",
    "MeanType",
    "PMeanVar",
    "VarType",
    "check_mean_type",
    "check_var_type",
    "model_out_channels",
    "p_mean_variance",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_xprev",
    "q_mean_variance",
    "q_posterior",
    "q_sample",
    "check_data_range",
    "split_model_output",
]

MeanType = Literal["eps", "x0", "xprev"]
VarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
MEAN_TYPES: tuple[str, ...] = get_args(MeanType)
VAR_TYPES: tuple[str, ...] = get_args(VarType)
LEARNED_VAR_TYPES: tuple[str, ...] = ("learned", "learned_range")


class Gaussian(NamedTuple):
    """A diagonal Gaussian. ``mean`` has the data's shape; ``var``/``log_var`` broadcast against it."""

    mean: Tensor
    var: Tensor
    log_var: Tensor


class PMeanVar(NamedTuple):
    """The reverse step ``p(x_{t-1} | x_t) = N(mean, var)`` and the model's guess of ``x_0``.

    All four fields have the shape of ``x_t``: ``(B, C, ...)``.
    """

    mean: Tensor
    var: Tensor
    log_var: Tensor
    pred_x0: Tensor


def check_mean_type(mean_type: str) -> None:
    """Raise a ``ValueError`` listing the options unless ``mean_type`` is one of :data:`MEAN_TYPES`."""
    if mean_type not in MEAN_TYPES:
        raise ValueError(f"unknown mean_type {mean_type!r}; choose one of {MEAN_TYPES}")


def check_var_type(var_type: str) -> None:
    """Raise a ``ValueError`` listing the options unless ``var_type`` is one of :data:`VAR_TYPES`."""
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type {var_type!r}; choose one of {VAR_TYPES}")


def _check_x_t(s: Schedule, x: Tensor, t: Tensor, name: str = "x_t") -> None:
    """``t`` valid for ``s`` and ``x`` a floating ``(B, ...)`` tensor whose batch matches ``t``."""
    s.check_t(t)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B, C, ...), got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(
            f"{name} must have shape (B, ...) with B = len(t) = {t.shape[0]}; "
            f"got {name} of shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------
# Forward process q(x_t | x_0)
# ----------------------------------------------------------------------------------------------------------


def q_mean_variance(s: Schedule, x0: Tensor, t: Tensor) -> Gaussian:
    """``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``, the closed form of the forward chain.

    Args:
        s: the schedule.
        x0: ``(B, C, ...)`` clean data.
        t: ``(B,)`` int64 in ``[0, T)``.

    Returns:
        :class:`Gaussian` with ``mean`` of ``x0``'s shape and ``var``/``log_var`` of shape ``(B, 1, ..., 1)``.
    """
    _check_x_t(s, x0, t, "x0")
    mean = extract(s.sqrt_alpha_bar, t, x0) * x0
    return Gaussian(mean, extract(1.0 - s.alpha_bar, t, x0), extract(s.log_one_minus_alpha_bar, t, x0))


def q_sample(
    s: Schedule,
    x0: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``x_t ~ q(x_t | x_0)`` by reparameterisation: ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    Pass the noise to make the draw explicit (as the tests and the book do); without it, ``eps`` is drawn
    with ``torch.randn`` from ``generator`` (the global RNG if None), like the authors' ``randn_like``.

    Args:
        s: the schedule.
        x0: ``(B, C, ...)`` clean data.
        t: ``(B,)`` int64 in ``[0, T)``; ``t = 0`` already adds one step of noise.
        noise: ``eps ~ N(0, I)`` of ``x0``'s shape, or None to draw it.
        generator: the RNG for a drawn ``eps`` (only without ``noise``).

    Returns:
        ``x_t`` of ``x0``'s shape and dtype.
    """
    _check_x_t(s, x0, t, "x0")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif generator is not None:
        raise ValueError("give either noise or generator, not both (the generator would be unused)")
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a tensor of x0's shape {tuple(x0.shape)}, got {type(noise).__name__}")
    _check_same_shape(x0, noise, "x0", "noise")
    return extract(s.sqrt_alpha_bar, t, x0) * x0 + extract(s.sqrt_one_minus_alpha_bar, t, x0) * noise


# ----------------------------------------------------------------------------------------------------------
# Posterior q(x_{t-1} | x_t, x_0)
# ----------------------------------------------------------------------------------------------------------


def q_posterior(s: Schedule, x0: Tensor, x_t: Tensor, t: Tensor) -> Gaussian:
    """The forward-process posterior ``q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)``.

    ``mu~_t = coef1_t x_0 + coef2_t x_t``. At ``t = 0`` the posterior is a point mass at ``x_0``
    (``coef1 = 1``, ``coef2 = 0``, ``var = beta~_0 = 0``); its ``log_var`` is the *clipped* ``log beta~_1``,
    because ``log 0 = -inf`` would poison every KL computed from it.

    Args:
        s: the schedule.
        x0: ``(B, C, ...)`` clean data (or a prediction of it).
        x_t: ``(B, C, ...)`` noisy data at step ``t``.
        t: ``(B,)`` int64 in ``[0, T)``.

    Returns:
        :class:`Gaussian`: ``mean`` of ``x_t``'s shape; ``var`` = ``posterior_var[t]`` and ``log_var`` =
        ``posterior_log_var_clipped[t]``, both ``(B, 1, ..., 1)``.
    """
    _check_x_t(s, x_t, t)
    _check_same_shape(x0, x_t, "x0", "x_t")
    mean = extract(s.posterior_mean_coef1, t, x_t) * x0 + extract(s.posterior_mean_coef2, t, x_t) * x_t
    return Gaussian(mean, extract(s.posterior_var, t, x_t), extract(s.posterior_log_var_clipped, t, x_t))


# ----------------------------------------------------------------------------------------------------------
# Converting between the three things a network can predict
# ----------------------------------------------------------------------------------------------------------


def predict_x0_from_eps(s: Schedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Invert ``q_sample`` for ``x_0``: ``x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps``.

    Args: ``x_t``, ``eps``: ``(B, C, ...)``; ``t``: ``(B,)``. Returns ``x_0`` of ``x_t``'s shape.
    """
    _check_x_t(s, x_t, t)
    _check_same_shape(x_t, eps, "x_t", "eps")
    return extract(s.sqrt_recip_alpha_bar, t, x_t) * x_t - extract(s.sqrt_recipm1_alpha_bar, t, x_t) * eps


def predict_eps_from_x0(s: Schedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """Invert ``q_sample`` for the noise: ``eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)``.

    Args: ``x_t``, ``x0``: ``(B, C, ...)``; ``t``: ``(B,)``. Returns ``eps`` of ``x_t``'s shape.
    """
    _check_x_t(s, x_t, t)
    _check_same_shape(x_t, x0, "x_t", "x0")
    return (extract(s.sqrt_recip_alpha_bar, t, x_t) * x_t - x0) / extract(s.sqrt_recipm1_alpha_bar, t, x_t)


def predict_x0_from_xprev(s: Schedule, x_t: Tensor, t: Tensor, xprev: Tensor) -> Tensor:
    """Invert the posterior mean for ``x_0``: ``x_0 = (mu~ - coef2_t x_t) / coef1_t``.

    ``coef1_t > 0`` for every ``t`` (it is 1 at ``t = 0``), so the division is safe.

    Args: ``x_t``, ``xprev`` (the posterior mean ``mu~_t``): ``(B, C, ...)``; ``t``: ``(B,)``.
    Returns ``x_0`` of ``x_t``'s shape.
    """
    _check_x_t(s, x_t, t)
    _check_same_shape(x_t, xprev, "x_t", "xprev")
    coef1 = extract(s.posterior_mean_coef1, t, x_t)
    return (xprev - extract(s.posterior_mean_coef2, t, x_t) * x_t) / coef1


# ----------------------------------------------------------------------------------------------------------
# Reverse process p(x_{t-1} | x_t)
# ----------------------------------------------------------------------------------------------------------


def model_out_channels(channels: int, var_type: str) -> int:
    """How many channels the network must output for ``channels`` data channels: ``2C`` if the variance is
    learned (``"learned"``, ``"learned_range"``: the mean part then the variance part), else ``C``."""
    check_var_type(var_type)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return 2 * channels if var_type in LEARNED_VAR_TYPES else channels


def check_data_range(x0: Tensor, name: str = "x0", tol: float = 1e-5) -> None:
    """Raise unless ``x0`` holds finite data in ``[-1, 1]`` (the range every loss and bound assumes).

    On an accelerator the check is an asynchronous device assert (no host sync, as :meth:`Schedule.check_t`).
    """
    if not x0.numel():
        return
    ok = (x0.abs() <= 1.0 + tol).all()
    hint = "images as uint8 / 127.5 - 1 (iddpm.data.to_model_range)"
    if x0.device.type != "cpu":
        torch._assert_async(ok, f"{name} must be data scaled to [-1, 1]: {hint}")
        return
    if not bool(ok):
        lo, hi = float(x0.min()), float(x0.max())
        raise ValueError(f"{name} must be data scaled to [-1, 1] ({hint}); got values in [{lo:g}, {hi:g}]")


def split_model_output(
    out: Tensor, channels: int, var_type: str, like: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Split the network output into its mean part and (for learned variances) its variance part ``v``.

    Args:
        out: ``(B, C_out, ...)`` with ``C_out = model_out_channels(channels, var_type)``.
        channels: C, the data's channel count.
        var_type: one of :data:`VAR_TYPES`.
        like: the model's input ``(B, C, ...)``, if given: ``out`` must match its batch and spatial sizes.

    Returns:
        ``(mean_part (B, C, ...), v (B, C, ...))`` for learned variances, ``(out, None)`` otherwise.
    """
    expected = model_out_channels(channels, var_type)
    if not isinstance(out, Tensor):
        kind = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple | list) else "")
        raise TypeError(
            f"the model must return one tensor of shape (B, {expected}, ...) (var_type={var_type!r}, "
            f"C={channels}); it returned {kind}. Wrap it to return just the prediction (e.g. out[0], or "
            "out.sample for a diffusers model)"
        )
    if out.ndim < 2 or out.shape[1] != expected:
        raise ValueError(
            f"with var_type={var_type!r} and C={channels} data channels the model must output {expected} "
            f"channels (shape (B, {expected}, ...)); got shape {tuple(out.shape)}"
        )
    if like is not None and (out.shape[0] != like.shape[0] or out.shape[2:] != like.shape[2:]):
        want = (like.shape[0], expected, *like.shape[2:])
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}, but for an input of shape {tuple(like.shape)} "
            f"it must be {want} (same batch and spatial size; {expected} channels for var_type={var_type!r})"
        )
    if var_type in LEARNED_VAR_TYPES:
        mean_part, v = out.chunk(2, dim=1)
        return mean_part, v
    return out, None


def _variance(s: Schedule, v: Tensor | None, x_t: Tensor, t: Tensor, var_type: str) -> tuple[Tensor, Tensor]:
    """``(var, log_var)`` of ``p(x_{t-1} | x_t)`` for each variance type, both of ``x_t``'s shape."""
    if var_type == "learned":
        # The network outputs log sigma^2 directly (the paper mentions this as the less stable option).
        log_var = v
    elif var_type == "learned_range":
        # Paper Eq. 15: Sigma = exp(frac log beta_t + (1 - frac) log beta~_t), interpolating *log* variances
        # between the two bounds of Ho et al. The network emits v, frac = (v + 1) / 2, and v is NOT clamped
        # (the authors' code does not clamp it either: their "[-1, 1]" comment is not enforced).
        # At t = 0 the lower bound is the clipped log beta~_1 (beta~_0 = 0), the upper one log beta_0.
        min_log = extract(s.posterior_log_var_clipped, t, x_t)
        max_log = extract(torch.log(s.betas), t, x_t)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    elif var_type == "fixed_large":
        # sigma^2 = beta_t, except at t = 0 where beta~_1 replaces beta_0 "to get a better decoder log
        # likelihood" (authors' code). A one-step chain has no beta~_1 and keeps beta_0.
        first = s.posterior_var[1:2] if s.num_steps > 1 else s.betas[:1]
        large = torch.cat([first, s.betas[1:]])
        var, log_var = extract(large, t, x_t), extract(torch.log(large), t, x_t)
        return var.expand_as(x_t), log_var.expand_as(x_t)
    elif var_type == "fixed_small":
        # sigma^2 = beta~_t: exactly 0 at t = 0 (the last step adds no noise), its log clipped to log beta~_1.
        var, log_var = extract(s.posterior_var, t, x_t), extract(s.posterior_log_var_clipped, t, x_t)
        return var.expand_as(x_t), log_var.expand_as(x_t)
    else:  # pragma: no cover - validated by the caller
        check_var_type(var_type)
    return torch.exp(log_var), log_var


def p_mean_variance(
    s: Schedule,
    model_out: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    mean_type: MeanType = "eps",
    var_type: VarType = "learned_range",
    clip_x0: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
) -> PMeanVar:
    """Turn the network's output at ``(x_t, t)`` into the reverse step ``p(x_{t-1} | x_t)``.

    Mean (``mean_type``), with ``process(z) = denoised_fn(z)`` then ``clamp(z, -1, 1)`` if ``clip_x0``:

    * ``"eps"``: the network predicts the noise; ``pred_x0 = process(predict_x0_from_eps(...))`` and the mean
      is the posterior mean ``mu~_t(pred_x0, x_t)`` of the *processed* ``pred_x0``.
    * ``"x0"``: the network predicts ``x_0``; ``pred_x0 = process(out)``, mean as above.
    * ``"xprev"``: the network predicts ``mu~_t`` itself; the mean is the raw output and
      ``pred_x0 = process(predict_x0_from_xprev(...))`` (processing does not change the mean here).

    Variance (``var_type``):

    * ``"fixed_small"``: ``beta~_t`` (0 at ``t = 0``; its log clipped to ``log beta~_1``).
    * ``"fixed_large"``: ``beta_t``, with ``beta~_1`` at ``t = 0`` (as the authors' code does).
    * ``"learned"``: the variance half ``v`` of the output is ``log sigma^2``.
    * ``"learned_range"``: ``log sigma^2 = frac log beta_t + (1 - frac) log beta~_t`` with ``frac = (v+1)/2``
      (paper Eq. 15), ``v`` unclamped.

    Every coefficient comes from ``s``, so a respaced schedule uses its own (respaced) betas automatically.

    Args:
        s: the schedule the chain runs on.
        model_out: ``(B, C_out, ...)`` network output, ``C_out = model_out_channels(C, var_type)``.
        x_t: ``(B, C, ...)`` the current noisy sample.
        t: ``(B,)`` int64 in ``[0, T)`` (indices of ``s``, not of the original chain).
        mean_type: what the network predicts, one of :data:`MEAN_TYPES`.
        var_type: how the variance is chosen, one of :data:`VAR_TYPES`.
        clip_x0: clamp ``pred_x0`` to ``[-1, 1]`` (data range) before forming the mean.
        denoised_fn: optional map applied to ``pred_x0`` before the clamp.

    Returns:
        :class:`PMeanVar` of four ``(B, C, ...)`` tensors.
    """
    check_mean_type(mean_type)
    check_var_type(var_type)
    _check_x_t(s, x_t, t)
    if x_t.ndim < 2:
        raise ValueError(f"x_t must have shape (B, C, ...), got {tuple(x_t.shape)}")
    mean_part, v = split_model_output(model_out, x_t.shape[1], var_type, like=x_t)
    _check_same_shape(mean_part, x_t, "the mean part of model_out", "x_t")

    var, log_var = _variance(s, v, x_t, t, var_type)

    def process(x0: Tensor) -> Tensor:
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        return x0.clamp(-1.0, 1.0) if clip_x0 else x0

    if mean_type == "xprev":
        mean = mean_part
        pred_x0 = process(predict_x0_from_xprev(s, x_t, t, mean_part))
    else:
        raw_x0 = predict_x0_from_eps(s, x_t, t, mean_part) if mean_type == "eps" else mean_part
        pred_x0 = process(raw_x0)
        mean = q_posterior(s, pred_x0, x_t, t).mean
    return PMeanVar(mean, var, log_var, pred_x0)
