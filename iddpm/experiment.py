"""The experiment runner: one config per claim of the paper, trained, measured and judged with provenance.

``python -m iddpm experiment run NAME [--scale smoke|cpu|gpu]`` reads ``experiments/NAME.json``, trains every
(arm, seed) -- each run once, in ``runs/experiments/<config hash>-s<seed>/``, shared by every experiment
that asks for the same config, resumable -- measures what the config's ``eval`` block asks for, and writes
``results/NAME/results.json`` (every number per arm and seed, a summary, a ``verdict`` per claim from
:mod:`iddpm.verdicts`, and ``provenance``), the figures (:mod:`iddpm.report`) and, per arm, a measurement file
``results/NAME/arms/ARM-sSEED.json`` that lets a re-run skip what is finished.

A config (JSON)::

    {"claim": "a", "title": ..., "paper": ..., "protocol": "...",
     "train": {TrainConfig fields shared by the arms},
     "arms": {"linear": {"schedule": "linear"}, "cosine": {}},           # per-arm TrainConfig changes
     "eval": {"nll": {...}, "quality": {...}, "skip": {...}, "gns": {...}, "curve": {...}},
     "scales": {"smoke": {"seeds": [0], "train": {...}, "eval": {...}}, "cpu": {...}, "gpu": {...}}}

A scale's ``train`` and ``eval`` blocks are merged over the top-level ones (dicts recursively). Every
checkpoint the runs save (``save_every``) is kept, so the gradient noise scale and the curves over training
can be measured at those steps afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import measure
from .checkpoint import safe_load
from .train import TrainConfig

__all__ = [
    "SCALES",
    "ExperimentSpec",
    "experiment_names",
    "load_results",
    "load_spec",
    "find_results_dir",
    "read_config",
    "run_experiment",
    "run_key",
    "train_run",
]

SCALES = ("smoke", "cpu", "gpu")
RUN_ROOT = Path("runs") / "experiments"
# Fields that only say where/how a run is written or shown: not part of a run's identity.
_NOT_IDENTITY = {"out_dir", "progress", "log_every", "sample_every", "sample_num", "device", "keep_last"}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


class ExperimentSpec:
    """An experiment config resolved at one scale: ``arms`` (name -> TrainConfig fields), ``seeds``,
    ``eval``."""

    def __init__(self, name: str, raw: dict[str, Any], scale: str) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        for key in ("claim", "train", "arms", "eval", "scales"):
            if key not in raw:
                raise ValueError(f"experiment {name!r}: the config has no {key!r} block")
        if scale not in raw["scales"]:
            raise ValueError(f"experiment {name!r} has no {scale!r} scale; it has {sorted(raw['scales'])}")
        sc = raw["scales"][scale]
        self.name, self.raw, self.scale = name, raw, scale
        self.config_dir: Path | None = None  # set by load_spec: where the config (and its git repo) lives
        self.claim: str = raw["claim"]
        self.seeds: list[int] = list(sc.get("seeds", [0]))
        self.train_base = _merge(raw["train"], sc.get("train", {}))
        self.eval: dict[str, Any] = _merge(raw["eval"], sc.get("eval", {}))
        scale_arms = sc.get("arms", {})
        self.arms: dict[str, dict[str, Any]] = {
            arm: _merge(_merge(self.train_base, over), scale_arms.get(arm, {}))
            for arm, over in raw["arms"].items()
        }
        for arm in self.arms:  # fail on a bad field now, not after hours of training
            self.config(arm, self.seeds[0])

    def config(self, arm: str, seed: int) -> TrainConfig:
        """The TrainConfig of one run (``out_dir`` set to its shared run directory)."""
        fields = dict(self.arms[arm], seed=seed)
        fields.setdefault("keep_last", 0)
        fields.setdefault("progress", False)
        fields.setdefault("sample_every", 0)
        for k in ("ema_rates",):
            if k in fields:
                fields[k] = tuple(fields[k])
        return TrainConfig(**{**fields, "out_dir": str(RUN_ROOT / run_key(fields))})

    def resolved(self) -> dict[str, Any]:
        """The config as run (scale merged in), for provenance."""
        return {
            "claim": self.claim,
            "scale": self.scale,
            "seeds": self.seeds,
            "arms": self.arms,
            "eval": self.eval,
            "source": self.raw,
        }


def load_spec(name: str, scale: str, config_dir: str | os.PathLike = "experiments") -> ExperimentSpec:
    """Read ``config_dir/NAME.json`` at ``scale``."""
    spec = ExperimentSpec(name, read_config(name, config_dir), scale)
    spec.config_dir = Path(config_dir).resolve()
    return spec


def experiment_names(config_dir: str | os.PathLike = "experiments") -> list[str]:
    """The experiments in ``config_dir`` (files starting with ``_`` are shared bases, not experiments)."""
    return sorted(p.stem for p in Path(config_dir).glob("*.json") if not p.stem.startswith("_"))


def read_config(name: str, config_dir: str | os.PathLike = "experiments") -> dict[str, Any]:
    """``config_dir/NAME.json``, merged over the config it ``"extends"`` (e.g. ``"_base"``), if any."""
    path = Path(config_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no experiment config {path}; experiments in {config_dir}: {experiment_names(config_dir)}"
        )
    raw = json.loads(path.read_text())
    parent = raw.pop("extends", None)
    return _merge(read_config(parent, config_dir), raw) if parent else raw


def run_key(fields: dict[str, Any] | TrainConfig) -> str:
    """``<12 hex of the run's declared config>-s<seed>``: equal configs share one run directory.

    The hash covers the fields an experiment declares (every field that matters is declared in
    ``experiments/_base.json``), not the code's defaults, so adding a new TrainConfig field to the package
    does not orphan finished runs.
    """
    if isinstance(fields, TrainConfig):
        fields = measure.config_dict(fields)
    ident = {k: v for k, v in measure.json_safe(fields).items() if k not in _NOT_IDENTITY and k != "seed"}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{digest}-s{fields.get('seed', 0)}"


# ------------------------------------------------------------------------------------------------ training


def train_run(cfg: TrainConfig, threads: int | None = None) -> dict[str, Any]:
    """Train one run to its end (resuming whatever is in its directory); returns its ``run_info.json``."""
    from .train import train

    out = Path(cfg.out_dir)
    info_path = out / "run_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("finished") and info.get("steps") == cfg.total_steps:
            return info
    if threads:
        torch.set_num_threads(threads)
    if out.is_dir() and not (out / "latest.pt").is_file():
        # A run of ours that stopped before its first checkpoint: nothing to resume, so start it again. The
        # runner owns these folders (runs/experiments/<key>); only the files a run writes are removed.
        for p in [out / "log.jsonl", out / "config.json", *out.glob("ckpt_*.pt")]:
            p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = train(cfg, resume="auto")
    prior = json.loads(info_path.read_text()).get("wall_s", 0.0) if info_path.is_file() else 0.0
    info = {
        "finished": not res.interrupted and res.step >= cfg.total_steps,
        "steps": res.step,
        "wall_s": prior + time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "last_log": res.last_log,
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    if not info["finished"]:
        raise KeyboardInterrupt(f"run {out} was interrupted at step {res.step}")
    return info


def _train_worker(args: tuple[dict[str, Any], int]) -> dict[str, Any]:
    fields, threads = args
    fields = {**fields, "ema_rates": tuple(fields["ema_rates"])}
    return train_run(TrainConfig(**fields), threads)


def train_all(cfgs: list[TrainConfig], jobs: int, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train the unique runs among ``cfgs``, ``jobs`` at a time (processes with ``cores // jobs`` threads)."""
    from tqdm.auto import tqdm

    unique = {c.out_dir: c for c in cfgs}
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    infos: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(unique), desc="runs", dynamic_ncols=True)
    if jobs <= 1:
        for out_dir, c in unique.items():
            bar.set_postfix_str(Path(out_dir).name)
            infos[out_dir] = train_run(c, threads if jobs > 0 else None)
            bar.update(1)
    else:
        import multiprocessing as mp

        args = [(measure.config_dict(c), threads) for c in unique.values()]
        with mp.get_context("spawn").Pool(jobs) as pool:
            for out_dir, info in zip(unique, pool.imap(_train_worker, args), strict=True):
                infos[out_dir] = info
                bar.update(1)
                log(f"trained {out_dir} in {info['wall_s']:.0f} s")
    bar.close()
    return infos


# --------------------------------------------------------------------------------------------- measuring


def _checkpoints(cfg: TrainConfig) -> list[tuple[int, Path]]:
    out = Path(cfg.out_dir)
    found = sorted((int(p.stem.split("_")[1]), p) for p in out.glob("ckpt_*.pt"))
    return [(s, p) for s, p in found if s <= cfg.total_steps]


def _model_at(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig, Any, int]:
    from .train import load_model

    return load_model(ckpt, use_ema=True, device=device)


def _data(cfg: TrainConfig, ucfg: Any, split: str) -> torch.Tensor:
    from .data import load_dataset

    return load_dataset(cfg.dataset, root=cfg.data_root, split=split, image_size=ucfg.image_size).images  # type: ignore[arg-type]


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class _Real:
    """Real-image features per (dataset, size), computed once per experiment."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, int, str], torch.Tensor] = {}

    def feats(self, cfg: TrainConfig, ucfg: Any, split: str) -> torch.Tensor:
        from .features import digit_features

        key = (cfg.dataset, ucfg.image_size, split)
        if key not in self.cache:
            self.cache[key] = digit_features(_data(cfg, ucfg, split))
        return self.cache[key]


def measure_arm(
    spec: ExperimentSpec, arm: str, seed: int, device: torch.device, real: _Real
) -> dict[str, Any]:
    """Every measurement the config's ``eval`` block asks of one trained (arm, seed)."""
    cfg = spec.config(arm, seed)
    ev = spec.eval
    final = Path(cfg.out_dir) / f"ckpt_{cfg.total_steps:07d}.pt"
    model, _, ucfg, step = _model_at(final, device)
    shape = (ucfg.in_channels, ucfg.image_size, ucfg.image_size)
    out: dict[str, Any] = {"arm": arm, "seed": seed, "run": Path(cfg.out_dir).name, "step": step}
    base_seed = 1000 * seed + 17  # the measurement noise: fixed per seed, the same for every arm
    if "nll" in ev and arm in ev["nll"].get("arms", spec.arms):
        test = _data(cfg, ucfg, "test")[: ev["nll"].get("images")]
        out["nll"] = measure.nll(
            model, cfg, test, generator=_gen(device, base_seed), batch=ev["nll"].get("batch", 500)
        )
    if "quality" in ev:
        q = ev["quality"]
        feats = real.feats(cfg, ucfg, q.get("reference", "train"))
        out["quality"] = {}
        for vname, var in q["variants"].items():
            if var["arm"] != arm:
                continue
            rows = []
            for K in q["steps"]:
                K_eff = None if K in ("T", cfg.diffusion_steps) else int(K)
                imgs = measure.generate(
                    model,
                    cfg,
                    q["samples"],
                    shape,
                    steps=K_eff,
                    generator=_gen(device, base_seed + 1),
                    var_type=var.get("var_type"),
                    method=var.get("method", "ancestral"),
                )
                rows.append({"steps": K_eff or cfg.diffusion_steps, **measure.sample_quality(feats, imgs)})
            out["quality"][vname] = rows
    if "skip" in ev:
        sk = ev["skip"]
        feats = real.feats(cfg, ucfg, sk.get("reference", "train"))
        rows = []
        for frac in sk["fractions"]:
            imgs = measure.generate(
                model,
                cfg,
                sk["samples"],
                shape,
                steps=sk.get("steps"),
                generator=_gen(device, base_seed + 2),
                skip=float(frac),
            )
            rows.append({"skip": frac, **measure.sample_quality(feats, imgs)})
        out["skip"] = rows
    if "gns" in ev:
        g = ev["gns"]
        train_imgs = _data(cfg, ucfg, "train")
        from .unet import UNet

        net = UNet(ucfg).to(device)
        rows = []
        for s_, path in _checkpoints(cfg):
            if g.get("steps") and s_ not in g["steps"]:
                continue
            ck = safe_load(path, map_location=device)
            r = measure.gradient_noise_scale(
                ck, cfg, net, train_imgs, examples=g["examples"], generator=_gen(device, base_seed + 3 + s_)
            )
            rows.append({"step": s_, **r})
        out["gns"] = rows
    if "curve" in ev:
        c = ev["curve"]
        feats = real.feats(cfg, ucfg, c.get("reference", "train"))
        test = _data(cfg, ucfg, "test")[: c.get("nll_images")]
        flops_img = measure.forward_flops(model, shape)
        rows = []
        for s_, path in _checkpoints(cfg):
            m, _, _, _ = _model_at(path, device)
            imgs = measure.generate(
                m, cfg, c["samples"], shape, steps=c.get("steps"), generator=_gen(device, base_seed + 4)
            )
            q = measure.sample_quality(feats, imgs)
            n = measure.nll(m, cfg, test, generator=_gen(device, base_seed + 5))
            rows.append(
                {
                    "step": s_,
                    "train_flops": 3.0 * flops_img * cfg.batch_size * s_,
                    "bpd": n["bpd"],
                    "bpd_se": n["bpd_se"],
                    **q,
                }
            )
        out["curve"] = rows
        out["params"] = sum(p.numel() for p in model.parameters())
    return out


# ------------------------------------------------------------------------------------------------ provenance


def _git(*args: str, cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=cwd)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(
    spec: ExperimentSpec, wall_s: float, runs: dict[str, dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """Where a results file came from: config, commit, command, seeds, versions, device, wall time."""
    import numpy as np

    repo = spec.config_dir
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=repo)
    return {
        "config": spec.resolved(),
        "commit": _git("rev-parse", "HEAD", cwd=repo),
        "dirty": bool(dirty) if dirty is not None else None,
        "command": f"python -m iddpm experiment run {spec.name} --scale {spec.scale}",
        "seeds": spec.seeds,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "wall_s": wall_s,
        "train_wall_s": {Path(k).name: v.get("wall_s") for k, v in runs.items()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_experiment(
    name: str,
    scale: str = "cpu",
    *,
    config_dir: str | os.PathLike = "experiments",
    results_dir: str | os.PathLike = "results",
    jobs: int = 1,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, measure, judge and write ``results_dir/NAME/results.json`` (+ figures). Returns the results.

    Re-running skips finished runs and finished (arm, seed) measurements of the same config, so an interrupted
    experiment continues where it stopped.
    """
    from . import report, verdicts

    t0 = time.perf_counter()
    spec = load_spec(name, scale, config_dir)
    from .runtime import get_device

    dev = get_device(None if device == "auto" else device)
    out_dir = Path(results_dir) / name
    arms_dir = out_dir / "arms" if scale != "smoke" else out_dir / "smoke" / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    cfgs = [spec.config(arm, seed) for arm in spec.arms for seed in spec.seeds]
    runs = train_all(cfgs, jobs, log)
    real = _Real()
    per_arm: dict[str, dict[str, Any]] = {arm: {} for arm in spec.arms}
    eval_key = hashlib.sha256(json.dumps(spec.eval, sort_keys=True).encode()).hexdigest()[:12]
    for arm in spec.arms:
        for seed in spec.seeds:
            path = arms_dir / f"{arm}-s{seed}.json"
            key = Path(spec.config(arm, seed).out_dir).name
            if path.is_file():
                prev = json.loads(path.read_text())
                if prev.get("run") == key and prev.get("eval_key") == eval_key:
                    per_arm[arm][str(seed)] = prev
                    continue
            log(f"measuring {name}: arm {arm}, seed {seed}")
            t_arm = time.perf_counter()
            m = measure_arm(spec, arm, seed, dev, real)
            m["measure_wall_s"] = time.perf_counter() - t_arm
            m["eval_key"] = eval_key
            m["train_wall_s"] = runs[spec.config(arm, seed).out_dir].get("wall_s")
            path.write_text(json.dumps(m, indent=1) + "\n")
            per_arm[arm][str(seed)] = m
    results: dict[str, Any] = {
        "experiment": name,
        "claim": spec.claim,
        "title": spec.raw.get("title"),
        "paper": spec.raw.get("paper"),
        "protocol": spec.raw.get("protocol"),
        "scale": scale,
        "arms": per_arm,
    }
    results["summary"] = verdicts.summarize(results)
    results["verdict"] = verdicts.judge(results)
    results["provenance"] = provenance(spec, time.perf_counter() - t0, runs, dev)
    target = out_dir / ("results.json" if scale != "smoke" else "smoke/results.json")
    if target.is_file():  # a re-run that only redid part of the work: keep the earlier commands' time too
        before = json.loads(target.read_text()).get("provenance", {})
        earlier = before.get("total_wall_s", before.get("wall_s", 0.0))
        results["provenance"]["total_wall_s"] = earlier + results["provenance"]["wall_s"]
        results["provenance"]["earlier_commits"] = sorted(
            {*before.get("earlier_commits", []), before.get("commit")} - {None}
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(measure.json_safe(results), indent=1) + "\n")
    os.replace(tmp, target)
    report.draw(results, target.parent)
    report.write_readme(results, target.parent)
    if scale == "cpu":
        report.write_index(results_dir)
    if spec.eval.get("export"):
        export_pretrained(spec, spec.eval["export"], target.parent if scale == "smoke" else None, log)
    v = results["verdict"]
    log(f"{name} ({scale}): verdict {v['verdict']!r}; results in {target}")
    return results


def export_pretrained(
    spec: ExperimentSpec, exports: dict[str, dict[str, Any]], to: Path | None, log: Callable[[str], None]
) -> None:
    """Write the small EMA-only checkpoints the book loads with :func:`iddpm.pretrained`."""
    from .model_zoo import CHECKPOINT_DIR, write_pretrained

    for pname, e in exports.items():
        cfg = spec.config(e["arm"], int(e.get("seed", spec.seeds[0])))
        src = Path(cfg.out_dir) / f"ckpt_{cfg.total_steps:07d}.pt"
        dest = (to or CHECKPOINT_DIR) / f"{pname}.pt"
        info = {
            "experiment": spec.name,
            "scale": spec.scale,
            "arm": e["arm"],
            "seed": cfg.seed,
            "command": f"python -m iddpm experiment run {spec.name} --scale {spec.scale}",
            "commit": _git("rev-parse", "HEAD", cwd=spec.config_dir),
        }
        write_pretrained(safe_load(src), dest, info)
        log(f"exported {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


def find_results_dir() -> Path:
    """Where the committed results live: ``$IDDPM_RESULTS``, else ``results/`` of the repository this package
    was installed from (an editable install or a clone, e.g. the book's Colab set-up), else ``./results``."""
    env = os.environ.get("IDDPM_RESULTS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1] / "results"
    return repo if repo.is_dir() else Path("results")


def load_results(
    name: str, results_dir: str | os.PathLike | None = None, smoke: bool = False
) -> dict[str, Any]:
    """Read ``results_dir/NAME/results.json`` (or the smoke-scale one); default :func:`find_results_dir`."""
    root = Path(results_dir) if results_dir is not None else find_results_dir()
    path = root / name / ("smoke/results.json" if smoke else "results.json")
    if not path.is_file():
        raise FileNotFoundError(f"no results at {path}: run `python -m iddpm experiment run {name}` first")
    return json.loads(path.read_text())
