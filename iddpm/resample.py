"""Timestep samplers: which ``t`` each training example gets, and the weight that keeps the loss unbiased.

Training estimates ``E_t[L_t]`` with one ``t`` per example. Drawing ``t ~ p`` instead of uniformly and
weighting the loss by ``1 / (T p_t)`` keeps the estimate unbiased (``sum_t p_t * L_t / (T p_t) = mean_t L_t``)
while changing its variance. The paper picks ``p_t ∝ sqrt(E[L_t^2])``, which makes
``L_vlb`` trainable directly.

* :class:`UniformSampler`: ``p_t = 1/T``, every weight is 1.
* :class:`LossSecondMomentSampler`: keeps the last ``history`` (10) losses of every ``t``; uniform until
  every ``t`` has a full history (warm-up), then ``p ∝ sqrt(mean(history²))`` mixed with some uniform mass.

Unlike the authors' code this works in a single process: the ``torch.distributed`` all-gather only runs when a
process group has been initialised, and the history is an int64/float64 torch tensor (no ``np.int``).

Chapter: book/07_importance_sampling
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .runtime import to_device_async

__all__ = ["LossSecondMomentSampler", "SAMPLER_NAMES", "UniformSampler", "make_sampler"]

SAMPLER_NAMES: tuple[str, ...] = ("uniform", "loss-second-moment")


def _check_num_steps(num_steps: int) -> int:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return num_steps


def _sample_from_weights(
    w: Tensor, batch_size: int, device: torch.device | str, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw ``t ~ w / sum(w)`` and return ``(t, 1 / (T p[t]))``.

    Args:
        w: ``(T,)`` non-negative float64 weights (not necessarily normalised).
        batch_size: B >= 1.
        device: where the returned tensors go.
        generator: a ``torch.Generator``; the draw happens on its device so a CPU generator gives the same
            ``t`` whatever ``device`` is.

    Returns:
        ``t``: ``(B,)`` int64 on ``device``; ``weights``: ``(B,)`` float32 on ``device``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    num_steps = w.numel()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    p = to_device_async(w / w.sum(), gen_device)
    t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
    # Importance weight: E_{t~p}[L_t / (T p_t)] = (1/T) sum_t L_t, the uniform average we want to estimate.
    weights = (1.0 / (num_steps * p[t])).float()
    return to_device_async(t, device), to_device_async(weights, device)


class UniformSampler:
    """``t ~ Uniform{0, ..., T-1}`` with all importance weights equal to 1.

    Args:
        num_steps: T of the chain being trained.
    """

    def __init__(self, num_steps: int) -> None:
        self.num_steps = _check_num_steps(num_steps)

    def weights(self) -> Tensor:
        """``(T,)`` float64 ones (probabilities up to normalisation)."""
        return torch.ones(self.num_steps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(t, weights)``: ``(B,)`` int64 and ``(B,)`` float32 (all ones), both on ``device``."""
        return _sample_from_weights(self.weights(), batch_size, device, generator)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """No-op (a uniform sampler does not learn); the inputs are still checked so misuse shows up early."""
        _check_update_inputs(t, losses, self.num_steps)

    def state_dict(self) -> dict[str, int]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        _check_state_num_steps(state, self.num_steps, type(self).__name__)


def _check_update_inputs(t: Tensor, losses: Tensor, num_steps: int) -> None:
    if not isinstance(t, Tensor) or not isinstance(losses, Tensor):
        raise TypeError("t and losses must be tensors of shape (B,)")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t must be an integer tensor (int64), got dtype {t.dtype}")
    if t.ndim != 1 or losses.shape != t.shape:
        raise ValueError(
            f"t and losses must both have shape (B,); got t {tuple(t.shape)} and losses {tuple(losses.shape)}"
        )
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_steps):
        raise ValueError(f"t must be in [0, {num_steps}); got values in [{int(t.min())}, {int(t.max())}]")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"losses must be a floating-point tensor, got dtype {losses.dtype}")
    if not torch.isfinite(losses).all():
        raise ValueError("losses contain NaN or inf; they would corrupt the loss history for good")


def _check_state_num_steps(state: dict, num_steps: int, name: str) -> None:
    if "num_steps" not in state:
        raise KeyError(f"{name} state_dict has no 'num_steps' entry; keys: {sorted(state)}")
    if int(state["num_steps"]) != num_steps:
        raise ValueError(
            f"{name} state is for T={int(state['num_steps'])} steps, but this sampler has T={num_steps}"
        )


def _all_gather_variable(t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather ``(t, losses)`` from every rank, each rank may have a different batch size.

    ``all_gather`` needs equal shapes, so the sizes are gathered first and every rank pads to the largest.
    Returns the concatenation in rank order, ``(sum_r B_r,)`` int64 and float64 on the CPU.
    """
    # NCCL only moves CUDA tensors; gloo (and mpi) work on the CPU.
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    world = dist.get_world_size()
    size = torch.tensor([t.numel()], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_list = [int(s) for s in sizes]
    max_size = max(sizes_list)
    padded_t = torch.zeros(max_size, dtype=torch.int64, device=comm_device)
    padded_l = torch.zeros(max_size, dtype=torch.float64, device=comm_device)
    padded_t[: t.numel()] = t.to(comm_device, torch.int64)
    padded_l[: t.numel()] = losses.to(comm_device, torch.float64)
    all_t = [torch.zeros_like(padded_t) for _ in range(world)]
    all_l = [torch.zeros_like(padded_l) for _ in range(world)]
    dist.all_gather(all_t, padded_t)
    dist.all_gather(all_l, padded_l)
    t_cat = torch.cat([x[:n] for x, n in zip(all_t, sizes_list, strict=True)]).cpu()
    l_cat = torch.cat([x[:n] for x, n in zip(all_l, sizes_list, strict=True)]).cpu()
    return t_cat, l_cat


class LossSecondMomentSampler:
    """Importance sampling ``p_t ∝ sqrt(E[L_t^2])``, estimated from recent losses.

    State: ``history`` ``(T, H)`` float64, the last H losses seen at each t (oldest first), and ``counts``
    ``(T,)`` int64, how many slots of each row are filled (at most H).

    Args:
        num_steps: T of the chain being trained.
        history: H, losses kept per timestep (10 in the paper).
        uniform_prob: mass mixed in uniformly so no ``t`` gets probability ~0 (and weight ~inf): 1e-3.
    """

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 1e-3) -> None:
        self.num_steps = _check_num_steps(num_steps)
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        if not 0.0 <= float(uniform_prob) <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history_len = history
        self.uniform_prob = float(uniform_prob)
        self.history = torch.zeros(num_steps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_steps, dtype=torch.int64)

    @property
    def warmed_up(self) -> bool:
        """True once every timestep has a full history of H losses (before that, sampling is uniform)."""
        return bool((self.counts == self.history_len).all())

    def weights(self) -> Tensor:
        """``(T,)`` float64 sampling weights (they sum to 1 after warm-up, are all ones before)."""
        if not self.warmed_up:
            # Warm-up: a t with fewer than H losses has no reliable second moment yet.
            return torch.ones(self.num_steps, dtype=torch.float64)
        w = self.history.pow(2).mean(dim=-1).sqrt()  # sqrt(E[L_t^2])
        total = w.sum()
        if not total > 0:
            # Every recorded loss is exactly 0: no information about which t matters, stay uniform.
            return torch.ones(self.num_steps, dtype=torch.float64)
        w = w / total
        w = w * (1.0 - self.uniform_prob)
        return w + self.uniform_prob / self.num_steps

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(t, weights)``: ``(B,)`` int64 and ``(B,)`` float32 importance weights ``1 / (T p[t])``."""
        return _sample_from_weights(self.weights(), batch_size, device, generator)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses.

        Args:
            t: ``(B,)`` int64 timesteps the losses were computed at.
            losses: ``(B,)`` the **unweighted** per-example losses (before multiplying by the importance
                weights; weighting them would feed the sampler's own bias back into it).

        If a ``torch.distributed`` process group is initialised, ``(t, losses)`` are all-gathered from every
        rank (batch sizes may differ) before updating, so all ranks keep identical state. Every rank must
        call this.
        """
        _check_update_inputs(t, losses, self.num_steps)
        t, losses = t.detach(), losses.detach()
        if dist.is_available() and dist.is_initialized():
            t, losses = _all_gather_variable(t, losses)
        # Sequential on purpose: repeated t within one batch must each push the ring in order.
        for ti, li in zip(t.cpu().tolist(), losses.cpu().double().tolist(), strict=True):
            n = int(self.counts[ti])
            if n == self.history_len:
                # Ring full: drop the oldest (leftmost) loss and append the new one at the end.
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = li
            else:
                self.history[ti, n] = li
                self.counts[ti] = n + 1

    def state_dict(self) -> dict[str, Tensor | int]:
        """Tensors and ints only, so ``torch.load(..., weights_only=True)`` can read it back."""
        return {
            "num_steps": self.num_steps,
            "history_len": self.history_len,
            "history": self.history.clone(),
            "counts": self.counts.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        name = type(self).__name__
        _check_state_num_steps(state, self.num_steps, name)
        for key in ("history", "counts"):
            if key not in state:
                raise KeyError(f"{name} state_dict has no {key!r} entry; keys: {sorted(state)}")
        history = torch.as_tensor(state["history"], dtype=torch.float64).cpu()
        counts = torch.as_tensor(state["counts"], dtype=torch.int64).cpu()
        if history.shape != (self.num_steps, self.history_len) or counts.shape != (self.num_steps,):
            raise ValueError(
                f"{name} state has history {tuple(history.shape)} and counts {tuple(counts.shape)}; "
                f"this sampler needs ({self.num_steps}, {self.history_len}) and ({self.num_steps},)"
            )
        if (counts < 0).any() or (counts > self.history_len).any():
            raise ValueError(f"{name} state has counts outside [0, {self.history_len}]")
        self.history = history.clone()
        self.counts = counts.clone()


def make_sampler(name: str, num_steps: int) -> UniformSampler | LossSecondMomentSampler:
    """A timestep sampler by name: ``"uniform"`` or ``"loss-second-moment"`` (the authors' flag values)."""
    if name == "uniform":
        return UniformSampler(num_steps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_steps)
    raise ValueError(f"unknown timestep sampler {name!r}; choose one of {SAMPLER_NAMES}")
