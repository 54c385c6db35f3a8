"""``python -m iddpm experiment run|report|list``: the command-line face of :mod:`iddpm.experiment`."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_experiment_args", "cmd_experiment"]


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The ``experiment`` sub-command's own sub-commands and flags."""
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="train every arm and seed, measure, judge, write results/NAME/")
    r.add_argument("names", nargs="+", metavar="NAME", help="experiment(s) in --config-dir, or 'all'")
    r.add_argument(
        "--scale",
        default="cpu",
        choices=["smoke", "cpu", "gpu"],
        help="smoke: seconds (CI); cpu: the committed results; gpu: the larger protocol",
    )
    r.add_argument(
        "--jobs", type=int, default=1, help="runs trained in parallel (each with cores/jobs threads)"
    )
    r.add_argument("--train-only", action="store_true", help="only train the runs (all named experiments)")
    r.add_argument(
        "--device", default="auto", help="where to measure (training follows each config's device)"
    )
    g = sub.add_parser("report", help="redraw the figures from results/NAME/results.json (no training)")
    g.add_argument("names", nargs="+", metavar="NAME")
    g.add_argument("--smoke", action="store_true", help="the smoke-scale results")
    sub.add_parser("list", help="the experiments and their claims")
    for q in (r, g, sub.choices["list"]):
        q.add_argument("--config-dir", default="experiments")
        q.add_argument("--results-dir", default="results")


def _names(names: list[str], config_dir: str) -> list[str]:
    from .experiment import experiment_names

    return experiment_names(config_dir) if names == ["all"] else names


def cmd_experiment(ns: argparse.Namespace) -> int:
    from .experiment import load_results, read_config, run_experiment

    if ns.action == "list":
        for name in _names(["all"], ns.config_dir):
            raw = read_config(name, ns.config_dir)
            print(f"{name}: claim {raw['claim']}: {raw.get('title', '')}")
        return 0
    if ns.action == "report":
        from .report import draw, write_readme

        for name in _names(ns.names, ns.config_dir):
            res = load_results(name, ns.results_dir, smoke=ns.smoke)
            target = Path(ns.results_dir) / name / ("smoke" if ns.smoke else "")
            for p in [*draw(res, target), write_readme(res, target)]:
                print(p)
        return 0
    if ns.train_only:
        from .experiment import load_spec, train_all

        specs = [load_spec(n, ns.scale, ns.config_dir) for n in _names(ns.names, ns.config_dir)]
        cfgs = [sp.config(arm, seed) for sp in specs for arm in sp.arms for seed in sp.seeds]
        train_all(cfgs, ns.jobs, print)
        return 0
    for name in _names(ns.names, ns.config_dir):
        run_experiment(
            name,
            ns.scale,
            config_dir=ns.config_dir,
            results_dir=ns.results_dir,
            jobs=ns.jobs,
            device=ns.device,
        )
    return 0
