"""Command line: ``python -m iddpm train|sample|nll|features|bench|experiment`` (also the ``iddpm`` script).

Examples::

    python -m iddpm train --preset digits8 --dataset digits8 --diffusion-steps 100 --steps 1000 --ema-warmup
    python -m iddpm train --preset cifar10 --dataset cifar10 --download --out-dir runs/c10          # 1 GPU
    torchrun --nproc_per_node=8 -m iddpm train --preset cifar10 --dataset cifar10 --out-dir runs/c10  # 8 GPUs
    python -m iddpm train --resume auto --out-dir runs/c10                # continue where it stopped
    python -m iddpm sample runs/c10/latest.pt --num 64 --respacing 100 --out samples.png
    python -m iddpm sample runs/c10/latest.pt --num 64 --respacing ddim25 --ddim --eta 0
    python -m iddpm sample runs/c10/latest.pt --num 50000 --batch 500 --compile   # compile pays off here
    python -m iddpm nll runs/c10/latest.pt --num 256 --respacing 100
    python -m iddpm bench --preset cifar10 --batch 128 --sample-batch 256 --json b.json  # GPU: bf16+compile
    python -m iddpm features train --kind all             # the digit classifiers behind digit-FID
    python -m iddpm experiment run all --scale cpu --jobs 2   # the paper's claims at small scale -> results/

``train`` flags are generated from :class:`iddpm.train.TrainConfig`'s fields (``--batch-size`` for
``batch_size``, ...). With ``--resume``, the checkpoint's config is the base and only the flags you give
change it; changing anything outside :data:`iddpm.train.HARMLESS_FIELDS` is refused with the field names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "config_from_args"]


def _parse_bool_or_auto(v: str) -> bool | None:
    v = v.strip().lower()
    if v in ("auto", "none"):
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {v!r}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise argparse.ArgumentTypeError(
            f"model override must look like KEY=VALUE (e.g. dropout=0.1), got {item!r}"
        )
    key, value = item.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key.strip(), parsed


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, typed from the annotations; defaults are SUPPRESSed so that only
    the flags actually given override the base config (the defaults, or the checkpoint's when resuming)."""
    from .data import DATASET_NAMES
    from .runtime import COMPILE_MODES
    from .train import TrainConfig
    from .unet import PRESETS

    hints = typing.get_type_hints(TrainConfig)
    choices: dict[str, Any] = {
        "preset": sorted(PRESETS),
        "dataset": list(DATASET_NAMES),
        "schedule": ["cosine", "linear"],
        "loss_type": ["simple", "hybrid", "vlb"],
        "mean_type": ["eps", "x0", "xprev"],
        "var_type": ["fixed_small", "fixed_large", "learned", "learned_range"],
        "schedule_sampler": ["uniform", "loss-second-moment"],
        "precision": ["auto", "fp32", "bf16", "fp16"],
        "compile_mode": list(COMPILE_MODES),
    }
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        non_none = [a for a in args if a is not type(None)] if _is_union(hint) else [hint]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        shown = defaults[f.name] if defaults[f.name] is not dataclasses.MISSING else "{}"
        if f.name == "model_overrides":
            p.add_argument(
                flag,
                "--model",
                nargs="+",
                type=_parse_override,
                metavar="KEY=VALUE",
                help="UNetConfig fields to change, e.g. --model dropout=0.1 base_channels=64",
                **kw,
            )
            continue
        if non_none == [bool] and _is_union(hint):
            p.add_argument(
                flag, type=_parse_bool_or_auto, metavar="auto|true|false", help="default: auto", **kw
            )
        elif hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"default: {shown}", **kw)
        elif typing.get_origin(hint) is tuple:
            p.add_argument(flag, nargs="+", type=typing.get_args(hint)[0], help=f"default: {shown}", **kw)
        else:
            p.add_argument(
                flag, type=non_none[0], choices=choices.get(f.name), help=f"default: {shown}", **kw
            )


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def config_from_args(ns: argparse.Namespace, base: dict[str, Any] | None = None):
    """``TrainConfig`` from the flags given, over ``base`` (e.g. a checkpoint's config dict) or defaults."""
    from .train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(ns).items() if k in names}
    if "model_overrides" in given:
        given["model_overrides"] = dict(given["model_overrides"])
    if "ema_rates" in given:
        given["ema_rates"] = tuple(given["ema_rates"])
    if base is None:
        return TrainConfig(**given)
    from .train import _upgrade_config

    d = _upgrade_config(dict(base))
    d["ema_rates"] = tuple(d["ema_rates"])
    d.update(given)
    return TrainConfig(**d)


def _ema_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--use-ema",
        dest="use_ema",
        action="store_true",
        default=True,
        help="use the EMA weights (default; what the paper samples from)",
    )
    g.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw trained weights")


def build_parser() -> argparse.ArgumentParser:
    """The ``iddpm`` parser with its four sub-commands."""
    from .bench import add_bench_args
    from .runtime import COMPILE_MODES

    parser = argparse.ArgumentParser(
        prog="iddpm", description="Improved DDPM: train, sample, evaluate, benchmark."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (use torchrun for several GPUs)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="continue from a checkpoint; 'auto' = OUT_DIR/latest.pt if it exists",
    )
    _add_config_flags(p)

    p = sub.add_parser("sample", help="draw images from a checkpoint (PNG grid + .npz)")
    p.add_argument("checkpoint")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--batch", type=int, default=64, help="images per model call")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--respacing",
        default=None,
        help="kept steps: '100', '10,15,20' or 'ddim25'; default: at most 100, i.e. min(100, T) "
        "(all T with --respacing '')",
    )
    g.add_argument("--steps", type=int, default=None, help="shorthand for --respacing N")
    p.add_argument("--ddim", action="store_true", help="DDIM update instead of ancestral sampling")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic); needs --ddim")
    p.add_argument(
        "--class-labels",
        default=None,
        help="class-conditional models: comma-separated labels (cycled) or 'random' (default: 0,1,2,...)",
    )
    p.add_argument("--seed", type=int, default=0)
    _ema_flags(p)
    p.add_argument("--ema-rate", type=float, default=None, help="which EMA rate (default: the first saved)")
    p.add_argument(
        "--out", default="samples.png", help="PNG grid (must end in .png); the .npz goes next to it"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default, as in training): bf16 autocast on GPUs with bf16, fp16 on older ones (T4), "
        "fp32 on CPU",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model for sampling: costs ~1-2 min of compile time once, pays off for long "
        "runs (many images or steps); default: off",
    )
    p.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=list(COMPILE_MODES),
        help="torch.compile mode with --compile; 'reduce-overhead' replays each model call as a CUDA graph",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    p = sub.add_parser("nll", help="bits/dim of held-out images under the variational bound")
    p.add_argument("checkpoint")
    p.add_argument("--num", type=int, default=256, help="number of images to evaluate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--respacing", default="", help="evaluate the bound of a respaced chain (e.g. '100'); '' = all T"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "test", "all"],
        help="held-out 'test' (digits8/mnist5k: a fixed 1/6 of each class; a folder has only 'train')",
    )
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    _ema_flags(p)
    p.add_argument("--ema-rate", type=float, default=None, help="which EMA rate (default: the first saved)")
    p.add_argument(
        "--json", default=None, help="where to write per-t terms (default: next to the checkpoint)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    _add_features_parser(sub)

    p = sub.add_parser("bench", help="time training and sampling steps (img/s, TFLOP/s, memory)")
    add_bench_args(p)

    from .experiment_cli import add_experiment_args

    add_experiment_args(sub.add_parser("experiment", help="run the paper's claims at small scale (results/)"))
    return parser


def _device(name: str):
    from .runtime import get_device

    return get_device(None if name == "auto" else name)


def cmd_train(ns: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, find_resume, safe_load
    from .train import TrainConfig, cleanup_distributed, train

    resume = ns.resume
    base = None
    # The checkpoint is read once: its config is the base here, and train() gets the loaded dict. It sits in
    # this holder (not a local) so that train() holds the only reference and can free it after loading.
    loaded: dict[str, Any] = {}
    if resume is not None:
        path = find_resume(getattr(ns, "out_dir", TrainConfig.out_dir)) if resume == "auto" else Path(resume)
        if path is not None:
            loaded["checkpoint"] = safe_load(path)
            base = loaded["checkpoint"].get("config")
            if not isinstance(base, dict):
                raise CheckpointError(f"{path} is not an iddpm training checkpoint (no config)")
            resume = path
        # else: auto with nothing to resume; train() starts fresh (and refuses checkpoints without latest.pt)
    cfg = config_from_args(ns, base)
    try:
        result = train(cfg, resume=resume, checkpoint=loaded.pop("checkpoint", None))
    finally:
        cleanup_distributed()
    # The shell convention for a run stopped by a signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
    code = 143 if result.signal == "SIGTERM" else 130
    if int(os.environ.get("RANK", "0")) != 0:
        return code if result.interrupted else 0
    if result.interrupted:
        why = f" ({result.signal})" if result.signal else ""
        print(
            f"interrupted at step {result.step}{why}; saved {result.checkpoint} (continue with --resume auto)"
        )
        return code
    print(f"done: step {result.step}, checkpoint {result.checkpoint}")
    return 0


def _labels(spec: str | None, n: int, num_classes: int, gen) -> Any:
    import torch

    if spec is None:
        return torch.arange(n) % num_classes
    if spec == "random":
        return torch.randint(0, num_classes, (n,), generator=gen)
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--class-labels must be comma-separated ints or 'random', got {spec!r}") from None
    if not vals or min(vals) < 0 or max(vals) >= num_classes:
        raise ValueError(f"--class-labels must lie in [0, {num_classes}), got {spec!r}")
    return torch.tensor(vals)[torch.arange(n) % len(vals)]


EMA_COLD = 0.1  # warn when the EMA still holds more than this share of the random initial weights


def _warn_if_ema_cold(cfg: Any, rate: float | None, step: int) -> float:
    """Print a warning when the chosen EMA is barely warmed up; returns its initial-weight share."""
    from .ema import ema_init_weight

    rate = cfg.ema_rates[0] if rate is None else float(rate)
    share = ema_init_weight(rate, step, cfg.ema_warmup)
    if share > EMA_COLD:
        print(
            f"warning: after {step} steps the EMA (rate {rate}{', with warm-up' if cfg.ema_warmup else ''}) "
            f"still holds {share:.0%} of the random initial weights, so its samples will look like noise. "
            "Use --no-ema (the raw weights), train longer, or train with --ema-warmup.",
            file=sys.stderr,
        )
    return share


def _check_ema_flags(ns: argparse.Namespace) -> None:
    if not ns.use_ema and ns.ema_rate is not None:
        raise ValueError(
            f"--ema-rate {ns.ema_rate} picks an EMA, but --no-ema uses the raw weights: give one of the two"
        )


def cmd_sample(ns: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .data import save_png, to_uint8
    from .precision import autocast, resolve_precision
    from .respace import respace, space_timesteps
    from .rundir import check_output_file
    from .runtime import compile_model
    from .sampling import _check_eta, sample
    from .schedules import Schedule
    from .train import default_respacing, load_model

    if ns.num < 1 or ns.batch < 1:
        raise ValueError("--num and --batch must be >= 1")
    # Cheap checks first, before the (possibly large) checkpoint is read.
    if not ns.eta >= 0.0:
        raise ValueError(f"--eta must be >= 0 (0 = deterministic DDIM), got {ns.eta}")
    if ns.eta != 0.0 and not ns.ddim:
        raise ValueError("--eta only applies to DDIM sampling: add --ddim (ancestral sampling has no eta)")
    # A folder given as --out is an error (not a grid named "folder.png").
    out = check_output_file(Path(ns.out), "--out grid")
    if out.suffix == "":
        out = out.with_suffix(".png")
    elif out.suffix.lower() != ".png":
        raise ValueError(
            f"--out {ns.out!r}: the grid is written as PNG, so the name must end in .png "
            f"(e.g. {str(out.with_suffix('.png'))!r}); the .npz goes next to it"
        )
    _check_ema_flags(ns)
    check_output_file(out, "--out grid")
    check_output_file(out.with_suffix(".npz"), "--out arrays")
    device = _device(ns.device)
    model, cfg, ucfg, step = load_model(ns.checkpoint, use_ema=ns.use_ema, rate=ns.ema_rate, device=device)
    if ns.use_ema:
        _warn_if_ema_cold(cfg, ns.ema_rate, step)
    if ns.steps is not None:
        spacing = str(ns.steps)
    elif ns.respacing is None:
        spacing = default_respacing(cfg.diffusion_steps)  # at most 100 steps
    else:
        spacing = ns.respacing
    s = Schedule.named(cfg.schedule, cfg.diffusion_steps)
    if spacing:
        s = respace(s, space_timesteps(cfg.diffusion_steps, spacing))
    if ns.ddim:
        _check_eta(s, ns.eta)
    s = s.to(device)
    policy = resolve_precision(ns.precision, device)
    if ns.compile:
        model = compile_model(model, ns.compile_mode)
    gen = torch.Generator(device=device).manual_seed(ns.seed)
    labels = None
    if ucfg.num_classes is not None:
        labels = _labels(ns.class_labels, ns.num, ucfg.num_classes, torch.Generator().manual_seed(ns.seed))
    elif ns.class_labels is not None:
        raise ValueError("--class-labels given but this model is unconditional")
    chunks = []
    for start in tqdm(range(0, ns.num, ns.batch), disable=not ns.progress, desc="sample"):
        n = min(ns.batch, ns.num - start)
        kw = None if labels is None else {"y": labels[start : start + n].to(device)}
        with autocast(policy, device):
            x = sample(
                model, s, (n, ucfg.in_channels, ucfg.image_size, ucfg.image_size),
                method="ddim" if ns.ddim else "ancestral", eta=ns.eta, mean_type=cfg.mean_type,
                var_type=cfg.var_type, rescale_timesteps=cfg.rescale_timesteps, generator=gen,
                model_kwargs=kw, device=device,
            )  # fmt: skip
        chunks.append(to_uint8(x.float()).cpu())
    images = torch.cat(chunks)  # (N, C, H, W) uint8
    save_png(out, images)
    npz = out.with_suffix(".npz")
    # The authors' layout (arr_0: N x H x W x C uint8, arr_1: labels), which their FID/IS scripts read.
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    np.savez(npz, **arrays)
    print(
        f"wrote {out} and {npz}: {ns.num} images from step {step} ({'EMA' if ns.use_ema else 'raw'} weights, "
        f"{s.num_steps} {'DDIM' if ns.ddim else 'ancestral'} steps)"
    )
    return 0


def cmd_nll(ns: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset, to_model_range
    from .evaluate import bits_per_dim
    from .respace import respace, space_timesteps
    from .rundir import check_output_file
    from .schedules import Schedule
    from .train import load_model

    if ns.num < 1 or ns.batch < 1:
        raise ValueError("--num and --batch must be >= 1")
    _check_ema_flags(ns)
    path = Path(ns.json) if ns.json else Path(ns.checkpoint).with_suffix(".nll.json")
    check_output_file(path, "--json file")
    device = _device(ns.device)
    model, cfg, ucfg, step = load_model(ns.checkpoint, use_ema=ns.use_ema, rate=ns.ema_rate, device=device)
    split = ns.split
    if split == "test" and cfg.dataset == "folder":
        print("note: a 'folder' dataset has no test split; evaluating on training images")
        split = "train"
    data = load_dataset(
        cfg.dataset, root=ns.data_root or cfg.data_root, split=split, image_size=ucfg.image_size
    )
    n = min(ns.num, len(data))
    s = Schedule.named(cfg.schedule, cfg.diffusion_steps)
    if ns.respacing:
        s = respace(s, space_timesteps(cfg.diffusion_steps, ns.respacing))
    s = s.to(device)
    gen = torch.Generator(device=device).manual_seed(ns.seed)
    totals, priors, terms = [], [], []
    for start in range(0, n, ns.batch):
        x0 = to_model_range(data.images[start : start + ns.batch][: n - start]).to(device)
        kw = None
        if ucfg.num_classes is not None:
            kw = {"y": data.labels[start : start + x0.shape[0]].to(device)}
        r = bits_per_dim(model, s, x0, mean_type=cfg.mean_type, var_type=cfg.var_type,
                         rescale_timesteps=cfg.rescale_timesteps, generator=gen, model_kwargs=kw,
                         progress=ns.progress)  # fmt: skip
        totals.append(r.total.cpu())
        priors.append(r.prior.cpu())
        terms.append(r.terms.cpu())
    total, prior, term = torch.cat(totals), torch.cat(priors), torch.cat(terms)
    result = {
        "checkpoint": str(ns.checkpoint), "step": step, "dataset": cfg.dataset, "split": split, "num": n,
        "num_steps": s.num_steps, "respacing": ns.respacing, "bpd": total.mean().item(),
        "bpd_stderr": (total.std() / max(n, 1) ** 0.5).item() if n > 1 else None,
        "prior_bpd": prior.mean().item(), "terms_bpd": term.mean(0).tolist(),
        "timesteps": s.timesteps.tolist(),
    }  # fmt: skip
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"bits/dim {result['bpd']:.4f} (prior {result['prior_bpd']:.4f}) over {n} {split} images, "
        f"{s.num_steps}-step bound; per-t terms in {path}"
    )
    return 0


def _add_features_parser(sub: Any) -> None:
    """``features train``: the digit classifiers behind digit-FID (:mod:`iddpm.features`)."""
    p = sub.add_parser("features", help="the digit classifiers behind digit-FID and precision/recall")
    fsub = p.add_subparsers(dest="features_command", required=True)
    t = fsub.add_parser(
        "train",
        help="train a digit classifier on its training split; writes .pt + .json with the held-out accuracy",
    )
    t.add_argument("--kind", choices=["digits8", "mnist", "all"], default="all", help="default: all")
    t.add_argument("--epochs", type=int, default=None, help="default: 60 for digits8, 20 for mnist")
    t.add_argument("--seed", type=int, default=0, help="default: 0")
    t.add_argument("--limit", type=int, default=None, help="train on this many images only (smoke tests)")
    t.add_argument("--out-dir", default=None, help="default: the package's own iddpm/checkpoints folder")
    t.add_argument("--log", action="store_true", help="print the loss and held-out accuracy every epoch")


def cmd_features(ns: argparse.Namespace) -> int:
    from .features import KINDS, save_digit_classifier, train_digit_classifier

    for kind in KINDS if ns.kind == "all" else (ns.kind,):
        model, info = train_digit_classifier(kind, epochs=ns.epochs, seed=ns.seed, limit=ns.limit, log=ns.log)
        command = f"python -m iddpm features train --kind {kind} --epochs {info['epochs']} --seed {ns.seed}"
        info["command"] = command + (f" --limit {ns.limit}" if ns.limit is not None else "")
        pt, js = save_digit_classifier(model, info, ns.out_dir)
        at16 = f", {info['test_accuracy_16']:.2%} at 16x16" if "test_accuracy_16" in info else ""
        print(
            f"{kind}: held-out accuracy {info['test_accuracy']:.2%}{at16} on {info['test_size']} "
            f"{info['dataset']} test digits ({info['train_size']} trained on, {info['epochs']} epochs, "
            f"{info['train_seconds']} s); wrote {pt} and {js}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m iddpm`` and the ``iddpm`` script; returns the exit code."""
    from .checkpoint import CheckpointError
    from .train import NonFiniteLossError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "train":
            return cmd_train(ns)
        if ns.command == "sample":
            return cmd_sample(ns)
        if ns.command == "features":
            return cmd_features(ns)
        if ns.command == "nll":
            return cmd_nll(ns)
        if ns.command == "experiment":
            from .experiment_cli import cmd_experiment

            return cmd_experiment(ns)
        from .bench import run_from_args

        return run_from_args(ns)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        # User errors (bad values, unknown names, unusable checkpoints or output folders): a one-line
        # message, not a traceback.
        print(f"iddpm {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError) as e:
        # An output path that cannot be written, found late (the early checks cover the usual cases).
        print(f"iddpm {ns.command}: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"iddpm {ns.command}: error: {e}", file=sys.stderr)
        return 1
