"""Tests for iddpm.resample: uniform and loss-second-moment timestep samplers."""

from __future__ import annotations

import io
import math
import os
import tempfile

import pytest
import torch

from iddpm.resample import LossSecondMomentSampler, UniformSampler, make_sampler


def _fill(sampler: LossSecondMomentSampler, losses_per_t: list[list[float]]) -> None:
    """Feed ``losses_per_t[t]`` to the sampler, one batch per round, all t in each round."""
    rounds = len(losses_per_t[0])
    for r in range(rounds):
        t = torch.arange(sampler.num_steps)
        sampler.update(
            t, torch.tensor([losses_per_t[k][r] for k in range(sampler.num_steps)], dtype=torch.float64)
        )


def _warm_sampler(num_steps: int = 4, seed: int = 0) -> tuple[LossSecondMomentSampler, list[list[float]]]:
    g = torch.Generator().manual_seed(seed)
    # Losses at t have scale (t + 1), so sqrt(E[L^2]) grows with t and the sampler must prefer large t.
    losses = [
        [(k + 1) * (1.0 + float(torch.rand((), generator=g))) for _ in range(10)] for k in range(num_steps)
    ]
    s = LossSecondMomentSampler(num_steps)
    _fill(s, losses)
    return s, losses


def test_uniform_weights_and_sample_shapes():
    s = UniformSampler(7)
    assert s.weights().dtype == torch.float64 and torch.equal(s.weights(), torch.ones(7, dtype=torch.float64))
    t, w = s.sample(5, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.shape == (5,) and t.dtype == torch.int64 and w.shape == (5,) and w.dtype == torch.float32
    assert ((t >= 0) & (t < 7)).all()
    # p_t = 1/T, so every weight 1/(T p_t) is exactly 1.
    assert torch.equal(w, torch.ones(5))


def test_sample_is_reproducible_with_generator():
    s = UniformSampler(50)
    t1, _ = s.sample(32, "cpu", generator=torch.Generator().manual_seed(3))
    t2, _ = s.sample(32, "cpu", generator=torch.Generator().manual_seed(3))
    t3, _ = s.sample(32, "cpu", generator=torch.Generator().manual_seed(4))
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)


def test_uniform_frequencies():
    T, B = 5, 50_000
    t, _ = UniformSampler(T).sample(B, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(t, minlength=T).double() / B
    # Binomial standard error of a frequency: sqrt(p (1 - p) / B) ~ 1.8e-3; allow 5 standard errors.
    se = math.sqrt(0.2 * 0.8 / B)
    assert (freq - 0.2).abs().max() < 5 * se


def test_warm_up_is_uniform_until_every_t_has_full_history():
    T = 3
    s = LossSecondMomentSampler(T)
    # 9 losses everywhere, then 10 for t = 0 and t = 1 only: t = 2 is still short, so weights stay uniform.
    for _ in range(9):
        s.update(torch.arange(T), torch.tensor([1.0, 5.0, 9.0]))
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 5.0]))
    assert not s.warmed_up
    assert torch.equal(s.weights(), torch.ones(T, dtype=torch.float64))
    _, w = s.sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(8))
    s.update(torch.tensor([2]), torch.tensor([9.0]))
    assert s.warmed_up
    assert not torch.equal(s.weights(), torch.ones(T, dtype=torch.float64))


def test_weights_formula_matches_independent_computation():
    s, losses = _warm_sampler(num_steps=4)
    # Independent re-statement of Eq. 18 with plain python floats:
    # w_t = sqrt(mean_i L_{t,i}^2), normalised, then mixed with uniform mass 1e-3.
    raw = [math.sqrt(sum(x * x for x in row) / len(row)) for row in losses]
    total = sum(raw)
    expected = torch.tensor([(r / total) * (1 - 1e-3) + 1e-3 / 4 for r in raw], dtype=torch.float64)
    torch.testing.assert_close(s.weights(), expected, rtol=1e-13, atol=0)
    assert math.isclose(float(s.weights().sum()), 1.0, rel_tol=1e-13)
    assert (s.weights()[1:] > s.weights()[:-1]).all()  # larger losses -> sampled more often


def test_importance_weights_are_unbiased_exactly():
    s, losses = _warm_sampler(num_steps=4)
    p = s.weights() / s.weights().sum()
    # Evaluate the returned weight of every t: draw a big batch so each t appears, and read w at that t.
    t, w = s.sample(4000, generator=torch.Generator().manual_seed(0))
    w_of_t = torch.zeros(4, dtype=torch.float64)
    for k in range(4):
        assert (t == k).any()
        w_of_t[k] = w[t == k][0].double()
    torch.testing.assert_close(w_of_t, 1.0 / (4 * p), rtol=1e-6, atol=0)  # float32 weights
    # sum_t p_t * w_t * L_t == mean_t L_t for ANY per-t loss L_t (here the mean history per t).
    L = torch.tensor([sum(r) / len(r) for r in losses], dtype=torch.float64)
    torch.testing.assert_close((p * w_of_t * L).sum(), L.mean(), rtol=1e-6, atol=0)


def test_importance_sampling_monte_carlo():
    s, _ = _warm_sampler(num_steps=4, seed=1)
    L = torch.tensor([0.5, 2.0, 3.0, 10.0], dtype=torch.float64)
    B = 40_000
    t, w = s.sample(B, generator=torch.Generator().manual_seed(5))
    est = w.double() * L[t]
    # The estimator's standard error is std(est)/sqrt(B); 5 standard errors.
    assert abs(float(est.mean()) - float(L.mean())) < 5 * float(est.std()) / math.sqrt(B)
    # The draw frequencies follow p (binomial standard errors, 5 of them).
    p = s.weights() / s.weights().sum()
    freq = torch.bincount(t, minlength=4).double() / B
    assert ((freq - p).abs() < 5 * (p * (1 - p) / B).sqrt()).all()


def test_history_is_a_ring_oldest_dropped():
    s = LossSecondMomentSampler(2, history=10)
    for i in range(1, 13):  # 12 losses at t = 0
        s.update(torch.tensor([0]), torch.tensor([float(i)]))
    assert int(s.counts[0]) == 10 and int(s.counts[1]) == 0
    # After 12 pushes into a ring of 10 the first two (1, 2) are gone, the order is oldest -> newest.
    assert s.history[0].tolist() == [float(i) for i in range(3, 13)]


def test_repeated_t_in_one_batch_is_processed_in_order():
    s = LossSecondMomentSampler(3, history=2)
    s.update(torch.tensor([1, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    assert s.history[1].tolist() == [2.0, 3.0] and int(s.counts[1]) == 2


def test_all_zero_losses_stay_uniform():
    s = LossSecondMomentSampler(2, history=1)
    s.update(torch.tensor([0, 1]), torch.zeros(2))
    assert s.warmed_up and torch.equal(s.weights(), torch.ones(2, dtype=torch.float64))


def test_state_dict_roundtrip_weights_only():
    s, _ = _warm_sampler(num_steps=4)
    s.update(torch.tensor([2]), torch.tensor([100.0]))
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    s2 = LossSecondMomentSampler(4)
    s2.load_state_dict(state)
    assert torch.equal(s2.history, s.history) and torch.equal(s2.counts, s.counts)
    assert torch.equal(s2.weights(), s.weights())
    with pytest.raises(ValueError, match="T=4"):
        LossSecondMomentSampler(5).load_state_dict(state)
    with pytest.raises(ValueError, match="needs"):
        LossSecondMomentSampler(4, history=3).load_state_dict(state)
    u = UniformSampler(4)
    u.load_state_dict(u.state_dict())
    with pytest.raises(ValueError, match="T=4"):
        UniformSampler(3).load_state_dict(u.state_dict())


def test_make_sampler():
    assert isinstance(make_sampler("uniform", 10), UniformSampler)
    s = make_sampler("loss-second-moment", 10)
    assert isinstance(s, LossSecondMomentSampler) and s.history_len == 10 and s.uniform_prob == 1e-3
    with pytest.raises(ValueError, match="uniform.*loss-second-moment"):
        make_sampler("importance", 10)


@pytest.mark.parametrize(
    "t, losses, err, match",
    [
        (torch.tensor([0.0]), torch.tensor([1.0]), TypeError, "integer"),
        (torch.tensor([0, 1]), torch.tensor([1.0]), ValueError, "shape"),
        (torch.tensor([5]), torch.tensor([1.0]), ValueError, r"\[0, 5\)"),
        (torch.tensor([-1]), torch.tensor([1.0]), ValueError, r"\[0, 5\)"),
        (torch.tensor([0]), torch.tensor([float("nan")]), ValueError, "NaN"),
        (torch.tensor([0]), torch.tensor([1]), TypeError, "floating"),
    ],
)
def test_update_rejects_bad_inputs(t, losses, err, match):
    with pytest.raises(err, match=match):
        LossSecondMomentSampler(5).update(t, losses)
    with pytest.raises(err, match=match):
        UniformSampler(5).update(t, losses)


def test_constructor_and_sample_errors():
    with pytest.raises(ValueError, match="num_steps"):
        UniformSampler(0)
    with pytest.raises(TypeError, match="num_steps"):
        LossSecondMomentSampler(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="history"):
        LossSecondMomentSampler(4, history=0)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentSampler(4, uniform_prob=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        UniformSampler(4).sample(0)


def _dist_worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = LossSecondMomentSampler(3, history=2)
        # Different batch sizes per rank: rank 0 sends 1 example, rank 1 sends 3.
        if rank == 0:
            s.update(torch.tensor([0]), torch.tensor([1.0]))
        else:
            s.update(torch.tensor([0, 2, 1]), torch.tensor([2.0, 3.0, 4.0]))
        torch.save(s.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_all_gathers_across_ranks_with_unequal_batches():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        states = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    # Single-process reference: the concatenation in rank order, fed in one update.
    ref = LossSecondMomentSampler(3, history=2)
    ref.update(torch.tensor([0, 0, 2, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    for st in states:
        assert torch.equal(st["history"], ref.history) and torch.equal(st["counts"], ref.counts)
    assert ref.history[0].tolist() == [1.0, 2.0]
