"""The configuration of a training run: :class:`TrainConfig`, its validation, and which fields may change
when a run is resumed (:data:`HARMLESS_FIELDS`, :data:`RESUMABLE_FIELDS`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .ema import check_rate
from .runtime import COMPILE_MODES
from .unet import PRESETS, UNetConfig

__all__ = [
    "HARMLESS_FIELDS",
    "RESUMABLE_FIELDS",
    "TrainConfig",
    "config_from_checkpoint",
    "default_respacing",
]

_VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
_LEARNED = ("learned", "learned_range")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint with ``asdict``).

    The defaults are the paper's CIFAR-10 L_hybrid run (their README's flags) except ``steps``. Fields in
    :data:`HARMLESS_FIELDS` and the optimiser settings in :data:`RESUMABLE_FIELDS` (logged) may change when
    resuming; any other difference refuses the checkpoint.

    Attributes:
        preset: a :data:`iddpm.unet.PRESETS` name; ``model_overrides`` replaces fields of it.
            ``in_channels`` comes from the dataset, ``learn_sigma`` from ``var_type``, ``num_classes`` from
            ``class_cond``, and ``image_size`` from the field below (else the preset's).
        dataset, data_root, download: what :func:`iddpm.data.load_dataset` gets.
        image_size: training resolution (the dataset is fitted to it); None = the preset's.
        schedule, diffusion_steps: noise schedule ``"cosine"``/``"linear"`` and T.
        loss_type, mean_type, var_type, rescale_timesteps, vlb_weight: see
            :func:`iddpm.losses.training_losses`.
        schedule_sampler: ``"uniform"`` or ``"loss-second-moment"`` (importance sampling of t, paper §3.3).
        lr, weight_decay: AdamW (no warm-up, no clipping, as the authors).
        batch_size: GLOBAL batch, split evenly over the ranks. microbatch: per-rank chunk (-1 = none).
        ema_rates: EMA decays kept (each a full model copy).
        ema_warmup: update ``n`` uses ``min(rate, (1 + n) / (10 + n))`` (:func:`iddpm.ema.ema_decay`), so the
            EMA of a short run is not mostly its random initialisation. Off for the paper's runs (the authors'
            plain EMA); the CPU demos and experiments turn it on.
        steps: stop after this many optimiser steps (0 = run until ``lr_anneal_steps``).
        lr_anneal_steps: if > 0, the lr falls linearly to 0 at this step and training stops there.
        log_every, save_every, sample_every: intervals in steps (0: save/sample only at the end).
        sample_num, sample_respacing: the grid written every ``sample_every`` steps (EMA model, fast sampler).
            ``sample_respacing`` is a :func:`iddpm.respace.space_timesteps` spec; None (the default) = at most
            100 steps, i.e. ``str(min(100, diffusion_steps))``; ``""`` = all T steps.
        out_dir: where ``log.jsonl``, ``config.json``, checkpoints and sample grids go.
        keep_last: keep only the newest ``keep_last`` ``ckpt_*.pt`` files (0 = keep all; ``latest.pt`` and the
            checkpoint it points to are always kept; old ones are deleted only after the new one is written).
        seed: model init, data order, t and noise draws.
        precision: ``"auto"|"fp32"|"bf16"|"fp16"`` (see :mod:`iddpm.precision`).
        channels_last: None = on for CUDA only.
        compile: ``torch.compile`` the training model; None (default) = automatic, i.e. on for a single CUDA
            process with Triton and runs of >= ``AUTO_COMPILE_MIN_STEPS`` (2,000) steps
            (:func:`iddpm.runtime.choose_compile`).
        compile_mode: ``torch.compile`` mode (:data:`iddpm.runtime.COMPILE_MODES`). The default
            ``"reduce-overhead"`` replays the forward and the backward as CUDA graphs: 3,594 vs 2,192 img/s
            for plain ``"default"`` on the CIFAR-10 model (H200, docs/PERFORMANCE.md), whose compiled step is
            otherwise bound by Python/launch overhead. Under DDP it falls back to ``"default"``.
        class_cond: condition on the dataset's labels. flip: random horizontal flips (the authors: none).
        device: ``"auto"`` (cuda > mps > cpu; ``cuda:LOCAL_RANK`` under torchrun) or a torch device string.
        progress: show a tqdm progress bar (rank 0).
    """

    preset: str = "cifar10"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    schedule: str = "cosine"
    diffusion_steps: int = 4000
    loss_type: str = "hybrid"
    mean_type: str = "eps"
    var_type: str = "learned_range"
    rescale_timesteps: bool = True
    vlb_weight: float = 1e-3
    schedule_sampler: str = "uniform"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 128
    microbatch: int = -1
    ema_rates: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = False
    steps: int = 500_000
    lr_anneal_steps: int = 0
    log_every: int = 100
    save_every: int = 10_000
    sample_every: int = 10_000
    sample_num: int = 64
    sample_respacing: str | None = None
    out_dir: str = "runs/iddpm"
    keep_last: int = 3
    seed: int = 0
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool | None = None
    compile_mode: str = "reduce-overhead"
    class_cond: bool = False
    flip: bool = False
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        from .data import DATASET_NAMES  # local: data imports numpy-heavy readers lazily anyway

        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASET_NAMES}")
        choices = {
            "schedule": ("cosine", "linear"),
            "loss_type": ("simple", "hybrid", "vlb"),
            "mean_type": ("eps", "x0", "xprev"),
            "var_type": _VAR_TYPES,
            "schedule_sampler": ("uniform", "loss-second-moment"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "compile_mode": COMPILE_MODES,
        }
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be None (auto), True or False, got {self.compile!r}")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.loss_type == "hybrid" and self.var_type not in _LEARNED:
            raise ValueError(
                "loss_type='hybrid' trains a learned variance: use var_type 'learned_range' or 'learned'"
            )
        if self.loss_type == "simple" and self.var_type in _LEARNED:
            raise ValueError(
                "loss_type='simple' leaves a learned variance untrained: use 'hybrid', or a fixed var_type"
            )
        for name in ("diffusion_steps", "batch_size", "log_every", "sample_num"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("steps", "lr_anneal_steps", "save_every", "sample_every", "seed", "keep_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.sample_respacing is not None:
            from .respace import space_timesteps

            if not isinstance(self.sample_respacing, str):
                raise ValueError(f"sample_respacing must be a string or None, got {self.sample_respacing!r}")
            if self.sample_respacing:
                try:
                    space_timesteps(self.diffusion_steps, self.sample_respacing)
                except ValueError as e:
                    raise ValueError(
                        f"sample_respacing={self.sample_respacing!r} does not fit diffusion_steps="
                        f"{self.diffusion_steps}: {e}. Use e.g. {str(min(100, self.diffusion_steps))!r}, "
                        "'' for all steps, or leave it unset (at most 100 steps)"
                    ) from None
        if self.steps == 0 and self.lr_anneal_steps == 0:
            raise ValueError("set steps > 0 and/or lr_anneal_steps > 0: training must have an end")
        if self.microbatch == 0 or self.microbatch < -1:
            raise ValueError(f"microbatch must be -1 (off) or a positive int, got {self.microbatch}")
        for name, low in (("lr", "> 0"), ("weight_decay", ">= 0"), ("vlb_weight", ">= 0")):
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= 0 if low == "> 0" else v < 0):
                raise ValueError(f"{name} must be a finite number {low}, got {v!r}")
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1
        ):
            raise ValueError(
                f"image_size must be a positive int (or None = the preset's), got {self.image_size!r}"
            )
        if not self.ema_rates:
            raise ValueError("ema_rates needs at least one rate, e.g. (0.9999,)")
        object.__setattr__(self, "ema_rates", tuple(check_rate(r) for r in self.ema_rates))
        if len(set(self.ema_rates)) != len(self.ema_rates):
            raise ValueError(f"ema_rates has duplicates: {self.ema_rates}")
        if not isinstance(self.model_overrides, dict):
            raise TypeError(
                f"model_overrides must be a dict of UNetConfig fields, got {self.model_overrides!r}"
            )
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        unet_fields = {f.name for f in dataclasses.fields(UNetConfig)}
        bad = sorted(set(self.model_overrides) - unet_fields)
        if bad:
            raise ValueError(
                f"model_overrides has unknown UNetConfig field(s) {bad}; fields: {sorted(unet_fields)}"
            )

    @property
    def sample_spacing(self) -> str:
        """The respacing the sample grids use: ``sample_respacing``, or ``str(min(100, T))`` when None."""
        return (
            default_respacing(self.diffusion_steps)
            if self.sample_respacing is None
            else self.sample_respacing
        )

    @property
    def total_steps(self) -> int:
        """Where training stops: the smaller of the positive ``steps`` and ``lr_anneal_steps``."""
        return min(s for s in (self.steps, self.lr_anneal_steps) if s > 0)


def default_respacing(diffusion_steps: int) -> str:
    """The default sampling respacing: at most 100 steps, ``str(min(100, diffusion_steps))``."""
    return str(min(100, diffusion_steps))


# Fields that may differ between a checkpoint and the resuming run (they change where/how often things are
# written, or only the speed/numerics policy, not the run being continued). Anything else is refused by name.
HARMLESS_FIELDS: frozenset[str] = frozenset(
    {"steps", "out_dir", "log_every", "save_every", "sample_every", "sample_num", "sample_respacing",
     "keep_last", "progress", "compile", "compile_mode", "precision", "channels_last", "device", "data_root",
     "download"}
)  # fmt: skip

# Optimiser settings that may change on resume (e.g. the lower lr a NaN stop advises). The new values are
# applied to the optimiser's parameter groups and written to log.jsonl as a ``config_change`` record.
RESUMABLE_FIELDS: frozenset[str] = frozenset({"lr", "weight_decay", "lr_anneal_steps"})


def unet_config_from_checkpoint(ck: dict[str, Any]) -> UNetConfig:
    """Rebuild the ``UNetConfig`` stored in a checkpoint (JSON-style lists back to tuples)."""
    mc = dict(ck["model_config"])
    for k in ("channel_mult", "attention_resolutions"):
        if mc.get(k) is not None:
            mc[k] = tuple(mc[k])
    return UNetConfig(**mc)


def config_from_checkpoint(ck: dict[str, Any], **changes: Any) -> TrainConfig:
    """Rebuild the ``TrainConfig`` stored in a checkpoint (tuples restored), with ``changes`` applied."""
    d = dict(ck["config"])
    d["ema_rates"] = tuple(d["ema_rates"])
    d = _upgrade_config(d)
    d.update(changes)
    return TrainConfig(**d)


def _upgrade_config(d: dict[str, Any]) -> dict[str, Any]:
    """Read configs saved by older versions: ``sample_respacing="100"`` (the former default) even for T < 100
    means None; a config without ``ema_warmup`` predates the option and used the plain EMA."""
    if d.get("sample_respacing") == "100" and int(d.get("diffusion_steps", 100)) < 100:
        d = {**d, "sample_respacing": None}
    if "ema_warmup" not in d:
        d = {**d, "ema_warmup": False}
    return d
