"""Training: ``TrainConfig``, one training step, and the resumable, multi-GPU training loop.

What the loop does each step (the authors' ``TrainLoop.run_step``, with the fixes listed below)::

    zero grads; lr = base_lr * (1 - step / lr_anneal_steps)          (if annealing)
    for each microbatch (x_m, y_m) of the rank's batch:
        t, w = sampler.sample(m)                                     (importance weights w = 1 / (T p_t))
        losses = training_losses(s, model, x_m, t)                   ((m,) per-example terms)
        sampler.update(t, losses["loss"])                            (UNWEIGHTED, all-gathered over ranks)
        backward( sum(losses["loss"] * w) / B )                      (share m/B of the batch mean)
    optimizer step (AdamW); every EMA: ema = rate * ema + (1 - rate) * param

Differences from the authors' loop, on purpose:

* **It stops.** ``steps`` (and/or ``lr_anneal_steps``) bound the run; the authors' loop never ends unless
  ``lr_anneal_steps > 0`` (their issue #67).
* **Microbatches give the batch mean.** The authors add up each microbatch's *mean*, so with k microbatches
  the gradient is k times the full-batch gradient (and Adam hides most of it). Here each microbatch's
  weighted loss sum is divided by the full batch size, so the gradient equals the full-batch mean exactly
  and ``--microbatch`` only trades memory for time.
* **Mixed precision by autocast** (bf16, or fp16 + ``GradScaler``; :mod:`iddpm.precision`) instead of
  hand-kept fp16 master weights. fp16 steps with inf/NaN gradients are skipped by the scaler; the EMA still
  updates on those steps (the authors skip it), which only moves it toward unchanged weights.
* **No host syncs in the hot loop** from this file: EMA via ``torch._foreach_*``, logging sums and the
  NaN/inf detector stay on the device and are read once per ``log_every`` steps (and before every save).
  (``training_losses`` validates ``t`` on the host, and the loss-second-moment sampler's ``update`` copies
  the losses to the CPU; both are outside this file.)
* **Logs use the importance-weighted losses,** as the authors' ``log_loss_dict``: means of ``loss``,
  ``mse``, ``vlb`` (``L_t`` in bits/dim, unscaled) and per-quarter means ``loss_q0..q3`` keyed by
  ``int(4 t / T)``.

Multi-GPU: launch with ``torchrun``; ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` are read from the environment,
``batch_size`` is global and split evenly, gradients are averaged by DDP, only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from . import rundir
from .config import (
    _LEARNED,
    HARMLESS_FIELDS,
    RESUMABLE_FIELDS,
    TrainConfig,
    _upgrade_config,
    config_from_checkpoint,
    default_respacing,
    unet_config_from_checkpoint,
)
from .distributed import (
    DistInfo,
    all_finite,
    broadcast_from_main,
    cleanup_distributed,
    gather,
    is_dist,
    replica_diff,
    setup_distributed,
)
from .ema import copy_buffers, ema_decay, ema_update, make_ema
from .losses import training_losses
from .precision import PrecisionPolicy, autocast, make_scaler, resolve_precision
from .resample import UniformSampler, make_sampler
from .runtime import compile_model, resolve_compile
from .schedules import Schedule
from .unet import UNet, UNetConfig

__all__ = [
    "HARMLESS_FIELDS",
    "RESUMABLE_FIELDS",
    "DistInfo",
    "NonFiniteLossError",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "cleanup_distributed",
    "config_from_checkpoint",
    "default_respacing",
    "load_model",
    "lr_at",
    "make_train_state",
    "setup_distributed",
    "train",
    "train_step",
]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; ``step`` (1-based) and ``term`` say where first."""

    def __init__(self, step: int, term: str, checkpoint: Path | None) -> None:
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"loss term {term!r} became non-finite (NaN/inf) at step {step}; training stopped and {kept}. "
            "Try a lower lr, precision='fp32', or check the data."
        )
        self.step, self.term, self.checkpoint = step, term, checkpoint


# --------------------------------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything the step function mutates (built by :func:`make_train_state`)."""

    cfg: TrainConfig
    unet_cfg: UNetConfig
    dist: DistInfo
    schedule: Schedule
    model: nn.Module  # the raw module (state dicts, EMA source)
    step_model: Callable[..., Tensor]  # what the step calls: model, DDP(model), or compiled
    ddp: nn.Module | None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    policy: PrecisionPolicy
    emas: dict[float, nn.Module]
    sampler: Any
    gen_t: torch.Generator  # CPU: timestep draws (same t on any device)
    gen_noise: torch.Generator  # on the device: the q_sample noise
    channels_last: bool
    compiled: bool = False
    step: int = 0
    params: list[Tensor] = field(default_factory=list)
    ema_params: dict[float, list[Tensor]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device


def resolve_unet_config(cfg: TrainConfig, in_channels: int, num_classes: int | None) -> UNetConfig:
    """The model config of a run: preset + overrides, with data-dependent fields filled in."""
    base = UNetConfig.preset(cfg.preset, **cfg.model_overrides)
    if cfg.class_cond and num_classes is None:
        raise ValueError(f"class_cond=True but dataset {cfg.dataset!r} has no labels")
    if base.num_classes is not None and not cfg.class_cond:
        raise ValueError(f"preset {cfg.preset!r} is class-conditional: set class_cond=True (--class-cond)")
    derived = {
        "in_channels": (in_channels, f"dataset {cfg.dataset!r} has {in_channels} channel(s)"),
        "learn_sigma": (cfg.var_type in _LEARNED, f"var_type={cfg.var_type!r} decides it"),
        "num_classes": (
            num_classes if cfg.class_cond else None,
            f"class_cond={cfg.class_cond} and the dataset's {num_classes} classes decide it",
        ),
    }
    for name, (value, why) in derived.items():
        if name in cfg.model_overrides and cfg.model_overrides[name] != value:
            raise ValueError(
                f"model override {name}={cfg.model_overrides[name]!r} contradicts the data: {why} "
                f"({name}={value!r}); drop the override"
            )
    return dataclasses.replace(
        base,
        image_size=cfg.image_size or base.image_size,
        in_channels=in_channels,
        learn_sigma=cfg.var_type in _LEARNED,
        num_classes=num_classes if cfg.class_cond else None,
    )


def make_optimizer(params: list[Tensor], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


_SEED_PURPOSES = ("t", "noise", "dropout")


def rank_seed(seed: int, rank: int, purpose: str) -> int:
    """A 64-bit seed for one rank's ``purpose`` (``"t"``, ``"noise"`` or ``"dropout"``) of a run's ``seed``.

    From ``numpy.random.SeedSequence(seed, spawn_key=(rank, purpose_index))``: the streams of different
    ranks and purposes are statistically independent, unlike arithmetic offsets such as ``seed + rank``, which
    collide (rank 0's third seed equalling rank 1's first).
    """
    import numpy as np

    if purpose not in _SEED_PURPOSES:
        raise ValueError(f"purpose must be one of {_SEED_PURPOSES}, got {purpose!r}")
    ss = np.random.SeedSequence(seed, spawn_key=(rank, _SEED_PURPOSES.index(purpose)))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def make_train_state(
    cfg: TrainConfig, unet_cfg: UNetConfig, info: DistInfo, checkpoint: dict[str, Any] | None = None
) -> TrainState:
    """Build model, EMAs, optimiser, scaler, sampler and generators (and load ``checkpoint`` into them).

    The model is initialised from ``cfg.seed`` on every rank, so replicas start identical (DDP also
    broadcasts rank 0's weights). Loading happens before DDP/compile wrap the model.
    """
    device = info.device
    if device.type == "cuda":
        # Fixed shapes every step: let cuDNN time its convolution algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    model = UNet(unet_cfg).to(device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    emas = {rate: make_ema(model) for rate in cfg.ema_rates}
    opt = make_optimizer(list(model.parameters()), cfg, device)
    policy = resolve_precision(cfg.precision, device)
    scaler = make_scaler(policy, device)
    schedule = Schedule.named(cfg.schedule, cfg.diffusion_steps).to(device)
    sampler = make_sampler(cfg.schedule_sampler, cfg.diffusion_steps)
    # Different, independent draws per rank and per purpose (else every rank would train on the same t and
    # noise); on resume the saved generator states replace these seeds.
    gen_t = torch.Generator().manual_seed(rank_seed(cfg.seed, info.rank, "t"))
    gen_noise = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, info.rank, "noise"))
    torch.manual_seed(rank_seed(cfg.seed, info.rank, "dropout"))
    step = 0
    if checkpoint is not None:
        step = _load_into(checkpoint, model, emas, opt, scaler, sampler, cfg.weight_decay)
    ddp = None
    step_model: Callable[..., Tensor] = model
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        step_model = ddp
    compiled = resolve_compile(cfg.compile, device, world_size=info.world_size, total_steps=cfg.total_steps)
    if compiled:
        step_model = compile_model(step_model, effective_compile_mode(cfg, info.world_size))
    st = TrainState(
        cfg=cfg, unet_cfg=unet_cfg, dist=info, schedule=schedule, model=model, step_model=step_model,
        ddp=ddp, opt=opt, scaler=scaler, policy=policy, emas=emas, sampler=sampler, gen_t=gen_t,
        gen_noise=gen_noise, channels_last=channels_last, compiled=compiled, step=step,
    )  # fmt: skip
    st.params = list(model.parameters())
    st.ema_params = {rate: list(m.parameters()) for rate, m in emas.items()}
    return st


def effective_compile_mode(cfg: TrainConfig, world_size: int) -> str:
    """``cfg.compile_mode``, except that the CUDA-graph modes fall back to ``"default"`` under DDP (CUDA
    graphs around DDP's gradient all-reduce hooks are not something we have measured)."""
    if cfg.compile_mode in ("reduce-overhead", "max-autotune") and world_size > 1:
        return "default"
    return cfg.compile_mode


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for the step after ``step`` completed ones: linear anneal to 0 if ``lr_anneal_steps``."""
    if cfg.lr_anneal_steps <= 0:
        return cfg.lr
    return cfg.lr * max(0.0, 1.0 - step / cfg.lr_anneal_steps)


class StepOutput(NamedTuple):
    """What one step computed (device tensors, nothing synced): ``t``, ``w`` ``(B_rank,)`` and per-example
    ``losses`` (``loss``/``mse``/``vlb``, each ``(B_rank,)``, unweighted, detached)."""

    t: Tensor
    w: Tensor
    losses: dict[str, Tensor]


def train_step(st: TrainState, x: Tensor, y: Tensor | None = None) -> StepOutput:
    """One optimiser step on this rank's batch, then every EMA update. Used by :func:`train` and the bench.

    Args:
        st: the training state (mutated: parameters, optimiser, EMAs, sampler, generators, ``st.step``).
        x: ``(B_rank, C, H, W)`` images in ``[-1, 1]`` on ``st.device``.
        y: ``(B_rank,)`` int64 labels (class-conditional models only).
    """
    cfg, device = st.cfg, st.device
    if st.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    B = x.shape[0]
    mb = B if cfg.microbatch <= 0 else min(cfg.microbatch, B)
    lr = lr_at(cfg, st.step)
    for g in st.opt.param_groups:
        g["lr"] = lr
    st.opt.zero_grad(set_to_none=True)
    ts, ws, terms = [], [], []
    for start in range(0, B, mb):
        xm = x[start : start + mb]
        kwargs = {"y": y[start : start + mb]} if st.unet_cfg.num_classes is not None else None
        t, w = st.sampler.sample(xm.shape[0], device, generator=st.gen_t)
        last = start + mb >= B
        # Only the last microbatch all-reduces gradients; the others accumulate locally.
        sync = st.ddp.no_sync() if (st.ddp is not None and not last) else contextlib.nullcontext()
        with sync:
            with autocast(st.policy, device):
                losses = training_losses(
                    st.schedule, st.step_model, xm, t, loss_type=cfg.loss_type, mean_type=cfg.mean_type,
                    var_type=cfg.var_type, vlb_weight=cfg.vlb_weight, rescale_timesteps=cfg.rescale_timesteps,
                    generator=st.gen_noise, model_kwargs=kwargs,
                )  # fmt: skip
            losses = {k: v.float() for k, v in losses.items()}
            if not isinstance(
                st.sampler, UniformSampler
            ):  # a uniform sampler learns nothing: skip its checks
                # NaN/inf are zeroed here so every rank still joins the sampler's all-gather; the NaN detector
                # stops the run at the next check and nothing after this step is ever saved.
                st.sampler.update(
                    t, torch.nan_to_num(losses["loss"].detach(), nan=0.0, posinf=0.0, neginf=0.0)
                )
            # Share m/B of the batch mean, so the microbatch gradients add up to the full-batch mean gradient.
            loss = (losses["loss"] * w).sum() / B
            if st.scaler is not None:
                st.scaler.scale(loss).backward()
            else:
                loss.backward()
        ts.append(t)
        ws.append(w)
        terms.append({k: v.detach() for k, v in losses.items()})
    if st.scaler is not None:
        st.scaler.step(st.opt)
        st.scaler.update()
    else:
        st.opt.step()
    for rate, ema_p in st.ema_params.items():
        ema_update(ema_p, st.params, ema_decay(rate, st.step, cfg.ema_warmup))
    st.step += 1
    if len(ts) == 1:
        return StepOutput(ts[0], ws[0], terms[0])
    return StepOutput(torch.cat(ts), torch.cat(ws), {k: torch.cat([d[k] for d in terms]) for k in terms[0]})


# --------------------------------------------------------------------------------------------------- logging


class _Stats:
    """Device-side running sums of the logged terms and a NaN/inf detector, read once per interval."""

    def __init__(self, keys: list[str], T: int, device: torch.device) -> None:
        self.keys, self.T, self.device = keys, T, device
        self.reset()
        self.first_bad = torch.full((len(keys),), -1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        K = len(self.keys)
        self.sums = torch.zeros(K, dtype=torch.float64, device=self.device)
        self.q_sums = torch.zeros(K, 4, dtype=torch.float64, device=self.device)
        self.q_counts = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, step: int, out: StepOutput) -> None:
        vals = torch.stack(
            [out.losses[k].double() * out.w for k in self.keys]
        )  # (K, B) weighted, as the authors
        self.sums += vals.mean(1)
        q = torch.div(4 * out.t, self.T, rounding_mode="floor").clamp_(0, 3)  # int(4 t / T)
        self.q_sums.index_add_(1, q, vals)
        self.q_counts.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))
        bad = ~torch.isfinite(vals).all(1)
        self.first_bad = torch.where(
            bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad
        )
        self.n += 1

    def check(self) -> tuple[int, str] | None:
        """(step, term) of the first non-finite term seen on any rank, or None. One host sync."""
        fb = self.first_bad.clone()
        if is_dist():
            fb = torch.where(fb < 0, torch.full_like(fb, 2**62), fb)
            dist.all_reduce(fb, op=dist.ReduceOp.MIN)
            fb = torch.where(fb == 2**62, torch.full_like(fb, -1), fb)
        vals = fb.tolist()
        hits = [(s, k) for s, k in zip(vals, self.keys, strict=True) if s >= 0]
        return min(hits) if hits else None

    def flush(self, step: int, lr: float, global_batch: int) -> dict[str, Any]:
        """Averages since the last flush (over ranks too) as a JSON-able record; resets the sums."""
        packed = torch.cat([self.sums, self.q_sums.flatten(), self.q_counts])
        if is_dist():
            dist.all_reduce(packed)
            packed[: len(self.keys)] /= dist.get_world_size()
        vals = packed.tolist()
        elapsed = time.perf_counter() - self.t0
        K = len(self.keys)
        rec: dict[str, Any] = {"step": step}
        for i, k in enumerate(self.keys):
            rec[k] = vals[i] / max(self.n, 1)
            for q in range(4):
                c = vals[K + 4 * K + q]
                if c > 0:
                    rec[f"{k}_q{q}"] = vals[K + i * 4 + q] / c
        rec.update(
            lr=lr,
            step_time_s=elapsed / max(self.n, 1),
            samples_per_s=global_batch * self.n / max(elapsed, 1e-9),
        )
        self.reset()
        return rec


# ---------------------------------------------------------------------------------------------- checkpoints


def _state_dict(st: TrainState, data_state: dict[str, int]) -> dict[str, Any] | None:
    """The checkpoint dict on rank 0 (None elsewhere). Collective: every rank must call it."""
    rngs = gather(ckpt_io.rng_state({"t": st.gen_t, "noise": st.gen_noise}))
    if st.dist.rank != 0:
        return None
    for m in st.emas.values():
        copy_buffers(st.model, m)
    return {
        "format": ckpt_io.FORMAT,
        "config": asdict(st.cfg),
        "model_config": asdict(st.unet_cfg),
        "step": st.step,
        "world_size": st.dist.world_size,
        "model": st.model.state_dict(),
        "ema": {repr(rate): m.state_dict() for rate, m in st.emas.items()},
        "opt": st.opt.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler is not None else None,
        "sampler": st.sampler.state_dict(),
        "data": data_state,
        "rng": rngs,
    }


def _load_into(
    ck: dict, model: nn.Module, emas: dict, opt: Any, scaler: Any, sampler: Any, weight_decay: float
) -> int:
    model.load_state_dict(ck["model"])
    for rate, m in emas.items():
        key = repr(rate)
        if key not in ck["ema"]:
            raise ckpt_io.CheckpointError(f"checkpoint has EMA rates {sorted(ck['ema'])}, not {key}")
        m.load_state_dict(ck["ema"][key])
    saved_opt = ck["opt"]
    # Keep this machine's kernel choice (fused on CUDA, foreach on CPU) instead of the saved one.
    for g_saved, g_now in zip(saved_opt["param_groups"], opt.param_groups, strict=True):
        for key in ("fused", "foreach", "capturable", "differentiable"):
            if key in g_now:
                g_saved[key] = g_now[key]
    opt.load_state_dict(saved_opt)
    for g in opt.param_groups:  # a resumable change (RESUMABLE_FIELDS) wins over the saved value
        g["weight_decay"] = weight_decay
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    sampler.load_state_dict(ck["sampler"])
    return int(ck["step"])


def _restore_rng(ck: dict, st: TrainState) -> bool:
    """Restore this rank's RNG states if the world size matches; returns whether it did."""
    rngs = ck.get("rng") or []
    if len(rngs) != st.dist.world_size:
        return False
    ckpt_io.set_rng_state(rngs[st.dist.rank], {"t": st.gen_t, "noise": st.gen_noise})
    return True


def load_training_checkpoint(path: str | os.PathLike, cfg: TrainConfig) -> dict[str, Any]:
    """Read a training checkpoint safely and refuse it if it was made with a different config."""
    return check_training_checkpoint(ckpt_io.safe_load(path), path, cfg)


# What a training checkpoint must hold to be resumed (its "rng" may be missing: then with a warning).
_RESUME_KEYS = {
    "config": "the training config",
    "model_config": "the model config",
    "step": "the step count",
    "model": "the model weights",
    "ema": "the EMA weights",
    "opt": "the optimizer state",
    "sampler": "the timestep sampler state",
    "data": "the data order",
}


def _check_keys(ck: dict[str, Any], path: str | os.PathLike, needed: dict[str, str], purpose: str) -> None:
    missing = [k for k in needed if k not in ck or (ck[k] is None and k != "scaler")]
    if missing:
        what = ", ".join(f"{k!r} ({needed[k]})" for k in missing)
        raise ckpt_io.CheckpointError(
            f"{path} cannot be {purpose}: it is missing {what}. It was not written by iddpm's train() or "
            "was cut or edited; use another checkpoint (e.g. an older ckpt_*.pt of the run)"
        )


def check_training_checkpoint(
    ck: dict[str, Any], path: str | os.PathLike, cfg: TrainConfig
) -> dict[str, Any]:
    """Refuse a loaded checkpoint (read from ``path``) of another format, with missing parts, or made with a
    different config (fields outside :data:`HARMLESS_FIELDS` and :data:`RESUMABLE_FIELDS`)."""
    if ck.get("format") != ckpt_io.FORMAT:
        raise ckpt_io.CheckpointError(
            f"{path} is not an iddpm training checkpoint (format {ck.get('format')!r})"
        )
    _check_keys(ck, path, _RESUME_KEYS, "resumed")
    ckpt_io.check_config(
        _upgrade_config(ck["config"]), asdict(cfg), ignore=HARMLESS_FIELDS | RESUMABLE_FIELDS
    )
    return ck


def resumable_changes(ck: dict[str, Any], cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The :data:`RESUMABLE_FIELDS` whose value in ``cfg`` differs from the checkpoint's:
    ``{name: {"from": old, "to": new}}``."""
    saved = _upgrade_config(ck["config"])
    return {
        k: {"from": saved.get(k), "to": getattr(cfg, k)}
        for k in sorted(RESUMABLE_FIELDS)
        if saved.get(k) != getattr(cfg, k)
    }


def load_model(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    rate: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, TrainConfig, UNetConfig, int]:
    """Load a model for sampling/evaluation from a training checkpoint.

    Args:
        path: a ``.pt`` written by :func:`train`.
        use_ema: take the EMA weights (what the paper samples from) instead of the raw ones.
        rate: which EMA rate (default: the first one saved).
        device: where to put the model (eval mode, no grad).

    Returns:
        ``(model, train_config, unet_config, step)``.
    """
    ck = ckpt_io.safe_load(path)
    if ck.get("format") != ckpt_io.FORMAT:
        raise ckpt_io.CheckpointError(
            f"{path} is not an iddpm training checkpoint (format {ck.get('format')!r})"
        )
    needed = {k: _RESUME_KEYS[k] for k in ("config", "model_config", "step", "ema" if use_ema else "model")}
    _check_keys(ck, path, needed, "loaded")
    unet_cfg = unet_config_from_checkpoint(ck)
    cfg = config_from_checkpoint(ck)
    if use_ema:
        key = repr(float(rate)) if rate is not None else next(iter(ck["ema"]))
        if key not in ck["ema"]:
            raise ValueError(f"no EMA rate {rate} in {path}; it has {sorted(ck['ema'])}")
        sd = ck["ema"][key]
    else:
        sd = ck["model"]
    model = UNet(unet_cfg)
    model.load_state_dict(sd)
    model.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)  # faster convolutions; conv outputs follow the weights
    return model, cfg, unet_cfg, int(ck["step"])


# --------------------------------------------------------------------------------------------------- loop


class TrainResult(NamedTuple):
    """How a run ended: ``step`` reached, the ``checkpoint`` written last, ``interrupted`` (by Ctrl-C, SIGTERM
    or a callback), the ``last_log`` record (means of the last interval), and the ``signal`` that stopped it
    (``"SIGINT"``, ``"SIGTERM"`` or None)."""

    step: int
    checkpoint: Path | None
    interrupted: bool
    last_log: dict[str, Any]
    signal: str | None = None


@torch.no_grad()
def save_sample_grid(st: TrainState, path: Path) -> Path:
    """Sample ``cfg.sample_num`` images from the first EMA model (respaced ancestral sampler) into a PNG."""
    from .data import save_png, to_uint8
    from .respace import respace, space_timesteps
    from .sampling import sample

    cfg, ucfg = st.cfg, st.unet_cfg
    s = st.schedule.to("cpu")
    if cfg.sample_spacing:
        s = respace(s, space_timesteps(cfg.diffusion_steps, cfg.sample_spacing))
    fast = s.to(st.device)
    ema = st.emas[cfg.ema_rates[0]]
    gen = torch.Generator(device=st.device).manual_seed(cfg.seed + 12345)
    n = cfg.sample_num
    kwargs = None
    if ucfg.num_classes is not None:
        kwargs = {"y": torch.arange(n, device=st.device) % ucfg.num_classes}
    with autocast(st.policy, st.device):
        x = sample(
            ema, fast, (n, ucfg.in_channels, ucfg.image_size, ucfg.image_size), mean_type=cfg.mean_type,
            var_type=cfg.var_type, rescale_timesteps=cfg.rescale_timesteps, generator=gen,
            model_kwargs=kwargs, device=st.device,
        )  # fmt: skip
    return save_png(path, to_uint8(x.float()))


class _StopRequest:
    """Set by the first SIGINT (Ctrl-C) or SIGTERM (what Slurm, Kubernetes and preemptible cloud VMs send):
    the loop saves a checkpoint at the next step boundary and returns. A second signal stops at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: str | None = None

    def set(self, name: str | None = None) -> None:
        if not self.event.is_set():
            self.signal = name
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


_STOP_SIGNALS = ("SIGINT", "SIGTERM")


def _install_stop_handlers(stop: _StopRequest) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``stop`` (main thread only); returns a function restoring the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set(signal.Signals(signum).name)

    for name in _STOP_SIGNALS:
        sig = getattr(signal, name)
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def train(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    checkpoint: dict[str, Any] | None = None,
    callback: Callable[[int, StepOutput], None] | None = None,
) -> TrainResult:
    """Train until ``cfg.total_steps``, logging, checkpointing and sampling along the way.

    Before any compute, ``cfg.out_dir`` is created and locked (:class:`iddpm.rundir.RunLock`; rank 0), the
    leftovers of interrupted writes are removed, and a fresh run (``resume=None``) refuses a folder that
    already holds a run. On resume, ``log.jsonl`` records past the checkpoint's step are dropped, and changed
    optimiser settings (:data:`RESUMABLE_FIELDS`) are applied and logged as a ``config_change`` record.

    Args:
        cfg: the run.
        resume: a checkpoint path, ``"auto"`` (``out_dir/latest.pt`` if present, else a fresh start) or None
            (a fresh start, refused if ``out_dir`` already holds a run).
        checkpoint: the dict already loaded from ``resume`` (e.g. by the CLI to read its config), so the file
            is not read twice; it is still checked against ``cfg``.
        callback: called as ``callback(step, out)`` after every completed step (1-based ``step``), e.g. to
            record losses in a notebook. Raising ``KeyboardInterrupt`` from it behaves like Ctrl-C.

    Returns:
        :class:`TrainResult`. A first Ctrl-C or SIGTERM saves a checkpoint at the next step boundary and
        returns with ``interrupted=True`` (and ``signal`` naming it).

    Raises:
        NonFiniteLossError: a loss term went NaN/inf (the last good checkpoint is kept, nothing bad is saved).
        CheckpointError: ``resume`` points at an unsafe file, one with missing parts, or one from a different
            config; or a checkpoint cannot be written (e.g. a full disk).
        RunDirError: ``out_dir`` cannot be written, already holds a run (fresh start), or is locked by
            another process.
    """
    info = setup_distributed(cfg.device)
    if cfg.batch_size % info.world_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is global and must divide evenly over {info.world_size} processes"
        )
    out_dir = Path(cfg.out_dir)
    fresh_ok = resume == "auto"
    if resume == "auto":
        resume = ckpt_io.find_resume(out_dir)
    if checkpoint is not None and resume is None:
        raise ValueError("checkpoint= needs the path it was loaded from as resume=")
    lock = rundir.RunLock(out_dir)
    error = None
    if info.rank == 0:
        try:
            rundir.prepare_out_dir(out_dir)
            lock.acquire()
            rundir.remove_stale_tmp(out_dir)
            if resume is None:
                if not fresh_ok:
                    rundir.check_fresh(out_dir)
                elif list(out_dir.glob("ckpt_*.pt")):
                    raise rundir.RunDirError(
                        f"{out_dir} holds checkpoints but no latest.pt: resume one of them with "
                        "--resume PATH, or start a new run with a new --out-dir"
                    )
        except rundir.RunDirError as e:
            lock.release()
            error = str(e)
    error = broadcast_from_main(error)  # every rank stops if rank 0 cannot use the folder
    if error is not None:
        raise rundir.RunDirError(error)
    try:
        return _train(cfg, info, out_dir, resume, checkpoint, callback)
    finally:
        lock.release()


def _train(
    cfg: TrainConfig,
    info: DistInfo,
    out_dir: Path,
    resume: str | os.PathLike | None,
    checkpoint: dict[str, Any] | None,
    callback: Callable[[int, StepOutput], None] | None,
) -> TrainResult:
    """The body of :func:`train`, run while rank 0 holds the run directory's lock."""
    from tqdm.auto import tqdm

    from .data import ImageBatches, load_dataset

    per_rank = cfg.batch_size // info.world_size
    is_main = info.rank == 0
    ck = None
    if resume is not None:
        if checkpoint is not None:
            ck = check_training_checkpoint(checkpoint, resume, cfg)
        else:
            ck = load_training_checkpoint(resume, cfg)

    base = UNetConfig.preset(cfg.preset, **cfg.model_overrides)
    size = cfg.image_size or base.image_size
    data = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, image_size=size)  # type: ignore[arg-type]
    unet_cfg = resolve_unet_config(cfg, data.shape[0], data.num_classes)
    batches = ImageBatches(
        data, per_rank, shuffle=True, flip=cfg.flip, seed=cfg.seed, drop_last=True, rank=info.rank,
        world_size=info.world_size, device=info.device,
    )  # fmt: skip
    st = make_train_state(cfg, unet_cfg, info, ck)
    exact = True
    changes: dict[str, dict[str, Any]] = {}
    if ck is not None:
        changes = resumable_changes(ck, cfg)
        if not ck.get("rng"):
            exact = False
            if is_main:
                print(
                    f"warning: {resume} has no RNG state: training continues, but its timestep and noise "
                    "draws differ from those of an uninterrupted run (not bitwise reproducible)",
                    file=sys.stderr,
                    flush=True,
                )
        elif ck.get("world_size") == info.world_size:
            batches.load_state_dict(ck["data"])
            exact = _restore_rng(ck, st)
        else:
            exact = False
            if is_main:
                print(f"note: checkpoint from {ck.get('world_size')} process(es); data order and RNG restart")

    if is_main and st.compiled:
        print(
            f"compiling the model (torch.compile, mode {effective_compile_mode(cfg, info.world_size)!r}; "
            "--compile false turns it off): "
            "the first steps take a minute or two",
            flush=True,
        )
    log_path = out_dir / "log.jsonl"
    if is_main:
        # A resumed run continues the log at the checkpoint's step; a fresh one (possibly after a run that
        # never saved a checkpoint, with --resume auto) starts it at 0.
        rundir.truncate_log(log_path, st.step)
        rundir.atomic_write_text(out_dir / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
    total = cfg.total_steps
    last_ckpt: Path | None = Path(resume) if resume is not None else None
    stats: _Stats | None = None
    last_log: dict[str, Any] = {}
    stop = _StopRequest()
    restore_signals = _install_stop_handlers(stop)
    bar = tqdm(
        total=total, initial=st.step, disable=not (is_main and cfg.progress), desc="train", dynamic_ncols=True
    )

    def check_finite() -> None:
        bad = stats.check() if stats is not None else None
        if bad is not None:
            raise NonFiniteLossError(bad[0], bad[1], last_ckpt)

    def save() -> None:
        nonlocal last_ckpt
        check_finite()
        if not all_finite(st.params):
            raise NonFiniteLossError(st.step, "parameters", last_ckpt)
        state = _state_dict(st, batches.state_dict())
        if state is not None:
            last_ckpt = ckpt_io.save_train_checkpoint(state, out_dir, st.step, keep_last=cfg.keep_last)

    def log(rec: dict[str, Any]) -> None:
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    resumed = ck is not None
    ck = checkpoint = None  # noqa: F841 (free the loaded tensors: the state holds its own copies now)
    if is_main and resumed:
        log({"event": "resume", "step": st.step, "from": str(resume), "exact": exact})
        if changes:
            log({"event": "config_change", "step": st.step, "changes": changes})
            shown = ", ".join(f"{k} {v['from']} -> {v['to']}" for k, v in changes.items())
            print(f"note: resuming with changed optimiser settings: {shown}", flush=True)
    start_step = st.step
    if is_main and resumed and st.step >= total:
        print(
            f"note: the checkpoint is already at step {st.step} >= the requested {total} steps; nothing to "
            f"train. Give a larger --steps (e.g. --steps {st.step + max(total, 1)}) to continue training.",
            flush=True,
        )
    interrupted = False
    saved_step = st.step if resumed else -1
    try:
        while st.step < total:
            try:
                x, y = next(batches)
            except KeyboardInterrupt:
                interrupted = True  # between steps: the state is consistent, save it below
                break
            # A KeyboardInterrupt inside the step (a 2nd Ctrl-C, or no handler off the main thread) may land
            # between the optimiser and EMA updates, so it propagates without saving a possibly torn state.
            out = train_step(st, x, y)
            if stats is None:
                stats = _Stats(sorted(out.losses), cfg.diffusion_steps, info.device)
            stats.add(st.step, out)
            if callback is not None:
                try:
                    callback(st.step, out)
                except KeyboardInterrupt:
                    stop.set()
            bar.update(1)
            done = st.step >= total
            at_log = st.step % cfg.log_every == 0 or done
            if info.world_size == 1:
                interrupted = stop.is_set()
            elif at_log:
                # Ranks see a signal at different steps: agree at log boundaries so all stop at the same step.
                flag = torch.tensor([int(stop.is_set())], device=info.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                interrupted = bool(flag.item())
            if at_log or interrupted:
                check_finite()
                rec = stats.flush(st.step, lr_at(cfg, st.step - 1), cfg.batch_size)
                last_log = rec
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if interrupted:
                break
            if cfg.save_every and st.step % cfg.save_every == 0 and not done:
                save()
                saved_step = st.step
            if is_main and cfg.sample_every and st.step % cfg.sample_every == 0 and not done:
                save_sample_grid(st, out_dir / f"samples_{st.step:07d}.png")
        if st.step > 0 and saved_step != st.step:
            save()
        if is_main and cfg.sample_every and not interrupted and st.step > start_step:
            save_sample_grid(st, out_dir / f"samples_{st.step:07d}.png")
        if info.world_size > 1:
            log({"event": "replicas", "step": st.step, "max_abs_diff": replica_diff(st.params)})
        if interrupted and is_main:
            log(
                {"event": "interrupted", "step": st.step, "checkpoint": str(last_ckpt), "signal": stop.signal}
            )
    finally:
        bar.close()
        restore_signals()
    return TrainResult(st.step, last_ckpt, interrupted, last_log, stop.signal if interrupted else None)
