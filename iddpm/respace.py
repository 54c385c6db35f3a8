"""Respacing: sample with K < T steps from a model trained on a T-step chain (the paper's fast sampling).

Pick an increasing subsequence ``k_0 < k_1 < ... < k_{K-1}`` of the original indices. The marginals
``q(x_k | x_0)`` of the kept steps only depend on ``alpha_bar[k]``, so a K-step chain with the same
``alpha_bar`` at its steps has the same marginals. Its betas follow from consecutive ratios,
``beta'_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}]`` (with ``alpha_bar[k_{-1}] = 1``), and every derived
quantity (the posterior variance beta~', the learned-variance bounds) is recomputed from these betas. The
network keeps seeing original-chain timesteps, through ``Schedule.timesteps``.

:func:`space_timesteps` reproduces the authors' choice of kept steps exactly, including its use of Python's
banker's rounding on an accumulated float.

Chapter: book/03_reverse_process, book/08_respacing
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["respace", "space_timesteps"]


def _ddim_stride(num_steps: int, count: int) -> list[int]:
    """DDIM style: ``range(0, T, i)`` for the first stride ``i`` in ``[1, T)`` giving ``count`` steps."""
    for stride in range(1, num_steps):
        if len(range(0, num_steps, stride)) == count:
            return list(range(0, num_steps, stride))
    # len(range(0, T, i)) = ceil(T / i): list the closest counts a stride can give, to help the user.
    reachable = sorted({len(range(0, num_steps, i)) for i in range(1, num_steps)})
    below = [c for c in reachable if c < count]
    above = [c for c in reachable if c > count]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    raise ValueError(
        f"'ddim{count}': no integer stride in [1, {num_steps}) gives exactly {count} steps out of "
        f"{num_steps} (range(0, {num_steps}, stride) has ceil({num_steps}/stride) elements); the nearest "
        f"counts that work are {near}"
    )


def _parse_counts(sections: str | Sequence[int]) -> list[int]:
    if isinstance(sections, str):
        parts = [p.strip() for p in sections.split(",")]
        if sections.strip() == "" or any(p == "" for p in parts):
            raise ValueError(
                f"section counts {sections!r} are empty or have an empty entry; expected e.g. '50', "
                "'10,15,20' or 'ddim50'"
            )
        counts = []
        for p in parts:
            try:
                counts.append(int(p))
            except ValueError:
                raise ValueError(
                    f"section count {p!r} in {sections!r} is not an integer; "
                    "expected e.g. '50', '10,15,20' or 'ddim50'"
                ) from None
    else:
        try:
            counts = [operator.index(c) for c in sections]
        except TypeError:
            raise TypeError(f"sections must be a string or a sequence of ints, got {sections!r}") from None
        if any(isinstance(c, bool) for c in sections):
            raise TypeError(f"sections must be ints, not bools: {sections!r}")
        if not counts:
            raise ValueError("sections is an empty sequence; give at least one step count")
    if any(c < 1 for c in counts):
        raise ValueError(f"every section count must be >= 1, got {counts}")
    return counts


def space_timesteps(num_steps: int, sections: str | Sequence[int]) -> list[int]:
    """Which original steps to keep, exactly as the authors' ``space_timesteps``.

    Args:
        num_steps: T of the original chain.
        sections: one of

            * ``"ddimN"``: the first integer stride ``i`` in ``[1, T)`` with ``len(range(0, T, i)) == N``,
              giving ``range(0, T, i)``. Note this does not end at T-1 in general (ddim50 at T=1000 is
              0, 20, ..., 980).
            * ``"a,b,c"`` / ``"50"`` / ``[a, b, c]``: split ``[0, T)`` into ``n`` equal sections (the
              first ``T % n`` one step longer) and keep ``a``, ``b``, ``c`` evenly spaced steps in each. A
              section with ``size`` steps keeping ``count`` of them takes ``start + round(cur)`` with
              ``cur = 0, d, d + d, ...`` and ``d = (size - 1) / (count - 1)`` (Python's half-to-even
              ``round`` on the accumulated float), so it keeps both of its ends (when ``count >= 2``).

    Returns:
        The kept original indices, sorted ascending (no duplicates).

    Raises:
        ValueError: for malformed, empty, zero or negative counts, a section asking for more steps than it
            has, or a ``ddimN`` that no integer stride achieves.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if isinstance(sections, str) and sections.strip().startswith("ddim"):
        rest = sections.strip()[len("ddim") :]
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"{sections!r}: expected 'ddimN' with N a positive integer, e.g. 'ddim50'")
        return _ddim_stride(num_steps, int(rest))

    counts = _parse_counts(sections)
    n = len(counts)
    size_per, extra = divmod(num_steps, n)
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"section {i} of {n} covers {size} steps (T={num_steps} split into {n} sections) and "
                f"cannot keep {count} of them; ask for at most {size} per section"
            )
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Like the authors: accumulate the float stride and use Python's round (half to even).
        # round(j * frac_stride) or round-half-up would pick different steps in some cases (see tests).
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(kept)


def respace(s: Schedule, kept: Sequence[int] | Tensor) -> Schedule:
    """The chain that visits only the steps ``kept`` of ``s``, with every quantity recomputed.

    ``beta'_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}]`` (``alpha_bar[k_{-1}] = 1``), so ``alpha_bar'_i =
    alpha_bar[k_i]`` (up to rounding) and the kept marginals ``q(x_k | x_0)`` are unchanged. Respacing an
    already respaced schedule composes: ``kept`` indexes ``s``'s own steps and is mapped through
    ``s.timesteps``.

    Args:
        s: a (possibly respaced) schedule with ``T = s.num_steps`` steps.
        kept: strictly increasing indices in ``[0, T)``, e.g. from :func:`space_timesteps`.

    Returns:
        A ``Schedule`` with ``len(kept)`` steps, ``timesteps = s.timesteps[kept]`` (original-chain indices)
        and ``original_num_steps = s.original_num_steps``.
    """
    if isinstance(kept, Tensor):
        if kept.dtype.is_floating_point or kept.dtype == torch.bool or kept.is_complex():
            raise TypeError(f"kept must hold integers, got dtype {kept.dtype}")
        if kept.ndim != 1:
            raise ValueError(f"kept must be 1-D, got shape {tuple(kept.shape)}")
        idx = [int(k) for k in kept.tolist()]
    else:
        try:
            idx = [operator.index(k) for k in kept]
        except TypeError:
            raise TypeError(f"kept must be a sequence of ints, got {kept!r}") from None
    if not idx:
        raise ValueError("kept is empty; keep at least one step")
    if min(idx) < 0 or max(idx) >= s.num_steps:
        raise ValueError(f"kept must lie in [0, {s.num_steps}); got values in [{min(idx)}, {max(idx)}]")
    if any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
        raise ValueError("kept must be strictly increasing (sorted, no duplicates); try sorted(set(kept))")

    k = torch.tensor(idx, dtype=torch.int64)
    alpha_bar = s.alpha_bar.cpu()[k]
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    new_betas = 1.0 - alpha_bar / alpha_bar_prev
    return Schedule.from_betas(
        new_betas, timesteps=s.timesteps.cpu()[k], original_num_steps=s.original_num_steps
    )
