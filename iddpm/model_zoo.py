"""Small pretrained models that ship with the package, for the book: ``iddpm.pretrained(name)``.

``iddpm.pretrained("digits8-hybrid")`` returns a :class:`Pretrained` (model, configs, schedule, provenance).

Each file in ``iddpm/checkpoints/NAME.pt`` holds one EMA model's weights, its training and model configs,
and where it came from (the experiment, scale, arm, seed, command and commit that trained it). They are
written by the experiment runner (``"export"`` in an experiment's ``eval`` block) and load with
``torch.load(weights_only=True)``: no network, no pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_save, safe_load
from .config import unet_config_from_checkpoint
from .schedules import Schedule
from .train import TrainConfig, config_from_checkpoint
from .unet import UNet, UNetConfig

__all__ = ["CHECKPOINT_DIR", "Pretrained", "available", "pretrained", "write_pretrained"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
FORMAT = "iddpm-pretrained-v1"


class Pretrained(NamedTuple):
    """A loaded pretrained model: the EMA ``model`` (eval mode, no grad), its ``config`` (the run's
    :class:`TrainConfig`), ``unet_config``, ``schedule`` (the full T-step chain it was trained on), ``step``
    and ``info`` (provenance: experiment, scale, arm, seed, command, commit)."""

    model: nn.Module
    config: TrainConfig
    unet_config: UNetConfig
    schedule: Schedule
    step: int
    info: dict[str, Any]


def available(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the pretrained models in ``directory`` (default: the package's checkpoints)."""
    d = Path(directory) if directory is not None else CHECKPOINT_DIR
    return sorted(p.stem for p in d.glob("*.pt") if not p.stem.startswith("digit_classifier"))


def write_pretrained(ck: dict[str, Any], dest: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write the first EMA of a training checkpoint ``ck`` (a dict) as a pretrained file at ``dest``."""
    ema = ck["ema"][next(iter(ck["ema"]))]
    slim = {
        "format": FORMAT,
        "config": ck["config"],
        "model_config": ck["model_config"],
        "model": ema,
        "step": int(ck["step"]),
        "info": dict(info),
    }
    return atomic_save(slim, dest)


def pretrained(
    name: str, *, device: str | torch.device = "cpu", directory: str | os.PathLike | None = None
) -> Pretrained:
    """Load a shipped pretrained model by name (see :func:`available`), e.g. ``"digits8-hybrid"``.

    Args:
        name: the file stem in ``directory``.
        device: where to put the model.
        directory: where to look (default: the package's ``checkpoints/``).
    """
    d = Path(directory) if directory is not None else CHECKPOINT_DIR
    path = d / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no pretrained model {name!r}; available: {available(d)}")
    ck = safe_load(path)
    if ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iddpm pretrained file (format {ck.get('format')!r})")
    ucfg = unet_config_from_checkpoint(ck)
    model = UNet(ucfg)
    model.load_state_dict(ck["model"])
    model.to(device).eval().requires_grad_(False)
    cfg = config_from_checkpoint(ck)
    schedule = Schedule.named(cfg.schedule, cfg.diffusion_steps).to(device)
    return Pretrained(model, cfg, ucfg, schedule, int(ck["step"]), dict(ck.get("info", {})))
