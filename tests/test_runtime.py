"""Tests for iddpm.runtime: FAST mode, device choice, seeding, Colab detection, compile policy."""

from __future__ import annotations

import random
import sys
import types

import numpy as np
import pytest
import torch

from iddpm import runtime
from iddpm.runtime import (
    AUTO_COMPILE_MIN_STEPS,
    COMPILE_MODES,
    check_compile_mode,
    choose_compile,
    compile_model,
    resolve_compile,
)


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_fast_mode_true_values(value: str) -> None:
    assert runtime.fast_mode(value, cuda_available=True) is True


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_fast_mode_false_values(value: str) -> None:
    assert runtime.fast_mode(value, cuda_available=False) is False


def test_fast_mode_unset_follows_the_gpu() -> None:
    # CPU reader / CI -> quick version; a GPU (Colab) -> the full one.
    assert runtime.fast_mode("", cuda_available=False) is True
    assert runtime.fast_mode("", cuda_available=True) is False


def test_fast_mode_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDDPM_FAST", "0")
    assert runtime.fast_mode() is False
    monkeypatch.setenv("IDDPM_FAST", "1")
    assert runtime.fast_mode() is True
    monkeypatch.delenv("IDDPM_FAST")
    assert runtime.fast_mode() is (not torch.cuda.is_available())


def test_fast_mode_rejects_typos() -> None:
    with pytest.raises(ValueError, match="IDDPM_FAST"):
        runtime.fast_mode("ture")


def test_module_flag_is_a_bool() -> None:
    assert isinstance(runtime.FAST, bool)


def test_get_device_argument_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDDPM_DEVICE", "meta")
    assert runtime.get_device() == torch.device("meta")
    assert runtime.get_device("cpu") == torch.device("cpu")  # the argument beats the environment
    monkeypatch.setenv("IDDPM_DEVICE", "not-a-device")
    with pytest.raises(ValueError, match="not-a-device"):
        runtime.get_device()


def test_get_device_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDDPM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("cuda")


def test_seed_everything_is_reproducible() -> None:
    def draw() -> tuple[float, float, torch.Tensor, torch.Tensor]:
        return random.random(), float(np.random.rand()), torch.rand(3), torch.rand(3, generator=g)  # noqa: NPY002

    g = runtime.seed_everything(123)
    first = draw()
    g = runtime.seed_everything(123)
    second = draw()
    assert first[:2] == second[:2]
    torch.testing.assert_close(first[2], second[2])
    torch.testing.assert_close(first[3], second[3])
    assert isinstance(g, torch.Generator) and g.device == torch.device("cpu")
    assert g.initial_seed() == 123


def test_seed_everything_changes_with_the_seed() -> None:
    a = torch.rand(4, generator=runtime.seed_everything(0))
    b = torch.rand(4, generator=runtime.seed_everything(1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_seed_everything_rejects_bad_seeds(bad: object) -> None:
    with pytest.raises(ValueError):
        runtime.seed_everything(bad)  # type: ignore[arg-type]


def test_in_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.in_colab() is False
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    google.colab = colab  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert runtime.in_colab() is True


def test_get_device_refuses_missing_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDDPM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValueError, match=rf"device '{name}'.*not available.*available here: cpu$"):
            runtime.get_device(name)
    monkeypatch.setenv("IDDPM_DEVICE", "cuda")
    with pytest.raises(ValueError, match="IDDPM_DEVICE"):
        runtime.get_device()
    monkeypatch.delenv("IDDPM_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.get_device("cuda:1") == torch.device("cuda", 1)
    assert runtime.get_device("mps") == torch.device("mps")
    with pytest.raises(
        ValueError, match=r"only 2 CUDA device.*available here: cpu, cuda \(cuda:0..cuda:1\), mps"
    ):
        runtime.get_device("cuda:2")


# --------------------------------------------------------------------------------------------- compile policy


@pytest.mark.parametrize(
    ("requested", "device", "world", "steps", "cap", "triton", "expected"),
    [
        (None, "cuda", 1, 500_000, (9, 0), True, True),  # long single-GPU run: compile
        (None, "cuda", 1, None, (7, 5), True, True),  # T4, length unknown (the bench): compile
        (None, "cuda", 1, AUTO_COMPILE_MIN_STEPS - 1, (9, 0), True, False),  # too short to pay off
        (None, "cuda", 1, AUTO_COMPILE_MIN_STEPS, (9, 0), True, True),
        (None, "cuda", 8, 500_000, (9, 0), True, False),  # DDP: only when asked
        (None, "cuda", 1, 500_000, (6, 1), True, False),  # Pascal: Triton does not support it
        (None, "cuda", 1, 500_000, (9, 0), False, False),  # no Triton (e.g. Windows)
        (None, "cpu", 1, 500_000, None, True, False),
        (None, "mps", 1, 500_000, None, True, False),
        (True, "cpu", 1, 10, None, False, True),  # an explicit choice always wins
        (False, "cuda", 1, 500_000, (9, 0), True, False),
    ],
)
def test_choose_compile_table(requested, device, world, steps, cap, triton, expected) -> None:
    got = choose_compile(
        requested, device, world_size=world, total_steps=steps, capability=cap, has_triton=triton
    )
    assert got is expected


def test_resolve_compile_on_cpu() -> None:
    assert resolve_compile(None, torch.device("cpu"), total_steps=10**6) is False
    assert resolve_compile(True, torch.device("cpu")) is True


def test_compile_modes_are_checked() -> None:
    assert check_compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="unknown compile mode 'fast'.*reduce-overhead"):
        check_compile_mode("fast")
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_model(torch.nn.Identity(), "turbo")
    assert set(COMPILE_MODES) >= {"default", "reduce-overhead", "max-autotune"}
