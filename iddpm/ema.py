"""Exponential moving averages of the parameters, updated with ``torch._foreach_*`` ops.

One fused multi-tensor kernel per update instead of one small kernel (and possibly one ``.item()``) per
parameter: the eager UNet is launch-bound (see docs/PERFORMANCE), so a per-parameter Python loop costs
real time. The average is kept as a full copy of the model (``requires_grad=False``), so its
``state_dict()`` is a loadable model state dict and it can sample directly.

Update (authors' ``nn.update_ema``, every step, no warm-up): ``ema <- rate * ema + (1 - rate) * param``.
"""

from __future__ import annotations

import copy

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
