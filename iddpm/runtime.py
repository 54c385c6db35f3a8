"""Where the code runs: FAST mode, the device, seeding and Colab detection.

The book's chapters (and CI) use these so every chapter runs anywhere without edits:

* ``FAST`` picks the quick version of a chapter (small T, few images, few training steps). It is read once, at
  import, from the ``IDDPM_FAST`` environment variable:

  ========================  =======================================================================
  ``IDDPM_FAST``            ``FAST``
  ========================  =======================================================================
  ``1`` / ``true`` / ...    True  (CI, ``make book-fast``, a quick local run)
  ``0`` / ``false`` / ...   False (the full version, even on a CPU: slow but complete)
  unset or empty            True when no CUDA GPU is available, False when one is. So a reader on a
                            laptop CPU or a CI runner gets the quick version and a Colab GPU the full one.
  ========================  =======================================================================

* :func:`get_device` chooses ``cuda``, then ``mps``, then ``cpu``; ``IDDPM_DEVICE`` overrides it.
* :func:`seed_everything` seeds Python, NumPy and torch and returns a CPU ``torch.Generator``. Draw noise from
  that generator on the CPU and move it to the device: a seeded CPU generator gives the same numbers on every
  machine, whereas CUDA's generator gives different ones.
* :func:`in_colab` tells whether we run inside Google Colab.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

__all__ = [
    "COMPILE_MODES", "FAST", "choose_compile", "compile_model", "fast_mode", "get_device", "in_colab",
    "resolve_compile", "seed_everything", "to_device_async",
]  # fmt: skip

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def fast_mode(value: str | None = None, cuda_available: bool | None = None) -> bool:
    """Decide FAST mode from an ``IDDPM_FAST`` value (the environment's when ``value`` is None).

    Args:
        value: the setting, e.g. ``"1"`` or ``"0"``; None reads ``os.environ["IDDPM_FAST"]``.
        cuda_available: whether a CUDA GPU is present; None asks torch. Only used when ``value`` is unset.

    Returns:
        True for the quick version of a chapter.

    Raises:
        ValueError: for a value that is neither true-like nor false-like (a typo must not silently pick
            a mode).
    """
    if value is None:
        value = os.environ.get("IDDPM_FAST")
    value = (value or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value == "":
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        return not cuda_available
    raise ValueError(f"IDDPM_FAST={value!r} is not understood; use one of {_TRUE + _FALSE} or leave it unset")


FAST: bool = fast_mode()
"""True for the quick version of the chapters; see the module docstring. Read once, at import."""


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to compute on.

    Args:
        prefer: a device to use as is (``"cpu"``, ``"cuda:1"``, ...). None reads ``IDDPM_DEVICE``; when
            that is unset too, the first available of ``cuda``, ``mps`` and ``cpu``.

    Returns:
        A ``torch.device``.

    Raises:
        ValueError: if the requested device is unknown to torch or not available here (e.g. ``"cuda"`` with a
            CPU-only torch, or ``"cuda:3"`` on a 2-GPU machine); the message lists the available devices.
    """
    prefer = prefer or os.environ.get("IDDPM_DEVICE") or None
    if prefer:
        try:
            dev = torch.device(prefer)
        except RuntimeError as err:  # torch raises RuntimeError for unknown device strings
            raise ValueError(
                f"unknown device {prefer!r} (from the argument or IDDPM_DEVICE): {err}; "
                f"available here: {', '.join(_available_devices())}"
            ) from err
        _check_available(dev, prefer)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        out.append("cuda" if n <= 1 else f"cuda (cuda:0..cuda:{n - 1})")
    if _mps_available():
        out.append("mps")
    return out


def _check_available(dev: torch.device, requested: object) -> None:
    """Refuse a CUDA/MPS device this machine lacks (torch would fail later with a bare AssertionError)."""
    ok = True
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        ok = _mps_available()
    if not ok:
        if dev.type == "mps":
            why = "MPS (Apple GPU) is not available"
        elif torch.cuda.is_available():
            why = f"there are only {torch.cuda.device_count()} CUDA device(s)"
        else:
            why = "this torch has no CUDA support or no GPU is visible"
        raise ValueError(
            f"device {str(requested)!r} (from the argument or IDDPM_DEVICE) is not available: {why}; "
            f"available here: {', '.join(_available_devices())}"
        )


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every GPU).

    Args:
        seed: a non-negative integer.

    Returns:
        A new CPU ``torch.Generator`` seeded with ``seed``. Pass it as ``generator=`` so a chapter's pictures
        don't depend on how many random numbers earlier cells drew, nor on the device.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    # Seeding NumPy's legacy global RNG is the point here (code that calls np.random.* directly); its seed
    # must fit in 32 bits.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def in_colab() -> bool:
    """True inside Google Colab.

    A try/except import, because ``importlib.util.find_spec("google.colab")`` *raises* off Colab (there is no
    ``google`` package to search in).
    """
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


# torch.compile's modes. "reduce-overhead" adds CUDA graphs: the whole compiled forward (and backward) replays
# as one launch, so the Python/launch cost per kernel disappears; it needs fixed shapes (the bench, training
# and sampling all have them) and costs some extra GPU memory for the graphs' private pool. On a CPU it is
# the same as "default".
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> str:
    """Validate a ``torch.compile`` mode name (see :data:`COMPILE_MODES`)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    return mode


def compile_model(model: Any, mode: str = "default") -> Any:
    """``torch.compile(model, mode=mode)`` after checking ``mode`` (compilation happens at the first call)."""
    return torch.compile(model, mode=check_compile_mode(mode))


# Compiling the CIFAR-10 model for training took 81 s on an H200 and saves 57 ms per step against eager bf16
# (docs/PERFORMANCE.md): it pays off after about 1,400 steps, so shorter runs stay eager by default.
AUTO_COMPILE_MIN_STEPS = 2000


def choose_compile(
    requested: bool | None,
    device_type: str,
    *,
    world_size: int = 1,
    total_steps: int | None = None,
    capability: tuple[int, int] | None = None,
    has_triton: bool = True,
) -> bool:
    """Whether to ``torch.compile``: ``requested`` if True/False, else the automatic choice (pure function).

    Automatic (``requested=None``): on for a single CUDA process with Triton on a GPU of compute capability
    >= 7.0 (T4 and newer), when the run is long enough for compilation to pay off (``total_steps`` >=
    :data:`AUTO_COMPILE_MIN_STEPS`, or unknown). Off on CPU/MPS (compiling takes minutes there and gains
    little), under DDP (not measured here) and without Triton.
    """
    if requested is not None:
        return bool(requested)
    if device_type != "cuda" or world_size != 1 or not has_triton:
        return False
    if capability is not None and capability < (7, 0):
        return False
    return total_steps is None or total_steps >= AUTO_COMPILE_MIN_STEPS


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_compile(
    requested: bool | None, device: torch.device, *, world_size: int = 1, total_steps: int | None = None
) -> bool:
    """:func:`choose_compile` for an actual device (queries its capability and whether Triton imports)."""
    if requested is not None or device.type != "cuda":
        return choose_compile(requested, device.type, world_size=world_size, total_steps=total_steps)
    return choose_compile(
        None, "cuda", world_size=world_size, total_steps=total_steps,
        capability=torch.cuda.get_device_capability(device), has_triton=_has_triton(),
    )  # fmt: skip


def to_device_async(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without stalling the host on CUDA.

    A plain ``.to("cuda")`` (``non_blocking`` or not) from pageable memory synchronises with the GPU stream,
    i.e. it waits for the previous training step to finish before the next one can be queued: one host sync
    per step. A pinned copy with ``non_blocking=True`` is queued on the stream instead (PyTorch's pinned
    memory cache keeps the source alive until the copy has run). Elsewhere this is ``x.to(device)``.
    """
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
