"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU); not a test module.

``python ddp_helper.py STEP_OUT AUDIT_OUT -- <iddpm train args>``

1. one DDP training step on fixed per-rank images, timesteps and noise, then importance-sampler updates with
   unequal per-rank batches; rank r saves its parameters and sampler state to ``STEP_OUT/rank{r}.pt``
   (skipped when STEP_OUT is ``-``);
2. ``iddpm train`` with the given arguments, recording every file under the working directory that this
   rank opened for writing, renamed or removed in ``AUDIT_OUT/rank{r}.json`` (Python audit hooks), so the
   test can check that only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def audited_train(audit_dir: Path, argv: list[str]) -> int:
    writes: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing:
                writes.append(os.path.abspath(os.fsdecode(args[0])))
        elif event in ("os.rename", "os.link", "os.remove", "os.mkdir"):
            writes.append(f"{event} {os.path.abspath(os.fsdecode(args[0]))}")

    sys.addaudithook(hook)
    from iddpm.cli import main

    code = main(argv)
    rank = int(os.environ["RANK"])
    # Only the test's folder (the working directory) counts: torch keeps caches of its own in /tmp.
    root = os.getcwd()
    mine = [w for w in writes if root in w and str(audit_dir) not in w]
    (audit_dir / f"rank{rank}.json").write_text(json.dumps(mine))
    return code


def fixed_inputs(world: int = 2, per_rank: int = 4):
    """The whole batch: images in [-1, 1], timesteps and noise, ``world * per_rank`` examples."""
    g = torch.Generator().manual_seed(11)
    n = world * per_rank
    x = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 20, (n,), generator=g)
    noise = torch.randn(n, 1, 16, 16, generator=g)
    return x, t, noise


def sampler_updates(world: int = 2):
    """Per-rank (t, losses) lists for three updates, with unequal batch sizes across ranks."""
    g = torch.Generator().manual_seed(5)
    out = []
    for step in range(3):
        per_rank = []
        for r in range(world):
            n = 3 + r + step
            per_rank.append(
                (torch.randint(0, 20, (n,), generator=g), torch.rand(n, generator=g, dtype=torch.float64))
            )
        out.append(per_rank)
    return out


class FixedSampler:
    """Hands out the given timesteps with weight 1 (the test's stand-in for a timestep sampler)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def sample(self, n, device, generator=None):
        return self.t[:n].to(device), torch.ones(n, device=device)

    def update(self, t, losses):
        pass


def step_config(out: str):
    from iddpm.train import TrainConfig

    return TrainConfig(
        preset="tiny", dataset="digits8", diffusion_steps=20, batch_size=8, steps=1, lr=1e-3,
        model_overrides={"dropout": 0.0}, out_dir=out, progress=False, device="cpu",
    )  # fmt: skip


def perturb(model: torch.nn.Module) -> None:
    """Move off the initialisation, whose zero output layer leaves all other gradients zero in step one."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def one_step(st, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> None:
    """``train_step`` with the given timesteps and noise (instead of the state's generators)."""
    import iddpm.train as tr

    real = tr.training_losses
    st.sampler = FixedSampler(t)

    def with_noise(*args, generator=None, **kw):
        return real(*args, noise=noise, **kw)

    tr.training_losses = with_noise
    try:
        tr.train_step(st, x, None)
    finally:
        tr.training_losses = real


def ddp_step(out_dir: Path) -> None:
    from iddpm.resample import LossSecondMomentSampler
    from iddpm.train import make_train_state, resolve_unet_config, setup_distributed

    info = setup_distributed("cpu")
    cfg = step_config(str(out_dir))
    st = make_train_state(cfg, resolve_unet_config(cfg, 1, None), info)
    x, t, noise = fixed_inputs(info.world_size)
    mine = slice(4 * info.rank, 4 * (info.rank + 1))
    perturb(st.model)
    one_step(st, x[mine], t[mine], noise[mine])
    sampler = LossSecondMomentSampler(20, history=2)
    for per_rank in sampler_updates(info.world_size):
        sampler.update(*per_rank[info.rank])
    torch.save(
        {
            "params": [p.detach().clone() for p in st.model.parameters()],
            "grads": [p.grad.detach().clone() for p in st.model.parameters()],  # DDP's averaged gradients
            "sampler": sampler.state_dict(),
        },
        out_dir / f"rank{info.rank}.pt",
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    step_out, audit_out, sep, *train_args = sys.argv[1:]
    if step_out != "-":
        ddp_step(Path(step_out))
    sys.exit(audited_train(Path(audit_out), train_args))
