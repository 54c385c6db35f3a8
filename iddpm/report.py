"""Figures of an experiment, drawn from its ``results.json`` alone (``iddpm experiment report NAME``).

Each figure shows means over seeds with error bars of one standard error, and is saved as PNG next to the
results. Panels are stacked vertically so they stay readable on a narrow screen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["draw", "errorbar", "write_index", "write_readme"]


def errorbar(ax: Any, xs: list[float], stats: list[dict[str, Any]], label: str, **kw: Any) -> None:
    """Means with one-standard-error bars of ``stats`` (``{"mean", "se"}`` dicts) against ``xs``."""
    ax.errorbar(
        xs,
        [s["mean"] for s in stats],
        yerr=[s["se"] for s in stats],
        label=label,
        capsize=3,
        marker="o",
        ms=4,
        **kw,
    )


def _bars(ax: Any, names: list[str], stats: list[dict[str, Any]], ylabel: str) -> None:
    ax.bar(names, [s["mean"] for s in stats], yerr=[s["se"] for s in stats], capsize=4, color="#4c72b0")
    for i, s in enumerate(stats):
        ax.plot([i] * len(s["values"]), s["values"], "k.", ms=5)
    ax.set_ylabel(ylabel)
    lo = min(min(s["values"]) for s in stats)
    hi = max(max(s["values"]) for s in stats)
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad * 3, hi + pad)


def _title(res: dict[str, Any]) -> str:
    v = res["verdict"]
    return f"claim {res['claim']}: {v['verdict']} ({v['held']}/{v['of']} checks), {res['scale']} scale"


def draw(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw the figures of ``results`` into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    s = results["summary"]
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.suptitle(_title(results), fontsize=10)
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p, dpi=130)
        plt.close(fig)
        paths.append(p)

    nll_arms = [a for a in s if "nll" in s[a]]
    if nll_arms:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        _bars(ax, nll_arms, [s[a]["nll"] for a in nll_arms], "held-out NLL (bits/dim)")
        save(fig, "nll.png")
    skip_arms = [a for a in s if "skip" in s[a]]
    if skip_arms:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for a in skip_arms:
            errorbar(ax, [100 * r["skip"] for r in s[a]["skip"]], [r["fid"] for r in s[a]["skip"]], a)
        ax.set_xlabel("% of the reverse process skipped (noisiest steps)")
        ax.set_ylabel("digit-FID")
        ax.legend()
        save(fig, "skip_fid.png")
    quality = {v: rows for a in s.values() for v, rows in a.get("quality", {}).items()}
    if quality:
        fig, axes = plt.subplots(3, 1, figsize=(5, 8.5), sharex=True)
        for v, rows in quality.items():
            ks = [r["steps"] for r in rows]
            for ax, k in zip(axes, ("fid", "precision", "recall"), strict=True):
                errorbar(ax, ks, [r[k] for r in rows], v)
        for ax, k in zip(axes, ("digit-FID", "precision", "recall"), strict=True):
            ax.set_xscale("log")
            ax.set_ylabel(k)
        axes[0].set_yscale("log")
        axes[-1].set_xlabel("sampling steps K")
        axes[0].legend(fontsize=8)
        save(fig, "quality_vs_steps.png")
    gns_arms = [a for a in s if "gns" in s[a]]
    if gns_arms:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for a in gns_arms:
            errorbar(ax, [r["step"] for r in s[a]["gns"]], [r["b_simple"] for r in s[a]["gns"]], a)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("gradient noise scale B_simple")
        ax.legend()
        save(fig, "gradient_noise.png")
    curve_arms = [a for a in s if "curve" in s[a]]
    if curve_arms:
        fig, axes = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True)
        for a in curve_arms:
            rows = [r for r in s[a]["curve"] if r["train_flops"] > 0]
            label = f"{a} ({s[a]['params'] / 1e6:.2f} M params)" if s[a].get("params") else a
            errorbar(axes[0], [r["train_flops"] for r in rows], [r["fid"] for r in rows], label)
            errorbar(axes[1], [r["train_flops"] for r in rows], [r["bpd"] for r in rows], label)
        fit = results.get("fits", {}).get("fid_vs_flops")
        if fit:
            xs = sorted(r["train_flops"] for a in curve_arms for r in s[a]["curve"] if r["train_flops"] > 0)
            xs = [xs[0], xs[-1]]
            axes[0].plot(
                xs,
                [10 ** (fit["intercept"] + fit["slope"] * math.log10(x)) for x in xs],
                "k--",
                lw=1,
                label=f"power law, slope {fit['slope']:.2f} (r² {fit['r2']:.2f})",
            )
        for ax in axes:
            ax.set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("digit-FID")
        axes[1].set_ylabel("held-out NLL (bits/dim)")
        axes[1].set_xlabel("training compute (FLOPs)")
        axes[0].legend(fontsize=7)
        save(fig, "scaling.png")
    return paths


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def write_readme(results: dict[str, Any], out_dir: str | Path) -> Path:
    """``README.md`` of an experiment, generated from ``results`` (every number in it is read from there).

    A hand-written ``discussion.md`` in ``out_dir`` (why a claim does or does not reproduce, what a larger
    run would need) is appended as the last section.
    """
    out_dir = Path(out_dir)
    s, v, prov = results["summary"], results["verdict"], results["provenance"]
    lines = [f"# Claim {results['claim']}: {results.get('title') or results['experiment']}", ""]
    lines += [
        f"**Paper:** {results.get('paper') or ''}",
        "",
        f"**Protocol (as fixed before running, for the CPU scale):** {results.get('protocol') or ''}",
        "",
    ]
    if results["scale"] != "cpu":
        lines += [
            f"This file is the **{results['scale']}** scale (seeds {prov['seeds']}); see the config.",
            "",
        ]
    lines += [
        f"## Verdict: {v['verdict']} ({v['held']} of {v['of']} checks hold)",
        "",
        "A check holds when the difference exceeds twice its standard error (seed-to-seed).",
        "",
        "| check | holds | difference | standard error |",
        "|---|---|---:|---:|",
    ]
    for c in v["checks"]:
        se = "" if c.get("se") is None else f"{c['se']:.4g}"
        lines.append(f"| {c['check']} | {'yes' if c['holds'] else 'no'} | {c['difference']:.4g} | {se} |")
    lines += ["", "## Measurements (mean ± standard error over seeds)", ""]
    nll_arms = [a for a in s if "nll" in s[a]]
    if nll_arms:
        lines += ["| arm | held-out NLL (bits/dim) | seeds |", "|---|---:|---:|"]
        lines += [f"| {a} | {_fmt(s[a]['nll'])} | {s[a]['nll']['n']} |" for a in nll_arms]
        lines.append("")
    for a in s:
        if "skip" in s[a]:
            lines += [
                f"Skipping the noisiest steps, arm **{a}**:",
                "",
                "| skipped | digit-FID | precision | recall |",
                "|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {100 * r['skip']:.0f}% | {_fmt(r['fid'], 2)} | {_fmt(r['precision'])} | "
                f"{_fmt(r['recall'])} |"
                for r in s[a]["skip"]
            ]
            lines.append("")
    quality = {q: rows for a in s.values() for q, rows in a.get("quality", {}).items()}
    if quality:
        lines += ["| sampler | K | digit-FID | precision | recall |", "|---|---:|---:|---:|---:|"]
        for q, rows in quality.items():
            lines += [
                f"| {q} | {r['steps']} | {_fmt(r['fid'], 2)} | {_fmt(r['precision'])} | {_fmt(r['recall'])} |"
                for r in rows
            ]
        lines.append("")
    gns_arms = [a for a in s if "gns" in s[a]]
    if gns_arms:
        steps = [r["step"] for r in s[gns_arms[0]]["gns"]]
        lines += [
            "Gradient noise scale B_simple:",
            "",
            "| arm | " + " | ".join(f"step {st}" for st in steps) + " |",
            "|---|" + "---:|" * len(steps),
        ]
        lines += [
            f"| {a} | "
            + " | ".join(f"{r['b_simple']['mean']:.3g} ± {r['b_simple']['se']:.2g}" for r in s[a]["gns"])
            + " |"
            for a in gns_arms
        ]
        lines.append("")
    curve_arms = [a for a in s if "curve" in s[a]]
    if curve_arms:
        lines += [
            "| arm | params | step | training FLOPs | digit-FID | NLL (bits/dim) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for a in curve_arms:
            lines += [
                f"| {a} | {s[a]['params']:,} | {r['step']} | {r['train_flops']:.3g} | {_fmt(r['fid'], 2)} | "
                f"{_fmt(r['bpd'])} |"
                for r in s[a]["curve"]
            ]
        for k, fit in results.get("fits", {}).items():
            lines.append(f"\nLog-log fit {k}: slope {fit['slope']:.3f}, r² {fit['r2']:.3f}.")
        lines.append("")
    figs = sorted(p.name for p in out_dir.glob("*.png"))
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figs] + [""]
    lines += [
        "## Provenance",
        "",
        f"- command: `{prov['command']}`",
        f"- commit: `{prov['commit']}`"
        + (" (with uncommitted changes)" if prov.get("dirty") else "")
        + (
            f"; earlier commands at {', '.join(c[:10] for c in prov['earlier_commits'])}"
            if prov.get("earlier_commits")
            else ""
        ),
        f"- seeds: {prov['seeds']}; torch {prov['torch']}, numpy {prov['numpy']}; device {prov['device']} "
        f"({prov.get('machine', '')}, {prov.get('cpu_count')} cores)",
        f"- wall time: {prov.get('total_wall_s', prov['wall_s']) / 60:.1f} min over the commands that wrote "
        "this file (measurement, plus any training they did; each run's training time is in results.json)",
        f"- date: {prov.get('date')}",
        "",
    ]
    disc = out_dir / "discussion.md"
    if disc.is_file():
        lines += ["## Discussion", "", disc.read_text().strip(), ""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def write_index(results_dir: str | Path) -> Path:
    """``results_dir/README.md``: one line per experiment's CPU-scale results (claim, verdict, wall time)."""
    import json

    results_dir = Path(results_dir)
    rows = [
        "# Results: the paper's claims at small scale",
        "",
        "Written by `python -m iddpm experiment run NAME --scale cpu` (each line links to its own README "
        "with the protocol, every number, the figures and the provenance). Verdicts follow the rules in "
        "`iddpm/verdicts.py`, fixed before the runs.",
        "",
        "| claim | experiment | verdict | checks held | seeds | wall time (min) | commit |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for path in sorted(results_dir.glob("*/results.json")):
        r = json.loads(path.read_text())
        v, p = r["verdict"], r["provenance"]
        rows.append(
            f"| {r['claim']} | [{r['title']}]({path.parent.name}/README.md) | {v['verdict']} | "
            f"{v['held']}/{v['of']} | {p['seeds']} | {p.get('total_wall_s', p['wall_s']) / 60:.1f} | "
            f"`{(p['commit'] or '')[:10]}` |"
        )
    extra = results_dir / "notes.md"
    if extra.is_file():
        rows += ["", extra.read_text().strip()]
    out = results_dir / "README.md"
    out.write_text("\n".join(rows) + "\n")
    return out
