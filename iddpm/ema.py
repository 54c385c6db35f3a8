"""Exponential moving averages of the parameters, updated with ``torch._foreach_*`` ops.

One fused multi-tensor kernel per update instead of one small kernel (and possibly one ``.item()``) per
parameter: the eager UNet is launch-bound (see docs/PERFORMANCE), so a per-parameter Python loop costs
real time. The average is kept as a full copy of the model (``requires_grad=False``), so its
``state_dict()`` is a loadable model state dict and it can sample directly.

Update (authors' ``nn.update_ema``, every step, no warm-up): ``ema <- rate * ema + (1 - rate) * param``.

Warm-up (optional, :func:`ema_decay`): the n-th update (n = 0, 1, ...) uses ``min(rate, (1 + n) / (10 + n))``
instead of ``rate``. With the paper's 0.9999 a plain EMA still holds ``0.9999 ** 500 = 95%`` of the random
initial weights after 500 steps, so a short run (a CPU demo) samples noise from its EMA; with the warm-up the
EMA is close to a running mean early on and reaches the full ``rate`` after about ``9 / (1 - rate)`` steps
(90,000 for 0.9999), so long runs are unchanged in the limit. The paper's presets keep the plain EMA.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (the EMA starts equal to the parameters, as the authors do)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def check_rate(rate: float) -> float:
    """Validate an EMA rate: a float in [0, 1)."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
    return rate


def ema_decay(rate: float, num_updates: int, warmup: bool) -> float:
    """The decay of the update number ``num_updates`` (0-based): ``rate``, or with ``warmup`` the smaller of
    ``rate`` and ``(1 + n) / (10 + n)`` (a plain Python float, so no device sync in the training loop)."""
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    return min(rate, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else rate


def ema_init_weight(rate: float, steps: int, warmup: bool) -> float:
    """How much of the initial (random) weights an EMA still holds after ``steps`` updates.

    ``prod_{n < steps} ema_decay(rate, n, warmup)``: 1.0 at step 0; the plain EMA's is ``rate ** steps``.
    Computed in log space (exact enough for any step count), e.g. to warn before sampling from an EMA that
    is still mostly initial noise.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if rate == 0.0:
        return 1.0 if steps == 0 else 0.0
    if not warmup:
        return math.exp(steps * math.log(rate))
    # (1 + n) / (10 + n) < rate exactly while n < (10 rate - 1) / (1 - rate)
    n_warm = min(steps, max(0, math.ceil((10.0 * rate - 1.0) / (1.0 - rate))))
    log_w = sum(math.log((1.0 + n) / (10.0 + n)) for n in range(n_warm))
    log_w += (steps - n_warm) * math.log(rate)
    return math.exp(log_w)


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], rate: float) -> None:
    """In place: ``ema = rate * ema + (1 - rate) * param`` for every pair, in two foreach kernels.

    Args:
        ema_params: the EMA tensors (same shapes/devices/dtypes as ``params``), updated in place.
        params: the current parameters (only read).
        rate: decay in [0, 1); 0.9999 = averaging horizon of about 10,000 steps.
    """
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} tensors but the model has {len(params)}")
    torch._foreach_mul_(ema_params, rate)
    torch._foreach_add_(ema_params, params, alpha=1.0 - rate)


@torch.no_grad()
def copy_buffers(src: nn.Module, dst: nn.Module) -> None:
    """Copy non-parameter buffers (e.g. norm statistics) so an EMA model's state dict is complete."""
    for b_dst, b_src in zip(dst.buffers(), src.buffers(), strict=True):
        b_dst.copy_(b_src)
