"""Mixed-precision policy: which autocast dtype and whether a gradient scaler, as a pure function.

The decision depends only on the device type and whether it supports bfloat16, so it is tested as a table
(``tests/test_precision.py``) without a GPU:

============  =============  ===========================================================
device        bf16 support   ``precision="auto"`` gives
============  =============  ===========================================================
cuda          yes            bf16 autocast, no scaler (bf16 has fp32's exponent range)
cuda          no (T4, V100)  fp16 autocast + ``torch.amp.GradScaler`` (fp16 underflows)
cpu           any            fp32 (CPU autocast is slow for convolutions; exact resume)
mps           any            fp32 (autocast coverage on MPS is partial)
============  =============  ===========================================================

An explicit ``"bf16"``/``"fp16"``/``"fp32"`` is honoured where the device can run it, and refused with a
clear error where it cannot (fp16 on CPU, bf16 on a CUDA card without it). Autocast replaces the authors'
hand-written fp16 master weights (``fp16_util.py``): parameters and the optimiser stay float32.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DEVICE_TYPES = ("cpu", "cuda", "mps")


class PrecisionPolicy(NamedTuple):
    """The resolved policy.

    name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    autocast_dtype: dtype for ``torch.autocast``, or None for plain float32.
    use_scaler: whether losses go through ``torch.amp.GradScaler`` (fp16 only).
    """

    name: str
    autocast_dtype: torch.dtype | None
    use_scaler: bool


def choose_precision(requested: str, device_type: str, bf16_supported: bool) -> PrecisionPolicy:
    """Resolve ``requested`` (``"auto"|"fp32"|"bf16"|"fp16"``) for a device; pure, no device queries.

    Args:
        requested: the user's choice.
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``.
        bf16_supported: whether this device computes in bfloat16 (``torch.cuda.is_bf16_supported()`` on CUDA).

    Raises:
        ValueError: unknown name or device, or a precision the device cannot run.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {PRECISIONS}")
    if device_type not in _DEVICE_TYPES:
        raise ValueError(f"unknown device type {device_type!r}; choose one of {_DEVICE_TYPES}")
    if requested == "auto":
        if device_type == "cuda":
            requested = "bf16" if bf16_supported else "fp16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return PrecisionPolicy("fp32", None, False)
    if requested == "bf16":
        if not bf16_supported:
            raise ValueError(f"precision 'bf16' is not supported on this {device_type} device; use fp16/fp32")
        if device_type == "mps":
            raise ValueError("precision 'bf16' is not supported on MPS here; use 'fp32'")
        return PrecisionPolicy("bf16", torch.bfloat16, False)
    # fp16: only CUDA has fp16 autocast + GradScaler worth using.
    if device_type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {device_type}); use 'bf16' or 'fp32'")
    return PrecisionPolicy("fp16", torch.float16, True)


def bf16_native_capability(capability: tuple[int, int]) -> bool:
    """True for CUDA compute capabilities with native bf16 (8.0 and newer: A100, RTX 30xx, L4, H100, ...)."""
    return capability[0] >= 8


def bf16_supported(device: torch.device) -> bool:
    """Query whether ``device`` can compute in bfloat16 (the impure half of :func:`choose_precision`)."""
    if device.type == "cuda":
        # Native bf16 tensor cores start at compute capability 8.0 (Ampere). `torch.cuda.is_bf16_supported()`
        # also answers True on a T4 (7.5) where bf16 is only emulated (slow, no cuDNN bf16 convolutions),
        # and its `including_emulation=False` argument needs torch >= 2.3: ask for the capability directly.
        return bf16_native_capability(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        # CPU autocast runs bf16 on any x86/ARM CPU (emulated where there is no native support).
        return True
    return False


def resolve_precision(requested: str, device: torch.device) -> PrecisionPolicy:
    """:func:`choose_precision` for an actual device."""
    return choose_precision(requested, device.type, bf16_supported(device))


def autocast(policy: PrecisionPolicy, device: torch.device) -> contextlib.AbstractContextManager:
    """The ``torch.autocast`` context for ``policy`` (a null context for fp32)."""
    if policy.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=policy.autocast_dtype)


def make_scaler(policy: PrecisionPolicy, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16, else None."""
    if not policy.use_scaler:
        return None
    return torch.amp.GradScaler(device.type)
