"""Summaries and verdicts of the experiments, one rule per claim, fixed before any run (EXPERIMENTS.md).

Every check compares means over seeds and counts only when the difference exceeds twice its standard error
(``sqrt(se_a^2 + se_b^2)``, each the seed-to-seed standard error, or, with a single seed, the measurement's
own standard error where it has one). A claim is ``"reproduced"`` when all its checks hold, ``"partly"`` when
some do, and ``"not reproduced"`` when none does. The rules:

* **a** (cosine vs linear): (1) held-out NLL cosine < linear; (2) skipping the first 20% of the reverse
  process costs the linear schedule less digit-FID than the cosine one (the end of the linear forward process
  is "wasted").
* **b** (learned variances and fast sampling): (1) at every K <= T/4, L_hybrid's digit-FID < L_simple's with
  sigma^2 = beta and with sigma^2 = beta-tilde; (2) L_hybrid's digit-FID at K = 50 (or the K nearest T/2) is
  within 10% of its own at K = T; (3) DDIM beats L_hybrid at the smallest K; (4) L_hybrid beats DDIM at K = T.
* **c** (gradient noise and importance sampling): (1) the gradient noise scale of L_vlb (uniform t) >
  L_hybrid's, averaged over the measured checkpoints in log space (a seed whose estimate of ``|G|^2`` is not
  positive at some checkpoint has an unbounded noise scale: see :func:`compare`); (2) importance sampling
  lowers L_vlb's;
  (3) held-out NLL of L_vlb + importance sampling < L_vlb uniform; (4) < L_hybrid.
* **d** (more diffusion steps): held-out NLL falls from each T to the next larger T.
* **e** (scaling): digit-FID follows a power law in training compute: over all widths and checkpoints, a
  log-log fit of FID against FLOPs has a negative slope with r^2 >= 0.8; and the largest model at its last
  checkpoint has the best FID and NLL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["compare", "judge", "summarize"]


def _mean_se(vals: list[float], own_se: list[float] | None = None) -> dict[str, Any]:
    n = len(vals)
    mean = sum(vals) / n
    if not all(math.isfinite(v) for v in vals):
        se = math.nan  # an unbounded measurement (e.g. a noise scale whose |G|^2 estimate is <= 0)
    elif n > 1:
        se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)
    else:
        se = own_se[0] if own_se else 0.0
    return {"mean": mean, "se": se, "n": n, "values": vals}


def compare(lower: dict[str, Any], higher: dict[str, Any], what: str) -> dict[str, Any]:
    """Check that ``lower['mean'] < higher['mean']`` by more than twice the combined standard error.

    When a value is not finite (an unbounded measurement) the standard error is undefined; the check then
    asks for complete separation instead: every seed of ``higher`` above every seed of ``lower`` (with 3
    seeds a side, a one-sided permutation p-value of 1/20).
    """
    diff = higher["mean"] - lower["mean"]
    values = lower.get("values", []) + higher.get("values", [])
    if values and not all(math.isfinite(v) for v in values):
        holds = min(higher["values"]) > max(lower["values"])
        return {"check": what + " (seeds completely separated; a value is unbounded)", "holds": bool(holds),
                "difference": diff, "se": None, "z": None}  # fmt: skip
    se = math.sqrt(lower["se"] ** 2 + higher["se"] ** 2)
    holds = diff > 2 * se if se > 0 else diff > 0
    return {
        "check": what,
        "holds": bool(holds),
        "difference": diff,
        "se": se,
        "z": diff / se if se > 0 else None,
    }


def _seeds(results: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    return [results["arms"][arm][s] for s in sorted(results["arms"][arm], key=int)]


def _stat(rows: Iterable[dict[str, Any]], get: Callable[[dict[str, Any]], float], se: Callable | None = None):
    rows = list(rows)
    return _mean_se([get(r) for r in rows], [se(r) for r in rows] if se else None)


def _nll(results: dict[str, Any], arm: str) -> dict[str, Any]:
    return _stat(_seeds(results, arm), lambda r: r["nll"]["bpd"], lambda r: r["nll"]["bpd_se"])


def _verdict(checks: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(c["holds"] for c in checks)
    v = "reproduced" if checks and n == len(checks) else ("partly" if n else "not reproduced")
    return {"verdict": v, "checks": checks, "held": n, "of": len(checks)}


# ------------------------------------------------------------------------------------------------- summaries


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Means and standard errors over seeds of everything measured, per arm (and per K / skip / step)."""
    out: dict[str, Any] = {}
    for arm in results["arms"]:
        rows = _seeds(results, arm)
        if not rows:
            continue
        a: dict[str, Any] = {}
        if "nll" in rows[0]:
            a["nll"] = _nll(results, arm)
        if "skip" in rows[0]:
            a["skip"] = [
                {
                    "skip": r0["skip"],
                    **{
                        k: _stat(rows, lambda r, i=i, k=k: r["skip"][i][k])
                        for k in ("fid", "precision", "recall")
                    },
                }
                for i, r0 in enumerate(rows[0]["skip"])
            ]
        if rows[0].get("quality"):
            a["quality"] = {
                v: [
                    {
                        "steps": r0["steps"],
                        **{
                            k: _stat(rows, lambda r, v=v, i=i, k=k: r["quality"][v][i][k])
                            for k in ("fid", "precision", "recall")
                        },
                    }
                    for i, r0 in enumerate(rows[0]["quality"][v])
                ]
                for v in rows[0]["quality"]
            }
        if "gns" in rows[0]:
            a["gns"] = [
                {
                    "step": r0["step"],
                    "b_simple": _stat(rows, lambda r, i=i: r["gns"][i]["b_simple"]),
                    "log10_b": _stat(rows, lambda r, i=i: math.log10(max(r["gns"][i]["b_simple"], 1e-12))),
                }
                for i, r0 in enumerate(rows[0]["gns"])
            ]
            a["gns_log10_mean"] = _stat(
                rows, lambda r: sum(math.log10(max(g["b_simple"], 1e-12)) for g in r["gns"]) / len(r["gns"])
            )
        if "curve" in rows[0]:
            a["curve"] = [
                {
                    "step": r0["step"],
                    "train_flops": r0["train_flops"],
                    **{
                        k: _stat(rows, lambda r, i=i, k=k: r["curve"][i][k])
                        for k in ("fid", "bpd", "precision", "recall")
                    },
                }
                for i, r0 in enumerate(rows[0]["curve"])
            ]
            a["params"] = rows[0].get("params")
        out[arm] = a
    return out


# -------------------------------------------------------------------------------------------------- verdicts


def _judge_a(res: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [compare(s["cosine"]["nll"], s["linear"]["nll"], "held-out NLL: cosine < linear")]

    def cost(arm: str, frac: float) -> dict[str, Any]:
        rows = _seeds(res, arm)
        i0 = next(i for i, r in enumerate(rows[0]["skip"]) if r["skip"] == 0)
        i1 = min(range(len(rows[0]["skip"])), key=lambda i: abs(rows[0]["skip"][i]["skip"] - frac))
        return _stat(rows, lambda r: r["skip"][i1]["fid"] - r["skip"][i0]["fid"])

    checks.append(
        compare(
            cost("linear", 0.2),
            cost("cosine", 0.2),
            "skipping 20% of the reverse process costs linear less digit-FID than cosine",
        )
    )
    return checks


def _judge_b(res: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    q = {v: rows for a in s.values() for v, rows in a.get("quality", {}).items()}
    hyb, beta, tilde, ddim = q["hybrid"], q["simple-beta"], q["simple-beta-tilde"], q["ddim"]
    T = max(r["steps"] for r in hyb)
    checks = []
    for i, r in enumerate(hyb):
        if r["steps"] <= T / 4:
            checks.append(compare(r["fid"], beta[i]["fid"], f"K={r['steps']}: hybrid < simple sigma^2=beta"))
            checks.append(
                compare(r["fid"], tilde[i]["fid"], f"K={r['steps']}: hybrid < simple sigma^2=beta-tilde")
            )
    full = next(r for r in hyb if r["steps"] == T)
    mid = min(hyb, key=lambda r: abs(r["steps"] - min(50, T // 2)))
    bound = {"mean": 1.1 * full["fid"]["mean"], "se": 1.1 * full["fid"]["se"]}
    c = compare(mid["fid"], bound, f"hybrid at K={mid['steps']} within 10% of its digit-FID at K=T={T}")
    c["holds"] = mid["fid"]["mean"] <= bound["mean"] + 2 * math.sqrt(mid["fid"]["se"] ** 2 + bound["se"] ** 2)
    checks.append(c)
    checks.append(compare(ddim[0]["fid"], hyb[0]["fid"], f"K={hyb[0]['steps']}: DDIM < hybrid"))
    checks.append(compare(full["fid"], ddim[-1]["fid"], f"K=T={T}: hybrid < DDIM"))
    return checks


def _judge_c(res: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    g = {arm: s[arm]["gns_log10_mean"] for arm in ("hybrid", "vlb", "vlb-is")}
    return [
        compare(g["hybrid"], g["vlb"], "gradient noise scale: L_vlb (uniform t) > L_hybrid"),
        compare(g["vlb-is"], g["vlb"], "gradient noise scale: importance sampling lowers L_vlb's"),
        compare(
            s["vlb-is"]["nll"], s["vlb"]["nll"], "held-out NLL: L_vlb + importance sampling < L_vlb uniform"
        ),
        compare(
            s["vlb-is"]["nll"], s["hybrid"]["nll"], "held-out NLL: L_vlb + importance sampling < L_hybrid"
        ),
    ]


def _judge_d(res: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    cfgs = res.get("arm_T") or {arm: int(arm.split("T")[-1]) for arm in s}
    order = sorted(s, key=lambda a: cfgs[a])
    return [
        compare(s[b]["nll"], s[a]["nll"], f"held-out NLL: T={cfgs[b]} < T={cfgs[a]}")
        for a, b in zip(order, order[1:], strict=False)
    ]


def fit_power_law(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares line through ``(log10 x, log10 y)``: slope, intercept and r^2."""
    lx, ly = [math.log10(v) for v in x], [math.log10(v) for v in y]
    n = len(lx)
    mx, my = sum(lx) / n, sum(ly) / n
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    slope = sxy / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    ss_res = sum((b - (intercept + slope * a)) ** 2 for a, b in zip(lx, ly, strict=True))
    ss_tot = sum((b - my) ** 2 for b in ly)
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 0.0}


def _judge_e(res: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    pts = [
        (r["train_flops"], r["fid"]["mean"]) for a in s.values() for r in a["curve"] if r["train_flops"] > 0
    ]
    fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
    res.setdefault("fits", {})["fid_vs_flops"] = fit
    nll_pts = [
        (r["train_flops"], r["bpd"]["mean"]) for a in s.values() for r in a["curve"] if r["train_flops"] > 0
    ]
    res["fits"]["bpd_vs_flops"] = fit_power_law([p[0] for p in nll_pts], [p[1] for p in nll_pts])
    law = {
        "check": f"digit-FID ~ FLOPs^slope: slope {fit['slope']:.3f} < 0 with r^2 {fit['r2']:.2f} >= 0.8",
        "holds": fit["slope"] < 0 and fit["r2"] >= 0.8,
        "difference": fit["slope"],
        "se": None,
        "z": None,
    }
    big = max(s, key=lambda a: s[a]["params"] or 0)
    checks = [law]
    for other in s:
        if other != big:
            checks.append(
                compare(
                    s[big]["curve"][-1]["fid"],
                    s[other]["curve"][-1]["fid"],
                    f"final digit-FID: {big} < {other}",
                )
            )
            checks.append(
                compare(
                    s[big]["curve"][-1]["bpd"], s[other]["curve"][-1]["bpd"], f"final NLL: {big} < {other}"
                )
            )
    return checks


_JUDGES = {"a": _judge_a, "b": _judge_b, "c": _judge_c, "d": _judge_d, "e": _judge_e}


def judge(results: dict[str, Any]) -> dict[str, Any]:
    """The verdict of ``results`` (with its ``summary``) under its claim's rule (module docstring)."""
    claim = results["claim"]
    if claim not in _JUDGES:
        raise ValueError(f"no verdict rule for claim {claim!r}; rules exist for {sorted(_JUDGES)}")
    return _verdict(_JUDGES[claim](results, results["summary"]))
