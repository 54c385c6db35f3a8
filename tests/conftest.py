"""Shared fixtures: small float64 schedules and data on the 8-bit grid of [-1, 1]."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from iddpm.schedules import Schedule


@pytest.fixture
def cosine20() -> Schedule:
    """A 20-step cosine chain (the smallest the tests need; its last beta is clipped at 0.999)."""
    return Schedule.named("cosine", 20)


@pytest.fixture
def linear50() -> Schedule:
    """A 50-step linear chain (betas 2e-3 ... 0.4 after the 1000/T scaling)."""
    return Schedule.named("linear", 50)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def grid_x0(gen: torch.Generator) -> Callable[..., torch.Tensor]:
    """``grid_x0(*shape)``: float64 data ``k / 127.5 - 1`` for uniform random pixel values ``k`` in 0..255."""

    def make(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen).double() / 127.5 - 1.0

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test single-threaded: with tensors this small, intra-op thread synchronisation dominates (10-80x
    slower when the 2 CPU cores are shared). Restored afterwards so other tests are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
