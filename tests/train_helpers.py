"""Shared set-up for the tests that run real (tiny) training jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iddpm.train import TrainConfig


def tiny_train_config(out_dir: Path, steps: int, **kw: Any) -> TrainConfig:
    """The `tiny` preset on 8x8 digits, T = 20, batch 4, logging every step, no checkpoints or samples on
    the way, on the CPU; `kw` overrides any field."""
    base: dict[str, Any] = dict(
        preset="tiny", dataset="digits8", diffusion_steps=20, batch_size=4, steps=steps, log_every=1,
        save_every=0, sample_every=0, out_dir=str(out_dir), progress=False, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)
