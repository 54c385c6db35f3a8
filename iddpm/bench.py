"""Benchmark: training and sampling throughput of a preset, measured the way docs PERFORMANCE.md asks.

* Training: the real :func:`iddpm.train.train_step` (losses + backward + AdamW + every EMA update) on
  synthetic uniform[-1, 1] images already on the device (no data loader), uniform timestep sampler.
* Sampling: one model evaluation + ancestral update per step, over a chain respaced to ``sample_steps``
  steps (100 by default, as the authors' ``--timestep_respacing 100``), from the first EMA model.
* Timing: warm-up first (``torch.compile`` compiles there, and cuDNN picks its algorithms), then ``repeats``
  timed blocks, each with CUDA events on a GPU or ``time.perf_counter`` + synchronize elsewhere; the median
  block is reported.
* FLOPs: conv + matmul FLOPs (2 per multiply-add) counted once with ``torch.utils.flop_counter`` on the
  eager model, for one training step (forward + backward) and one forward; achieved TFLOP/s = FLOPs / time.
* Memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak RSS (includes Python).

``python -m iddpm bench --preset tiny --device cpu`` finishes in seconds (CI keeps it working);
``--preset cifar10 --batch 128 --sample-batch 256`` is the paper model of the targets table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_bench_args", "bench", "count_params", "format_table", "run_from_args"]


def count_params(preset: str, **overrides: Any) -> int:
    """Parameter count of a preset, built on the ``meta`` device (no memory, no init time)."""
    from .unet import UNet, UNetConfig, count_parameters

    with torch.device("meta"):
        return count_parameters(UNet(UNetConfig.preset(preset, **overrides)))


def _timer(device: torch.device, fn: Callable[[], Any], n: int) -> float:
    """Seconds for ``n`` calls of ``fn`` (CUDA events on a GPU, perf_counter + sync elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter() - t0


def _peak_mem_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _rss_gib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def bench(
    preset: str = "tiny",
    *,
    batch: int = 8,
    sample_batch: int | None = None,
    precision: str = "auto",
    compile: bool | None = None,
    compile_mode: str = "reduce-overhead",
    sample_compile_mode: str | None = None,
    channels_last: bool | None = None,
    steps: int | None = None,
    warmup: int = 3,
    repeats: int = 3,
    sample_steps: int | None = None,
    diffusion_steps: int = 4000,
    sample: bool = True,
    device: str = "auto",
    seed: int = 0,
    profile: str | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure one preset; returns a JSON-able dict (see :func:`format_table` for the fields shown).

    Args:
        preset: a :data:`iddpm.unet.PRESETS` name.
        batch: training batch. sample_batch: sampling batch (default ``2 * batch``).
        precision, compile_mode, channels_last: as in :class:`iddpm.train.TrainConfig`.
        compile: True/False, or None (default) for the automatic choice of a long run (on for one CUDA GPU
            with Triton, off on CPU; :func:`iddpm.runtime.choose_compile`): the bench measures the fast path.
        sample_compile_mode: ``torch.compile`` mode of the sampling model (default: ``compile_mode``).
        profile: if set, a path: after timing, profile a few training steps and sampling steps with
            ``torch.profiler`` and write the kernels ranked by device time there (text), plus the share of the
            wall time the device was busy (a low share means the step is bound by Python/launch overhead).
        report: called with the result once the timings are in, before profiling (so a profiler crash
            cannot lose them); the returned dict then also holds ``"profile"``.
        steps: training steps per timed block (default 20 on a GPU, 5 elsewhere); warmup: untimed steps
            before; repeats: timed blocks.
        sample_steps: respaced sampling steps per timed sampling loop (default 100 on a GPU, as the
            targets table; 10 elsewhere so a CPU run takes seconds).
        diffusion_steps: T of the training chain (4000 for the paper's CIFAR-10 model).
        sample: also time sampling.
        device: ``"auto"`` or a torch device string.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .losses import training_losses
    from .respace import respace, space_timesteps
    from .runtime import check_compile_mode, compile_model, get_device, resolve_compile
    from .sampling import sample as sample_fn
    from .train import DistInfo, TrainConfig, make_train_state, resolve_unet_config, train_step
    from .unet import UNetConfig

    dev = get_device(None if device == "auto" else device)
    gpu = dev.type == "cuda"
    steps = steps if steps is not None else (20 if gpu else 5)
    sample_steps = sample_steps if sample_steps is not None else (100 if gpu else 10)
    for name, v in (("batch", batch), ("steps", steps), ("repeats", repeats), ("sample_steps", sample_steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if sample_compile_mode is not None:
        check_compile_mode(sample_compile_mode)
    compile = resolve_compile(compile, dev)
    sample_batch = sample_batch or 2 * batch
    base = UNetConfig.preset(preset)
    cfg = TrainConfig(
        preset=preset, dataset="digits8", diffusion_steps=diffusion_steps, batch_size=batch, steps=1,
        precision=precision, compile=compile, compile_mode=compile_mode, channels_last=channels_last,
        seed=seed, progress=False,
        class_cond=base.num_classes is not None,
    )  # fmt: skip
    ucfg = resolve_unet_config(cfg, base.in_channels, base.num_classes)
    st = make_train_state(cfg, ucfg, DistInfo(0, 0, 1, dev))
    gen = torch.Generator(device=dev).manual_seed(seed)
    shape = (batch, ucfg.in_channels, ucfg.image_size, ucfg.image_size)
    x = torch.rand(shape, generator=gen, device=dev) * 2 - 1
    y = torch.randint(0, ucfg.num_classes, (batch,), generator=gen, device=dev) if ucfg.num_classes else None
    params = sum(p.numel() for p in st.model.parameters())

    # FLOPs of the eager model, counted once (the compiled graph does the same conv/matmul work).
    t = torch.randint(0, diffusion_steps, (batch,), generator=gen, device=dev)
    kw = {"y": y} if y is not None else None
    with FlopCounterMode(display=False) as fc:
        losses = training_losses(
            st.schedule, st.model, x, t, loss_type=cfg.loss_type, var_type=cfg.var_type, model_kwargs=kw
        )
        losses["loss"].mean().backward()
    train_flops = fc.get_total_flops()
    st.opt.zero_grad(set_to_none=True)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        st.model(x, t.float(), **(kw or {}))
    fwd_flops_per_image = fc.get_total_flops() / batch

    def one_step() -> None:
        train_step(st, x, y)

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    if warmup:
        _timer(dev, one_step, warmup)
    warmup_s = time.perf_counter() - t0
    times = [_timer(dev, one_step, steps) / steps for _ in range(repeats)]
    train_s = statistics.median(times)
    result: dict[str, Any] = {
        "preset": preset, "params": params, "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__, "precision": st.policy.name, "compile": compile,
        "compile_mode": compile_mode if compile else None,
        "sample_compile_mode": (sample_compile_mode or compile_mode) if compile else None,
        "channels_last": st.channels_last, "batch": batch, "diffusion_steps": diffusion_steps,
        "warmup_steps": warmup, "timed_steps": steps, "repeats": repeats, "train_warmup_s": warmup_s,
        "train_ms_per_step": train_s * 1e3, "train_img_per_s": batch / train_s,
        "train_flops_per_step": train_flops, "train_tflops": train_flops / train_s / 1e12,
        "train_ms_all_repeats": [v * 1e3 for v in times],
        "train_peak_mem_gib": _peak_mem_gib(dev), "fwd_flops_per_image": fwd_flops_per_image,
    }  # fmt: skip

    if sample:
        ema = st.emas[cfg.ema_rates[0]]
        model = compile_model(ema, sample_compile_mode or compile_mode) if compile else ema
        fast = respace(st.schedule.to("cpu"), space_timesteps(diffusion_steps, str(sample_steps))).to(dev)
        sshape = (sample_batch, *shape[1:])
        skw = None
        if ucfg.num_classes:
            skw = {"y": torch.randint(0, ucfg.num_classes, (sample_batch,), generator=gen, device=dev)}

        def one_loop() -> None:
            with torch.no_grad(), _autocast(st):
                sample_fn(
                    model, fast, sshape, mean_type=cfg.mean_type, var_type=cfg.var_type, generator=gen,
                    model_kwargs=skw, device=dev,
                )  # fmt: skip

        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        _timer(dev, one_loop, 1)  # warm-up (and compile)
        swarm = time.perf_counter() - t0
        loops = [_timer(dev, one_loop, 1) for _ in range(repeats)]
        loop_s = statistics.median(loops)
        result.update(
            sample_batch=sample_batch, sample_steps=fast.num_steps, sample_warmup_s=swarm,
            sample_ms_per_eval=loop_s / fast.num_steps * 1e3, sample_img_per_s=sample_batch / loop_s,
            sample_tflops=fwd_flops_per_image * sample_batch * fast.num_steps / loop_s / 1e12,
            sample_peak_mem_gib=_peak_mem_gib(dev),
        )  # fmt: skip
    result["peak_rss_gib"] = _rss_gib()
    if report is not None:
        report(result)
    if profile:
        parts = [("training step", one_step, 3, 1)]
        if sample:
            parts.append((f"sampling loop ({fast.num_steps} model calls)", one_loop, 1, fast.num_steps))
        try:
            result["profile"] = _profile(dev, parts, Path(profile), head=format_table(result))
        except Exception as e:  # noqa: BLE001 -- a profiler hiccup must not lose the measured numbers
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"profiling failed: {e}", file=sys.stderr)
    return result


def _kernel_us(prof: Any) -> float:
    """Summed duration of the device events (kernels, copies, fills) a profiler recorded, in microseconds."""
    from torch.autograd import DeviceType

    return float(sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA))


def _profile(
    dev: torch.device, parts: list[tuple[str, Callable[[], Any], int, int]], path: Path, head: str = ""
) -> dict[str, Any]:
    """Profile each ``(title, fn, calls, units)`` part and write the kernel tables to ``path``.

    For each part: the wall time per call, the summed device (kernel) time per call, their ratio (how busy the
    device was) and the ops ranked by self device time (CPU time on a CPU). Returns the numbers per part.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cpu_time_total" if dev.type != "cuda" else "self_cuda_time_total"
    out, lines = {}, [head, ""] if head else []
    for title, fn, calls, units in parts:
        fn()  # one more untimed call so the profiler sees steady state
        with torch_profile(activities=acts) as prof:
            wall = _timer(dev, fn, calls) / calls
        avgs = prof.key_averages()
        busy_us = _kernel_us(prof) / calls if dev.type == "cuda" else None
        rec = {
            "wall_ms_per_call": wall * 1e3,
            "device_ms_per_call": None if busy_us is None else busy_us / 1e3,
        }
        rec["device_busy_frac"] = None if busy_us is None else busy_us / 1e6 / wall
        out[title] = rec
        head_line = f"## {title}: {wall * 1e3:.2f} ms wall per call ({wall * 1e3 / units:.2f} ms per unit)"
        if busy_us is not None:
            frac = rec["device_busy_frac"]
            head_line += f", device busy {busy_us / 1e3:.2f} ms = {frac:.0%} of the wall time"
        lines += [head_line, ""]
        try:
            lines.append(avgs.table(sort_by=sort, row_limit=40, max_name_column_width=90))
        except (KeyError, AttributeError, ValueError):  # sort key renamed in some torch versions
            lines.append(avgs.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return out


def _autocast(st: Any):
    from .precision import autocast

    return autocast(st.policy, st.device)


def _compile_label(r: dict[str, Any]) -> str:
    if not r["compile"]:
        return "off"
    train, smp = r.get("compile_mode") or "default", r.get("sample_compile_mode") or "default"
    return train if train == smp else f"{train} (sampling {smp})"


def format_table(r: dict[str, Any]) -> str:
    """A small fixed-width table of a :func:`bench` result."""

    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    head = (
        f"{r['preset']}: {r['params']:,} params | {r['gpu'] or r['device']} | torch {r['torch']} | "
        f"{r['precision']}, compile={_compile_label(r)}, channels_last={r['channels_last']}"
    )
    rows = [
        ("what", "batch", "ms/step", "img/s", "TFLOP/s", "peak GiB"),
        ("train step", str(r["batch"]), f(r["train_ms_per_step"], ".1f"), f(r["train_img_per_s"], ",.1f"),
         f(r["train_tflops"], ".2f"), f(r["train_peak_mem_gib"], ".2f")),
    ]  # fmt: skip
    if "sample_ms_per_eval" in r:
        rows.append(
            (f"sample ({r['sample_steps']} steps)", str(r["sample_batch"]), f(r["sample_ms_per_eval"], ".1f"),
             f(r["sample_img_per_s"], ",.1f"), f(r["sample_tflops"], ".2f"),
             f(r["sample_peak_mem_gib"], ".2f"))
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head] + [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    if r.get("peak_rss_gib") is not None and r["train_peak_mem_gib"] is None:
        lines.append(f"(CPU: peak process RSS {r['peak_rss_gib']:.2f} GiB)")
    return "\n".join(lines)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-command's flags."""
    from .runtime import COMPILE_MODES
    from .unet import PRESETS

    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 2 x batch)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for one CUDA GPU with Triton, off elsewhere",
    )
    p.add_argument(
        "--compile-mode", default="reduce-overhead", choices=list(COMPILE_MODES), help="torch.compile mode"
    )
    p.add_argument(
        "--sample-compile-mode", default=None, choices=list(COMPILE_MODES), help="default: --compile-mode"
    )
    p.add_argument("--channels-last", default=None, choices=["auto", "true", "false"])
    p.add_argument("--steps", type=int, default=None, help="training steps per timed block (GPU 20, CPU 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=None, help="respaced sampling steps (GPU 100, CPU 10)")
    p.add_argument("--diffusion-steps", type=int, default=4000, help="T of the training chain")
    p.add_argument("--no-sample", action="store_true", help="time training only")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--params-only", action="store_true", help="print the parameter count (meta device) and exit"
    )
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument(
        "--profile", default=None, help="also profile a few steps and write the kernel tables (text) here"
    )


def run_from_args(ns: argparse.Namespace) -> int:
    """Run the ``bench`` sub-command."""
    if ns.params_only:
        n = count_params(ns.preset)
        print(f"{ns.preset}: {n:,} parameters")
        if ns.json:
            Path(ns.json).write_text(json.dumps({"preset": ns.preset, "params": n}) + "\n")
        return 0
    cl = {None: None, "auto": None, "true": True, "false": False}[ns.channels_last]

    def report(r: dict[str, Any]) -> None:
        if "profile" not in r:
            print(format_table(r), flush=True)
        if ns.json:
            Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.json).write_text(json.dumps(r, indent=1) + "\n")

    r = bench(
        ns.preset, batch=ns.batch, sample_batch=ns.sample_batch, precision=ns.precision, compile=ns.compile,
        compile_mode=ns.compile_mode, sample_compile_mode=ns.sample_compile_mode, profile=ns.profile,
        channels_last=cl, steps=ns.steps, warmup=ns.warmup, repeats=ns.repeats, sample_steps=ns.sample_steps,
        diffusion_steps=ns.diffusion_steps, sample=not ns.no_sample, device=ns.device, report=report,
    )  # fmt: skip
    if ns.profile:
        report(r)
        print(f"profile written to {ns.profile}")
    return 0
