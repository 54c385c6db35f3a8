"""The experiment runner: every experiment end to end at smoke scale, the verdict rules, the measurements."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from iddpm import experiment, measure, verdicts
from iddpm.experiment_cli import cmd_experiment  # noqa: F401  (the CLI module imports cleanly)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments"
NAMES = experiment.experiment_names(CONFIGS)


def test_every_claim_has_a_config_with_all_three_scales() -> None:
    assert [experiment.read_config(n, CONFIGS)["claim"] for n in NAMES] == ["a", "b", "c", "d", "e"]
    for n in NAMES:
        for scale in experiment.SCALES:
            spec = experiment.load_spec(n, scale, CONFIGS)
            assert spec.seeds and spec.arms
    with pytest.raises(ValueError, match="scale must be one of"):
        experiment.load_spec(NAMES[0], "huge", CONFIGS)
    with pytest.raises(FileNotFoundError, match="experiments in"):
        experiment.load_spec("z_nothing", "cpu", CONFIGS)


def test_runs_are_shared_between_experiments_and_keyed_by_config() -> None:
    a = experiment.load_spec("a_schedule", "cpu", CONFIGS)
    c = experiment.load_spec("c_importance_sampling", "cpu", CONFIGS)
    assert a.config("cosine", 1).out_dir == c.config("hybrid", 1).out_dir  # the same run, trained once
    assert a.config("cosine", 0).out_dir != a.config("cosine", 1).out_dir  # seeds are separate runs
    assert a.config("cosine", 0).out_dir != a.config("linear", 0).out_dir
    # where a run is written and how it is shown is not part of its identity
    fields = dict(a.arms["cosine"], seed=0)
    assert experiment.run_key(fields) == experiment.run_key({**fields, "progress": True, "log_every": 7})
    assert experiment.run_key(fields) != experiment.run_key({**fields, "lr": 1e-3})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every experiment at smoke scale, run once in a scratch working directory (runs/ and results/ there)."""
    work = tmp_path_factory.mktemp("experiments")
    old = os.getcwd()
    os.chdir(work)
    try:
        for name in NAMES:
            experiment.run_experiment(
                name, "smoke", config_dir=CONFIGS, results_dir="results", log=lambda m: None
            )
    finally:
        os.chdir(old)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_experiment_runs_end_to_end_at_smoke_scale(smoke: Path, name: str) -> None:
    res = experiment.load_results(name, smoke / "results", smoke=True)
    spec = experiment.load_spec(name, "smoke", CONFIGS)
    assert res["claim"] == spec.claim and res["scale"] == "smoke"
    assert set(res["arms"]) == set(spec.arms)
    assert res["verdict"]["verdict"] in ("reproduced", "partly", "not reproduced")
    assert len(res["verdict"]["checks"]) == res["verdict"]["of"] >= 1
    prov = res["provenance"]
    for key in ("config", "commit", "command", "seeds", "torch", "numpy", "device", "wall_s"):
        assert key in prov
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert prov["config"]["scale"] == "smoke"
    out = smoke / "results" / name / "smoke"
    assert list(out.glob("*.png")), "figures are drawn"
    for arm in spec.arms:
        rec = json.loads((out / "arms" / f"{arm}-s0.json").read_text())
        assert rec["arm"] == arm and rec["step"] == spec.config(arm, 0).total_steps
    every_number = [v for v in _numbers(res["arms"])]
    assert every_number and all(math.isfinite(v) or v == math.inf for v in every_number)


def _numbers(x: object) -> list[float]:
    if isinstance(x, dict):
        return [v for item in x.values() for v in _numbers(item)]
    if isinstance(x, list):
        return [v for item in x for v in _numbers(item)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_measurements(smoke: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a finished run or measurement was redone")

    monkeypatch.chdir(smoke)
    monkeypatch.setattr(experiment, "measure_arm", boom)
    monkeypatch.setattr("iddpm.train.train", boom)
    res = experiment.run_experiment("d_diffusion_steps", "smoke", config_dir=CONFIGS, log=lambda m: None)
    assert res["verdict"]["of"] == 2


@pytest.mark.slow
def test_report_redraws_figures_from_the_json_alone(smoke: Path) -> None:
    from iddpm.cli import main

    out = smoke / "results" / "b_sampling_steps" / "smoke"
    for p in out.glob("*.png"):
        p.unlink()
    rc = main(
        [
            "experiment",
            "report",
            "b_sampling_steps",
            "--smoke",
            "--results-dir",
            str(smoke / "results"),
            "--config-dir",
            str(CONFIGS),
        ]
    )
    assert rc == 0 and (out / "quality_vs_steps.png").is_file() and (out / "nll.png").is_file()


@pytest.mark.slow
def test_smoke_exports_pretrained_files_that_load(smoke: Path) -> None:
    from iddpm.model_zoo import available, pretrained

    out = smoke / "results" / "b_sampling_steps" / "smoke"
    assert available(out) == ["digits8-hybrid", "digits8-simple"]
    p = pretrained("digits8-hybrid", directory=out)
    assert p.info["experiment"] == "b_sampling_steps" and p.info["arm"] == "hybrid"
    x = torch.zeros(2, p.unet_config.in_channels, p.unet_config.image_size, p.unet_config.image_size)
    assert p.model(x, torch.zeros(2, dtype=torch.long)).shape[1] == 2 * p.unet_config.in_channels
    with pytest.raises(FileNotFoundError, match="available"):
        pretrained("nope", directory=out)


# ------------------------------------------------------------------------------------------ measurements


def test_noise_scale_matches_its_definition_on_gaussian_gradients() -> None:
    # per-example gradients g_i ~ N(G, diag(s^2)): B_simple = tr(Sigma) / |G|^2 = sum(s^2) / |G|^2
    gen = torch.Generator().manual_seed(0)
    G = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    s = torch.tensor([3.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    grads = G + s * torch.randn(200_000, 4, generator=gen, dtype=torch.float64)
    r = measure.noise_scale(grads)
    assert r["b_simple"] == pytest.approx(float(s.square().sum() / G.square().sum()), rel=0.03)
    assert r["grad_sq"] == pytest.approx(float(G.square().sum()), rel=0.03)
    assert r["trace_sigma"] == pytest.approx(float(s.square().sum()), rel=0.01)
    # no signal at all: |G|^2 is estimated <= 0 about half the time; then B is inf, never negative
    assert measure.noise_scale(torch.randn(64, 3, generator=gen))["b_simple"] > 0
    with pytest.raises(ValueError, match="n >= 2"):
        measure.noise_scale(torch.zeros(1, 3))


def test_generate_skips_the_noisiest_steps_then_respaces(monkeypatch: pytest.MonkeyPatch) -> None:
    from iddpm.train import TrainConfig

    seen = {}

    def fake_sample(model, s, shape, **kw):  # noqa: ANN001, ANN202
        seen["timesteps"] = s.timesteps.tolist()
        return torch.zeros(shape)

    monkeypatch.setattr(measure, "sample", fake_sample)
    cfg = TrainConfig(preset="tiny", dataset="digits8", diffusion_steps=100, steps=1)
    gen = torch.Generator().manual_seed(0)
    out = measure.generate(None, cfg, 3, (1, 8, 8), steps=10, generator=gen, skip=0.2)  # type: ignore[arg-type]
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.uint8
    assert len(seen["timesteps"]) == 10 and seen["timesteps"][-1] == 79 and seen["timesteps"][0] == 0
    measure.generate(None, cfg, 1, (1, 8, 8), steps=None, generator=gen, skip=0.5)  # type: ignore[arg-type]
    assert seen["timesteps"] == list(range(50))
    with pytest.raises(ValueError, match="skip must be in"):
        measure.generate(None, cfg, 1, (1, 8, 8), steps=None, generator=gen, skip=1.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- verdicts


def _stat(*vals: float) -> dict:
    return verdicts._mean_se(list(vals))


def test_compare_needs_twice_the_standard_error() -> None:
    assert verdicts.compare(_stat(1.0, 1.1, 0.9), _stat(2.0, 2.1, 1.9), "x")["holds"]
    assert not verdicts.compare(_stat(1.0, 1.5, 0.5), _stat(1.2, 1.7, 0.7), "x")["holds"]  # overlapping
    assert not verdicts.compare(_stat(2.0, 2.1, 1.9), _stat(1.0, 1.1, 0.9), "x")["holds"]  # wrong direction


def test_power_law_fit_recovers_the_exponent() -> None:
    xs = [1e9, 1e10, 1e11, 1e12]
    fit = verdicts.fit_power_law(xs, [3.0 * x**-0.5 for x in xs])
    assert fit["slope"] == pytest.approx(-0.5) and fit["r2"] == pytest.approx(1.0)


def _results_a(nll_lin: list[float], nll_cos: list[float], cost_lin: float, cost_cos: float) -> dict:
    def arm(nlls: list[float], cost: float) -> dict:
        return {
            str(i): {
                "nll": {"bpd": v, "bpd_se": 0.01},
                "skip": [
                    {"skip": 0.0, "fid": 10.0, "precision": 1, "recall": 1},
                    {"skip": 0.2, "fid": 10.0 + cost + 0.1 * i, "precision": 1, "recall": 1},
                ],
            }
            for i, v in enumerate(nlls)
        }

    res = {"claim": "a", "arms": {"linear": arm(nll_lin, cost_lin), "cosine": arm(nll_cos, cost_cos)}}
    res["summary"] = verdicts.summarize(res)
    return res


def test_claim_a_verdicts_follow_the_rule() -> None:
    good = verdicts.judge(_results_a([2.0, 2.1, 2.05], [1.5, 1.55, 1.6], cost_lin=1.0, cost_cos=20.0))
    assert good["verdict"] == "reproduced" and good["held"] == 2
    half = verdicts.judge(_results_a([2.0, 2.1, 2.05], [1.5, 1.55, 1.6], cost_lin=20.0, cost_cos=1.0))
    assert half["verdict"] == "partly"
    none = verdicts.judge(_results_a([1.5, 1.55, 1.6], [2.0, 2.1, 2.05], cost_lin=20.0, cost_cos=1.0))
    assert none["verdict"] == "not reproduced" and none["held"] == 0
    with pytest.raises(ValueError, match="no verdict rule"):
        verdicts.judge({"claim": "z", "summary": {}, "arms": {}})


# ------------------------------------------------------------------------------------ committed results


def test_committed_pretrained_models_load_offline_and_are_small() -> None:
    from iddpm import pretrained
    from iddpm.model_zoo import CHECKPOINT_DIR, available

    names = available()
    assert {"digits8-hybrid", "digits8-simple"} <= set(names)
    sizes = {n: (CHECKPOINT_DIR / f"{n}.pt").stat().st_size for n in names}
    assert max(sizes.values()) <= 5e6 and sum(sizes.values()) <= 30e6, sizes
    for n in names:
        p = pretrained(n)
        assert p.info["command"].startswith("python -m iddpm experiment run") and len(p.info["commit"]) == 40
        x = torch.zeros(1, p.unet_config.in_channels, p.unet_config.image_size, p.unet_config.image_size)
        out = p.model(
            x, p.schedule.model_timesteps(torch.zeros(1, dtype=torch.long), p.config.rescale_timesteps)
        )
        assert out.shape[2:] == x.shape[2:] and p.schedule.num_steps == p.config.diffusion_steps


@pytest.mark.parametrize("name", NAMES)
def test_committed_cpu_results_carry_verdicts_and_provenance(name: str) -> None:
    res = experiment.load_results(name, REPO / "results")
    assert res["scale"] == "cpu" and res["claim"] == experiment.read_config(name, CONFIGS)["claim"]
    assert res["verdict"]["verdict"] in ("reproduced", "partly", "not reproduced")
    prov = res["provenance"]
    assert (
        len(prov["commit"]) == 40 and prov["command"] == f"python -m iddpm experiment run {name} --scale cpu"
    )
    spec = experiment.load_spec(name, "cpu", CONFIGS)
    assert prov["seeds"] == spec.seeds and sorted(res["arms"]) == sorted(spec.arms)
    assert all(len(res["arms"][a]) == len(spec.seeds) for a in spec.arms)
    assert list((REPO / "results" / name).glob("*.png")) and (REPO / "results" / name / "README.md").is_file()


def test_a_run_stopped_before_its_first_checkpoint_is_started_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = experiment.load_spec("d_diffusion_steps", "smoke", CONFIGS)
    cfg = spec.config("T25", 0)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a crash after the first log record
    info = experiment.train_run(cfg)
    assert info["finished"] and (out / "latest.pt").is_file()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"step": 1, "loss": 1.0} not in logged and logged[-1]["step"] == cfg.total_steps


def test_compare_with_an_unbounded_value_needs_complete_separation() -> None:
    hi = _stat(math.inf, 5.0, 6.0)
    assert math.isnan(hi["se"])
    c = verdicts.compare(_stat(1.0, 2.0, 1.5), hi, "x")
    assert c["holds"] and c["se"] is None and "separated" in c["check"]
    assert not verdicts.compare(_stat(1.0, 7.0, 1.5), hi, "x")["holds"]  # 7 > 5: the seeds overlap
    assert not verdicts.compare(hi, _stat(1.0, 2.0, 1.5), "x")["holds"]
