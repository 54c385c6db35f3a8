"""Noise schedules and the :class:`Schedule` object that holds every derived quantity.

Conventions used by the whole package (stated once, here):

* ``T`` is the number of diffusion steps of a chain. Timesteps are **0-based**: ``t`` is an int64 tensor of
  shape ``(B,)`` with values in ``[0, T)``, and index ``t = 0`` is the paper's step 1.
  So ``q_sample(x0, t=0)`` has already added one step of noise, and the decoder term ``L_0`` of the bound
  sits at ``t = 0``.
* ``x0``, ``x_t`` and ``eps`` are ``(B, C, H, W)`` (any number of trailing dims works) scaled to ``[-1, 1]``.
* Schedules are computed and stored in float64. :func:`extract` gathers a per-timestep coefficient and
  casts it to the dtype of the tensor it will multiply, so float64 inputs get exact float64 maths (the
  authors' code casts to float32 whatever the input).
* A respaced chain (see :mod:`iddpm.respace`) is just another :class:`Schedule` whose ``timesteps`` maps its
  own index to the index of the original chain. The network always sees original-chain timesteps.

Chapter: book/01_forward_process, book/02_noise_schedules
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "betas_from_alpha_bar",
    "cosine_alpha_bar",
    "cosine_betas",
    "extract",
    "get_betas",
    "linear_betas",
]

ScheduleName = Literal["linear", "cosine"]
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "cosine")


def _check_num_steps(num_steps: int, minimum: int = 1) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < minimum:
        raise ValueError(f"num_steps must be >= {minimum}, got {num_steps}")


def linear_betas(num_steps: int) -> Tensor:
    """The linear schedule of Ho et al. (2020), scaled by ``1000 / T`` as in the authors' code.

    ``beta = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)``, so T = 1000 gives 1e-4 ... 0.02 and T = 4000 gives
    2.5e-5 ... 5e-3. The scaling keeps the total amount of noise roughly independent of T.

    Args:
        num_steps: T, at least 21. For T <= 20 the last beta is >= 1 (T = 20 gives exactly 1, so alpha_bar
            reaches 0 and every 1/alpha_bar coefficient becomes infinite); such a chain is not a valid
            diffusion.

    Returns:
        ``(T,)`` float64 betas.
    """
    _check_num_steps(num_steps)
    if num_steps <= 20:
        raise ValueError(
            f"the linear schedule needs num_steps > 20: with T={num_steps} its last beta is "
            f"0.02*1000/T = {20.0 / num_steps:.3g} >= 1, which destroys the signal completely. "
            "Use T > 20 or the cosine schedule, which works for any T >= 1."
        )
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_alpha_bar(u: Tensor | float, s: float = 0.008) -> Tensor:
    """The paper's ``f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)`` as a function of ``u = t / T`` in [0, 1].

    ``alpha_bar_t = f(t) / f(0)``. The offset ``s`` keeps beta small near t = 0 so the model
    can predict the noise accurately there.

    Args:
        u: fractional time(s) ``t / T`` in [0, 1], any shape.
        s: the offset, 0.008 in the paper.

    Returns:
        ``f(u)`` in float64, same shape as ``u`` (not divided by ``f(0)``).
    """
    if s < 0:
        raise ValueError(f"the cosine offset s must be >= 0, got {s}")
    u = torch.as_tensor(u, dtype=torch.float64)
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def betas_from_alpha_bar(
    alpha_bar: Callable[[float], float], num_steps: int, max_beta: float = 0.999
) -> Tensor:
    """Betas of a chain whose cumulative product follows ``alpha_bar(u)`` for ``u = t / T`` in [0, 1].

    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``: only consecutive ratios are used, and
    each beta is clipped (the paper clips at 0.999 to avoid singularities near t = T). ``alpha_bar`` need not
    be normalised: ``alpha_bar(0)`` cancels in the ratios.

    Args:
        alpha_bar: a function of a python float ``u`` in [0, 1], positive on [0, 1).
        num_steps: T >= 1.
        max_beta: the clip, in (0, 1]; 1 leaves the betas unclipped (for a figure: a :class:`Schedule`
            refuses beta = 1).

    Returns:
        ``(T,)`` float64 betas.
    """
    _check_num_steps(num_steps)
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
    betas = []
    for i in range(num_steps):
        a0, a1 = float(alpha_bar(i / num_steps)), float(alpha_bar((i + 1) / num_steps))
        if not a0 > 0:
            raise ValueError(f"alpha_bar({i}/{num_steps}) = {a0} must be > 0")
        betas.append(min(1.0 - a1 / a0, max_beta))
    out = torch.tensor(betas, dtype=torch.float64)
    if (out <= 0).any():
        raise ValueError("alpha_bar must be strictly decreasing: got a beta <= 0")
    return out


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The paper's cosine schedule, betas clipped at ``max_beta`` = 0.999.

    Returns:
        ``(T,)`` float64 betas. For every T the authors used, only the last beta reaches the clip.
    """
    if s < 0:
        raise ValueError(f"the cosine offset s must be >= 0, got {s}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(
            f"max_beta must be in (0, 1) (the paper: 0.999); got {max_beta}. The unclipped last beta is 1, "
            "which makes alpha_bar 0 and sampling and bits/dim NaN"
        )
    return betas_from_alpha_bar(lambda u: float(cosine_alpha_bar(u, s)), num_steps, max_beta)


def get_betas(name: str, num_steps: int) -> Tensor:
    """Betas of a named schedule: ``"linear"`` or ``"cosine"``. Returns ``(T,)`` float64."""
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULE_NAMES}")


@dataclass(frozen=True, eq=False)
class Schedule:
    """Every per-timestep quantity of a Gaussian diffusion chain, as ``(T,)`` float64 tensors.

    Build it with :meth:`from_betas` (or :meth:`named`); never fill the fields by hand.

    Fields (``abar = alpha_bar``; all indexed by the 0-based ``t``):
        betas: beta_t.  alphas: 1 - beta_t.
        alpha_bar: prod_{s<=t} alpha_s.  alpha_bar_prev: alpha_bar_{t-1} (1 at t = 0).
        alpha_bar_next: alpha_bar_{t+1} (0 at t = T-1; used by DDIM inversion).
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar, log_one_minus_alpha_bar: for q(x_t | x_0).
        sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar: sqrt(1/abar) and sqrt(1/abar - 1), for eps -> x0.
        posterior_var: beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), exactly 0 at t = 0.
        posterior_log_var_clipped: log beta~_t with the t = 0 entry replaced by log beta~_1 (log 0 = -inf).
        posterior_mean_coef1, posterior_mean_coef2: mu~_t = coef1 * x0 + coef2 * x_t.
        snr: alpha_bar / (1 - alpha_bar), the signal-to-noise ratio of x_t.
        timesteps: int64 map from this chain's index to the original chain's index (arange(T) if not
            respaced).
        original_num_steps: T of the original chain (what the network was trained on).
    """

    betas: Tensor
    alphas: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    alpha_bar_next: Tensor
    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor
    log_one_minus_alpha_bar: Tensor
    sqrt_recip_alpha_bar: Tensor
    sqrt_recipm1_alpha_bar: Tensor
    posterior_var: Tensor
    posterior_log_var_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    snr: Tensor
    timesteps: Tensor
    original_num_steps: int

    @classmethod
    def from_betas(
        cls,
        betas: Tensor | Sequence[float],
        timesteps: Tensor | Sequence[int] | None = None,
        original_num_steps: int | None = None,
    ) -> Schedule:
        """Derive every quantity from ``betas`` in float64.

        Args:
            betas: ``(T,)`` values in (0, 1). T = 1 is allowed (a one-step chain).
            timesteps: ``(T,)`` increasing original-chain indices this chain's steps stand for (respacing);
                defaults to ``arange(T)``.
            original_num_steps: T of the original chain; defaults to ``T`` (or ``max(timesteps) + 1``).
        """
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            # beta = 1 makes alpha_bar 0 from there on: x_t then holds no trace of x0, the posterior and
            # predict_x0_from_eps divide by zero, and sampling and bits/dim turn NaN.
            bad = betas[~((betas > 0) & (betas < 1))]
            raise ValueError(
                f"every beta must be in (0, 1) (beta = 1 destroys x0 completely and makes sampling and "
                f"bits/dim NaN); got {bad[:5].tolist()}"
            )
        T = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(T, dtype=torch.int64)
        timesteps = torch.as_tensor(timesteps, dtype=torch.int64).detach().cpu().clone()
        if timesteps.shape != (T,):
            raise ValueError(f"timesteps must have shape ({T},) like betas, got {tuple(timesteps.shape)}")
        if T > 1 and not (timesteps[1:] > timesteps[:-1]).all():
            raise ValueError("timesteps must be strictly increasing")
        if (timesteps < 0).any():
            raise ValueError("timesteps must be >= 0")
        if original_num_steps is None:
            original_num_steps = int(timesteps[-1]) + 1
        if int(timesteps[-1]) >= original_num_steps:
            raise ValueError(
                f"timesteps reach {int(timesteps[-1])}, outside the original chain of "
                f"{original_num_steps} steps"
            )

        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        one = torch.ones(1, dtype=torch.float64)
        alpha_bar_prev = torch.cat([one, alpha_bar[:-1]])
        alpha_bar_next = torch.cat([alpha_bar[1:], torch.zeros(1, dtype=torch.float64)])
        # beta~_t, the posterior variance. At t = 0, abar_prev = 1 so beta~_0 = 0 exactly.
        posterior_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # log 0 = -inf at t = 0: clip the *log* only, to log beta~_1 (the plain variance keeps its 0).
        # A one-step chain has no beta~_1; there the decoder's variance is beta_0 itself.
        first = posterior_var[1:2] if T > 1 else betas[:1]
        posterior_log_var_clipped = torch.log(torch.cat([first, posterior_var[1:]]))
        snr = alpha_bar / (1.0 - alpha_bar)
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            alpha_bar_next=alpha_bar_next,
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=(1.0 - alpha_bar).sqrt(),
            log_one_minus_alpha_bar=torch.log(1.0 - alpha_bar),
            sqrt_recip_alpha_bar=(1.0 / alpha_bar).sqrt(),
            sqrt_recipm1_alpha_bar=(1.0 / alpha_bar - 1.0).sqrt(),
            posterior_var=posterior_var,
            posterior_log_var_clipped=posterior_log_var_clipped,
            # posterior mean: mu~_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t
            posterior_mean_coef1=betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            posterior_mean_coef2=(1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
            snr=snr,
            timesteps=timesteps,
            original_num_steps=int(original_num_steps),
        )

    @classmethod
    def named(cls, name: str, num_steps: int) -> Schedule:
        """``Schedule.from_betas(get_betas(name, num_steps))``: ``"linear"`` or ``"cosine"``."""
        return cls.from_betas(get_betas(name, num_steps))

    @property
    def num_steps(self) -> int:
        """T of this chain (the respaced count for a respaced schedule)."""
        return self.betas.numel()

    @property
    def is_respaced(self) -> bool:
        return self.num_steps != self.original_num_steps

    def to(self, device: torch.device | str) -> Schedule:
        """A copy with every tensor on ``device`` (float64 kept, except on MPS which has no float64)."""
        device = torch.device(device)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                if device.type == "mps" and v.dtype == torch.float64:
                    v = v.float()
                v = v.to(device)
            kw[f.name] = v
        return Schedule(**kw)

    def check_t(self, t: Tensor) -> None:
        """Raise a clear error unless ``t`` is an integer tensor with values in ``[0, T)``."""
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be an int64 tensor of shape (B,), got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be an integer tensor (int64), got dtype {t.dtype}")
        if t.ndim != 1:
            raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
        if not t.numel():
            return
        if t.device.type != "cpu":
            # On an accelerator, reading min/max back would stall the host on every call (several per training
            # and sampling step) and rule out CUDA-graph capture. An asynchronous device-side assert keeps the
            # check without a sync: a bad t aborts the next synchronising call with this message.
            torch._assert_async(
                ((t >= 0) & (t < self.num_steps)).all(),
                f"t must be in [0, {self.num_steps}) for this {self.num_steps}-step schedule",
            )
            return
        if int(t.min()) < 0 or int(t.max()) >= self.num_steps:
            raise ValueError(
                f"t must be in [0, {self.num_steps}) for this {self.num_steps}-step schedule; "
                f"got values in [{int(t.min())}, {int(t.max())}]"
            )

    def model_timesteps(self, t: Tensor, rescale: bool = False) -> Tensor:
        """What the network sees for this chain's ``t``: the original-chain index, optionally rescaled.

        Args:
            t: ``(B,)`` int64 in ``[0, T)``.
            rescale: if True, return ``timesteps[t] * 1000 / original_num_steps`` as float32, so the network
                always sees a 0..1000 range whatever T is (the authors' ``rescale_timesteps=True``); otherwise
                the raw int64 original index.

        Returns:
            ``(B,)`` int64 or float32 on ``t``'s device.
        """
        self.check_t(t)
        mapped = self.timesteps.to(t.device)[t]
        if rescale:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped


def extract(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather ``a[t]`` and shape it to broadcast against ``x``.

    Args:
        a: ``(T,)`` per-timestep coefficients (float64 in a :class:`Schedule`).
        t: ``(B,)`` int64 timesteps.
        x: the ``(B, ...)`` tensor the coefficient will multiply; sets the device and (floating) dtype.

    Returns:
        ``(B, 1, ..., 1)`` with ``x.ndim`` dims, dtype of ``x`` (float32 if ``x`` is not floating point).
    """
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must have shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}; got {tuple(t.shape)}"
        )
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    if x.device.type == "mps" and a.dtype == torch.float64:
        a = a.float()
    out = a.to(x.device)[t.to(x.device)].to(dtype)
    return out.reshape(x.shape[0], *([1] * (x.ndim - 1)))
