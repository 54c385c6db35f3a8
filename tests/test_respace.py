"""Tests for iddpm.respace: the authors' kept-step rule and the recomputed respaced schedule."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from iddpm.respace import respace, space_timesteps
from iddpm.schedules import Schedule


def _reference_sections(T: int, counts: list[int], how: str) -> list[int]:
    """Independent, explicit-loop re-statement of the section rule, with a choice of how ``cur`` is formed.

    how = "accumulate": the authors' rule, ``cur`` grows by repeated float addition, Python ``round``.
    how = "multiply":   ``cur = j * stride`` (what a vectorised reimplementation would do), Python ``round``.
    how = "half_up":    accumulated ``cur``, but ``floor(cur + 0.5)`` (school rounding).
    """
    n = len(counts)
    kept = []
    start = 0
    for i in range(n):
        size = T // n
        if i < T % n:
            size += 1
        count = counts[i]
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        cur = 0.0
        for j in range(count):
            if how == "multiply":
                kept.append(start + round(j * stride))
            elif how == "half_up":
                kept.append(start + int(cur + 0.5))
            else:
                kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def test_ddim_strides():
    # ddim50 @ 1000: the first stride with ceil(1000/i) == 50 is i = 20 -> 0, 20, ..., 980 (no 999).
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # ddim10 @ 1000: stride 100 -> 0, 100, ..., 900.
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    # ddim3 @ 10: ceil(10/4) == 3 at i = 4 (i = 3 gives 4 steps) -> 0, 4, 8.
    assert space_timesteps(10, "ddim3") == [0, 4, 8]


def test_ddim_unreachable_count_has_correct_message():
    # ceil(10/i) for i = 1..9 is 10, 5, 4, 3, 2, 2, 2, 2, 2: 7 steps are unreachable; its neighbours are
    # 5 and 10.
    with pytest.raises(ValueError, match=r"exactly 7 steps out of 10.*\[5, 10\]"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(10, "ddimx")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(10, "ddim0")


def test_t6_three_steps_uses_bankers_rounding():
    # size 6, count 3 -> stride (6-1)/(3-1) = 2.5, cur = 0, 2.5, 5.0. round(2.5) = 2 (half to even), so {0, 2,
    # 5}; rounding half up would give {0, 3, 5}.
    assert space_timesteps(6, "3") == [0, 2, 5]
    assert _reference_sections(6, [3], "half_up") == [0, 3, 5]


@pytest.mark.parametrize(
    "T, counts, differs",
    [
        # stride 15/14; after 7 additions cur = 7.499999999999999 -> 7, while 7 * (15/14) = 7.5 -> round = 8.
        (16, [15], {7, 8}),
        # middle section (start 100, size 100, 15 steps): stride 99/14, cur after 7 additions is
        # 49.49999999999999 -> 149, while 7 * stride = 49.5 -> round half-even = 50 -> 150.
        (300, [10, 15, 20], {149, 150}),
        # each half (size 500, 25 steps): stride 499/24, after 12 additions 249.49999999999997 -> 249 (and
        # 749), while 12 * stride = 249.5 -> 250 (and 750).
        (1000, [25, 25], {249, 250, 749, 750}),
    ],
)
def test_accumulated_float_matters(T, counts, differs):
    expected = _reference_sections(T, counts, "accumulate")
    text = ",".join(str(c) for c in counts)
    assert space_timesteps(T, text) == expected
    assert space_timesteps(T, counts) == expected  # list form, same rule
    assert len(expected) == sum(counts)
    # The multiplied stride picks other steps: exactly the ones listed (a symmetric difference).
    assert set(expected) ^ set(_reference_sections(T, counts, "multiply")) == differs


def test_known_examples():
    # "10" @ 1000: stride 999/9 = 111 exactly -> 0, 111, ..., 999 (both ends of the single section).
    assert space_timesteps(1000, "10") == list(range(0, 1000, 111))
    # "25,25" @ 1000 (two sections of 500): 0, 21, 42, 62, ..., 978, 999 (each section keeps its
    # ends: 0/499 and 500/999).
    out = space_timesteps(1000, "25,25")
    assert out[:4] == [0, 21, 42, 62] and out[-2:] == [978, 999] and {499, 500} <= set(out)
    # "100" @ 4000: stride 3999/99 = 40.39...
    out = space_timesteps(4000, "100")
    assert out[:4] == [0, 40, 81, 121] and out[-2:] == [3959, 3999] and len(out) == 100
    # All steps kept, and one step kept (frac stride 1, so just the section start).
    assert space_timesteps(7, "7") == list(range(7))
    assert space_timesteps(7, "1") == [0]
    # Uneven split: T = 10 into 3 sections of sizes 4, 3, 3 (the first T % n = 1 is one longer).
    assert space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]


@pytest.mark.parametrize(
    "sections, match",
    [
        ("", "empty"),
        ("10,,5", "empty"),
        ("a,5", "not an integer"),
        ("0", ">= 1"),
        ("5,-1", ">= 1"),
        ([], "empty"),
        ("11", "cannot keep 11"),
        ("6,6", "cannot keep 6"),
    ],
)
def test_space_timesteps_errors(sections, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(10, sections)


def test_space_timesteps_type_errors():
    with pytest.raises(TypeError, match="sequence of ints"):
        space_timesteps(10, [2.5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="bools"):
        space_timesteps(10, [True])
    with pytest.raises(ValueError, match="num_steps"):
        space_timesteps(0, "1")


@pytest.mark.parametrize("name, T", [("cosine", 50), ("linear", 40)])
def test_respace_all_steps_gives_same_schedule(name, T):
    s = Schedule.named(name, T)
    r = respace(s, list(range(T)))
    for f in fields(Schedule):
        a, b = getattr(s, f.name), getattr(r, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype, f.name
            if a.dtype == torch.int64:
                assert torch.equal(a, b), f.name
            else:
                # beta' = 1 - abar[i]/abar[i-1] equals beta[i] up to float64 rounding (a few ulps).
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15, msg=f.name)
        else:
            assert a == b, f.name


def test_respace_keeps_alpha_bar_and_maps_timesteps():
    s = Schedule.named("cosine", 50)
    kept = space_timesteps(50, "10")
    r = respace(s, kept)
    assert r.num_steps == 10 and r.original_num_steps == 50 and r.is_respaced
    assert r.timesteps.tolist() == kept
    k = torch.tensor(kept)
    # The last step has beta' ~ 1 (abar drops to ~1e-6 there), so 1 - beta' loses ~7 digits to cancellation:
    # a relative error of ~1e-16 / 1e-6 is allowed, hence 1e-11.
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar[k], rtol=1e-11, atol=0)
    # Derived quantities are recomputed for the short chain, not copied: beta'_0 = 1 - abar[k_0] = beta_0 here
    # (k_0 = 0), but later betas are much larger than the original ones.
    torch.testing.assert_close(r.betas[0], s.betas[0], rtol=1e-13, atol=0)
    assert (r.betas[1:] > s.betas[k[1:]]).all()
    torch.testing.assert_close(r.posterior_var, r.betas * (1 - r.alpha_bar_prev) / (1 - r.alpha_bar))
    # The model sees original-chain timesteps (rescaled to 0..1000 by the ORIGINAL T).
    t = torch.tensor([0, 9])
    assert r.model_timesteps(t).tolist() == [kept[0], kept[-1]]
    torch.testing.assert_close(
        r.model_timesteps(t, rescale=True), torch.tensor([kept[0], kept[-1]]) * 1000.0 / 50
    )


def test_respace_composes():
    s = Schedule.named("linear", 48)
    a = space_timesteps(48, "24")
    b = [0, 3, 7, 15, 23]
    twice = respace(respace(s, a), b)
    once = respace(s, [a[i] for i in b])
    assert torch.equal(twice.timesteps, once.timesteps) and twice.original_num_steps == 48
    torch.testing.assert_close(twice.alpha_bar, once.alpha_bar, rtol=1e-13, atol=0)
    torch.testing.assert_close(twice.betas, once.betas, rtol=1e-12, atol=0)


def test_respace_accepts_tensor_and_single_step():
    s = Schedule.named("cosine", 20)
    r = respace(s, torch.tensor([4]))
    assert r.num_steps == 1 and r.timesteps.tolist() == [4]
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar[4:5], rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "kept, err, match",
    [
        ([], ValueError, "empty"),
        ([0, 20], ValueError, r"\[0, 20\)"),
        ([-1, 3], ValueError, r"\[0, 20\)"),
        ([3, 1], ValueError, "strictly increasing"),
        ([1, 1], ValueError, "strictly increasing"),
        ([0.5], TypeError, "ints"),
        (torch.tensor([0.0, 1.0]), TypeError, "integers"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
    ],
)
def test_respace_errors(kept, err, match):
    with pytest.raises(err, match=match):
        respace(Schedule.named("cosine", 20), kept)
