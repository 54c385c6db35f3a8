"""Training loop: config validation, exact microbatching, numerics of the fast path, overfitting, exact
resume, NaN handling, Ctrl-C, config mismatch (torchrun runs: test_distributed.py)."""

import json
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_train_config  # tests/ is on sys.path (pytest's prepend import mode)

from iddpm import checkpoint as ck
from iddpm.ema import ema_update
from iddpm.train import (
    DistInfo,
    NonFiniteLossError,
    TrainConfig,
    load_model,
    lr_at,
    make_train_state,
    resolve_unet_config,
    train,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp_path: Path, **kw) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"steps": 6, **kw})


def make_state(cfg: TrainConfig):
    ucfg = resolve_unet_config(cfg, in_channels=1, num_classes=10)
    return make_train_state(cfg, ucfg, DistInfo(0, 0, 1, CPU))


class FixedSampler:
    """Hands out a fixed t sequence in order (so chunked and whole-batch draws agree), weights 1."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.pos = t, 0

    def sample(self, n, device, generator=None):
        t = self.t[self.pos : self.pos + n]
        self.pos += n
        return t.to(device), torch.ones(n, device=device)

    def update(self, t, losses):
        pass


def batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(preset="huge"), "unknown preset"),
        (dict(dataset="imagenet"), "unknown dataset"),
        (dict(steps=0, lr_anneal_steps=0), "must have an end"),
        (dict(microbatch=0), "microbatch"),
        (dict(loss_type="simple"), "learned variance"),
        (dict(loss_type="nope"), "loss_type"),
        (dict(ema_rates=(1.5,)), "EMA rate"),
        (dict(model_overrides={"widht": 3}), "widht"),
        (dict(compile="yes"), "compile must be None"),
        (dict(compile_mode="fast"), "compile_mode='fast' is not one of"),
        (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
        (dict(lr=float("nan")), "lr must be a finite number > 0"),
        (dict(vlb_weight=float("nan")), "vlb_weight must be a finite number >= 0, got nan"),
        (dict(vlb_weight=float("inf")), "vlb_weight must be a finite number >= 0"),
        (dict(vlb_weight=-1e-3), "vlb_weight must be a finite number >= 0"),
        (dict(weight_decay=float("inf")), "weight_decay must be a finite number"),
        (dict(image_size=0), "image_size must be a positive int"),
    ],
)
def test_config_errors_say_what_is_allowed(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_compile_defaults_to_auto_and_stays_off_on_cpu():
    cfg = TrainConfig(preset="tiny", dataset="digits8", steps=10**6)
    assert cfg.compile is None and cfg.compile_mode == "reduce-overhead"
    st = make_train_state(cfg, resolve_unet_config(cfg, 1, None), DistInfo(0, 0, 1, torch.device("cpu")))
    assert st.compiled is False and st.step_model is st.model


def test_model_config_follows_data_and_variance():
    ucfg = resolve_unet_config(TrainConfig(preset="tiny", var_type="fixed_small", loss_type="simple"), 1, 10)
    assert ucfg.in_channels == 1 and not ucfg.learn_sigma and ucfg.num_classes is None
    ucfg = resolve_unet_config(TrainConfig(preset="tiny", class_cond=True, image_size=8), 3, 10)
    assert ucfg.learn_sigma and ucfg.num_classes == 10 and ucfg.image_size == 8
    with pytest.raises(ValueError, match="has no labels"):
        resolve_unet_config(TrainConfig(preset="tiny", class_cond=True), 3, None)
    with pytest.raises(ValueError, match="class-conditional: set class_cond"):
        resolve_unet_config(TrainConfig(preset="mnist-cond"), 1, 10)
    # Overrides of what the data decides are refused instead of failing (or silently winning) later.
    with pytest.raises(
        ValueError, match=r"in_channels=3 contradicts the data: dataset 'digits8' has 1 channel"
    ):
        resolve_unet_config(
            TrainConfig(preset="tiny", dataset="digits8", model_overrides={"in_channels": 3}), 1, 10
        )
    with pytest.raises(ValueError, match="learn_sigma=False contradicts the data: var_type='learned_range'"):
        resolve_unet_config(TrainConfig(preset="tiny", model_overrides={"learn_sigma": False}), 1, 10)
    assert (
        resolve_unet_config(TrainConfig(preset="tiny", model_overrides={"in_channels": 1}), 1, 10).in_channels
        == 1
    )


def test_total_steps_and_lr_anneal():
    cfg = TrainConfig(steps=0, lr_anneal_steps=100, lr=1e-3)
    assert cfg.total_steps == 100
    assert lr_at(cfg, 0) == 1e-3 and lr_at(cfg, 50) == pytest.approx(5e-4) and lr_at(cfg, 100) == 0.0
    assert TrainConfig(steps=30, lr_anneal_steps=100).total_steps == 30
    assert lr_at(TrainConfig(steps=5), 4) == 1e-4


def test_foreach_ema_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    ema = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema, params, strict=True)]
    ema_update(ema, params, 0.9)
    for a, b in zip(ema, expected, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- numerics


def _perturbed_state(cfg: TrainConfig):
    st = make_state(cfg)
    # Move off the initialisation: its zero output layer makes every loss independent of precision and layout.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in st.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return st


def _one_step(cfg: TrainConfig, x: torch.Tensor, t: torch.Tensor):
    st = _perturbed_state(cfg)
    st.sampler = FixedSampler(t)
    out = train_step(st, x, torch.zeros(x.shape[0], dtype=torch.long))
    grads = [p.grad.detach().clone() for p in st.model.parameters()]
    return out, grads, st


def test_microbatches_give_the_full_batch_gradient(tmp_path):
    x, t = batch(), torch.tensor([0, 5, 11, 19])
    full, g_full, _ = _one_step(tiny_cfg(tmp_path), x, t)
    micro, g_micro, _ = _one_step(tiny_cfg(tmp_path, microbatch=2), x, t)
    torch.testing.assert_close(micro.losses["loss"], full.losses["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_micro, g_full, strict=True):
        # The authors sum microbatch means, which would make these differ by a factor of 2.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_optimized_path_matches_plain_fp32(tmp_path):
    """channels_last + foreach EMA/AdamW + microbatching == the plain path; bf16 within bf16 noise."""
    x, t = batch(), torch.tensor([1, 7, 13, 18])
    plain_cfg = tiny_cfg(tmp_path, channels_last=False)
    plain, g_plain, st_plain = _one_step(plain_cfg, x, t)
    fast, g_fast, st_fast = _one_step(tiny_cfg(tmp_path, channels_last=True, microbatch=2), x, t)
    for k in plain.losses:
        torch.testing.assert_close(fast.losses[k], plain.losses[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # The foreach AdamW step and foreach EMA equal a per-parameter loop applied to the same gradients.
    ref = _perturbed_state(plain_cfg)
    ema0 = [e.clone() for e in ref.ema_params[plain_cfg.ema_rates[0]]]
    for p, g in zip(ref.params, g_fast, strict=True):
        p.grad = g.clone()
    torch.optim.AdamW(ref.params, lr=plain_cfg.lr, weight_decay=0.0, foreach=False).step()
    rate = plain_cfg.ema_rates[0]
    for new, expected, e0, e in zip(st_fast.params, ref.params, ema0, st_fast.ema_params[rate], strict=True):
        torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(e, rate * e0 + (1 - rate) * expected, rtol=1e-6, atol=1e-8)

    bf16, _, _ = _one_step(tiny_cfg(tmp_path, precision="bf16", channels_last=True), x, t)
    for k in plain.losses:
        assert not torch.equal(bf16.losses[k], plain.losses[k])  # bf16 really ran
        torch.testing.assert_close(bf16.losses[k], plain.losses[k], rtol=5e-2, atol=2e-2)

    # Sampling from the channels_last model gives the plain model's images.
    from iddpm.respace import respace, space_timesteps
    from iddpm.sampling import sample

    fast_s = respace(st_plain.schedule, space_timesteps(20, "4"))
    imgs = []
    for st in (st_plain, st_fast):
        g = torch.Generator().manual_seed(3)
        imgs.append(sample(st.model.eval(), fast_s, (2, 1, 16, 16), generator=g, device=CPU))
    torch.testing.assert_close(imgs[1], imgs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, lr=2e-3, steps=200)
    st = make_state(cfg)
    x = batch(seed=1)
    losses = []
    for _ in range(40):
        # Same t and noise every step: the model can memorise this one (x_t, t) -> eps mapping.
        st.gen_t.manual_seed(0)
        st.gen_noise.manual_seed(0)
        out = train_step(st, x, torch.zeros(4, dtype=torch.long))
        losses.append(out.losses["mse"].mean().item())
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.05 * start, (start, end)  # ~1.0 -> ~0.005 in practice


# ----------------------------------------------------------------------------------------------- the loop


def _record(store: dict):
    def cb(step, out):
        store[step] = out.losses["loss"].clone()

    return cb


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = dict(schedule_sampler="loss-second-moment", microbatch=2, ema_rates=(0.99, 0.5))
    whole: dict = {}
    train(tiny_cfg(tmp_path / "a", steps=6, **common), callback=_record(whole))
    parts: dict = {}
    r1 = train(tiny_cfg(tmp_path / "b", steps=3, **common), callback=_record(parts))
    assert r1.step == 3 and r1.checkpoint.name == "ckpt_0000003.pt"
    r2 = train(tiny_cfg(tmp_path / "b", steps=6, **common), resume="auto", callback=_record(parts))
    assert r2.step == 6 and sorted(parts) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert torch.equal(parts[step], whole[step]), f"step {step} differs after resume"
    a = ck.safe_load(tmp_path / "a" / "latest.pt")
    b = ck.safe_load(tmp_path / "b" / "latest.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
        assert torch.equal(a["ema"]["0.5"][k], b["ema"]["0.5"][k])
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["exact"] for r in log)
    rec = [r for r in log if "loss" in r][-1]
    assert {"loss", "mse", "vlb", "lr", "step_time_s", "samples_per_s"} <= set(rec)
    assert any(k.startswith("loss_q") for k in rec)

    # A different (non-harmless) config is refused, naming the fields.
    with pytest.raises(ck.CheckpointError, match=r"\['schedule', 'vlb_weight'\]"):
        train(tiny_cfg(tmp_path / "b", steps=8, schedule="linear", vlb_weight=0.01, **common), resume="auto")

    # The EMA weights load for sampling.
    model, cfg, ucfg, step = load_model(tmp_path / "b" / "latest.pt", rate=0.99)
    assert step == 6 and ucfg.in_channels == 1 and not model.training


def _poison_after(monkeypatch, at_step: int) -> None:
    """Make the parameters NaN right after step ``at_step`` (as a diverging run would)."""
    import iddpm.train as tr

    real = tr.train_step

    def poisoned(st, x, y=None):
        out = real(st, x, y)
        if st.step == at_step:
            with torch.no_grad():
                st.params[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(tr, "train_step", poisoned)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _poison_after(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError, match="'loss'.*step 4") as err:
        train(tiny_cfg(tmp_path, steps=10, save_every=2, log_every=100))
    assert err.value.step == 4 and err.value.checkpoint.name == "ckpt_0000002.pt"
    assert ck.safe_load(tmp_path / "latest.pt")["step"] == 2
    assert not (tmp_path / "ckpt_0000004.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    _poison_after(monkeypatch, 2)  # the loss of step 2 was still finite; the weights after it are not
    with pytest.raises(NonFiniteLossError, match="'parameters'.*step 2.*no checkpoint"):
        train(tiny_cfg(tmp_path, steps=10, save_every=2, log_every=100))
    assert not list(tmp_path.glob("*.pt"))


def test_ctrl_c_saves_and_resume_finishes(tmp_path):
    def interrupt(step, out):
        if step == 2:
            raise KeyboardInterrupt

    cfg = tiny_cfg(tmp_path, steps=4)
    r = train(cfg, callback=interrupt)
    assert r.interrupted and r.step == 2
    assert ck.safe_load(tmp_path / "latest.pt")["step"] == 2
    r = train(cfg, resume="auto")
    assert not r.interrupted and r.step == 4


def test_grad_scaler_branch_takes_the_same_step(tmp_path):
    """The fp16 path's GradScaler (exercised here in fp32 on CPU) scales by 2^k and unscales exactly."""
    x, t = batch(), torch.tensor([2, 4, 8, 16])
    _, _, plain = _one_step(tiny_cfg(tmp_path), x, t)
    st = _perturbed_state(tiny_cfg(tmp_path))
    st.sampler = FixedSampler(t)
    st.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train_step(st, x, torch.zeros(4, dtype=torch.long))
    assert st.scaler.get_scale() == 2.0**10  # finite grads: no back-off
    for a, b in zip(st.params, plain.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_default_sample_respacing_is_at_most_100_steps(tmp_path):
    assert TrainConfig().sample_respacing is None and TrainConfig().sample_spacing == "100"  # T = 4000
    assert tiny_cfg(tmp_path, diffusion_steps=50).sample_spacing == "50"
    assert tiny_cfg(tmp_path, diffusion_steps=50, sample_respacing="").sample_spacing == ""
    # An explicit spacing that does not fit T is refused up front, not after training at the first grid.
    with pytest.raises(ValueError, match=r"sample_respacing='100' does not fit diffusion_steps=50"):
        tiny_cfg(tmp_path, diffusion_steps=50, sample_respacing="100")
    with pytest.raises(ValueError, match="sample_respacing='ddim0'"):
        tiny_cfg(tmp_path, sample_respacing="ddim0")
    # Checkpoints saved with the former default "100" at T < 100 still load.
    from iddpm.train import config_from_checkpoint

    old = {"config": {**tiny_cfg(tmp_path, diffusion_steps=50).__dict__, "sample_respacing": "100"}}
    assert config_from_checkpoint(old).sample_spacing == "50"


def test_small_T_run_writes_its_sample_grid(tmp_path):
    # T = 20 < 100 with the default sample_respacing: used to fail with "cannot keep 100 of them".
    r = train(tiny_cfg(tmp_path, steps=1, sample_every=1, sample_num=2))
    assert r.step == 1 and (tmp_path / "samples_0000001.png").is_file()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    assert TrainConfig().keep_last == 3
    with pytest.raises(ValueError, match="keep_last"):
        tiny_cfg(tmp_path, keep_last=-1)
    r = train(tiny_cfg(tmp_path / "a", steps=5, save_every=1, keep_last=2, log_every=100))
    assert sorted(p.name for p in (tmp_path / "a").glob("ckpt_*.pt")) == [
        "ckpt_0000004.pt",
        "ckpt_0000005.pt",
    ]
    assert r.checkpoint.name == "ckpt_0000005.pt" and ck.safe_load(tmp_path / "a" / "latest.pt")["step"] == 5
    train(tiny_cfg(tmp_path / "b", steps=3, save_every=1, keep_last=0, log_every=100))
    assert len(list((tmp_path / "b").glob("ckpt_*.pt"))) == 3  # 0 keeps all


def test_resume_past_the_requested_steps_says_so(tmp_path, capsys):
    train(tiny_cfg(tmp_path, steps=2))
    capsys.readouterr()
    r = train(tiny_cfg(tmp_path, steps=1, sample_every=1, sample_num=2), resume="auto")
    assert r.step == 2 and not r.interrupted
    out = capsys.readouterr().out
    assert "already at step 2 >= the requested 1 steps" in out and "--steps" in out
    assert not list(tmp_path.glob("samples_*.png"))  # nothing trained: no new grid either


def test_train_accepts_a_preloaded_checkpoint(tmp_path, monkeypatch):
    train(tiny_cfg(tmp_path, steps=2))
    loaded = ck.safe_load(tmp_path / "latest.pt")
    calls = []
    monkeypatch.setattr(ck, "safe_load", lambda *a, **k: calls.append(a))
    r = train(tiny_cfg(tmp_path, steps=3), resume=tmp_path / "latest.pt", checkpoint=loaded)
    assert r.step == 3 and calls == []  # not read a second time
    with pytest.raises(ck.CheckpointError, match=r"\['vlb_weight'\]"):  # still checked against the config
        train(tiny_cfg(tmp_path, steps=4, vlb_weight=1.0), resume=tmp_path / "latest.pt", checkpoint=loaded)


def test_rank_seeds_are_distinct_and_stable():
    from iddpm.train import rank_seed

    seeds = [rank_seed(s, r, p) for s in range(4) for r in range(16) for p in ("t", "noise", "dropout")]
    assert len(set(seeds)) == len(seeds)
    # The old seed * 7919 + 2 * rank + k scheme gave rank 0's dropout seed to rank 1's t draws.
    assert rank_seed(0, 0, "dropout") != rank_seed(0, 1, "t")
    assert rank_seed(5, 3, "noise") == rank_seed(5, 3, "noise") and 0 <= rank_seed(5, 3, "noise") < 2**64
    st0 = make_state(tiny_cfg(Path("unused")))
    # Rank 1 (world_size 1 here, so no DDP wrapper or process group is needed to build the state).
    st1 = make_train_state(tiny_cfg(Path("unused")), st0.unet_cfg, DistInfo(1, 1, 1, CPU))
    assert st0.gen_t.initial_seed() == rank_seed(0, 0, "t") != st1.gen_t.initial_seed()
    with pytest.raises(ValueError, match="purpose"):
        rank_seed(0, 0, "data")


@pytest.mark.parametrize(
    ("key", "what"),
    [("model", "the model weights"), ("ema", "the EMA weights"), ("opt", "the optimizer state"),
     ("data", "the data order"), ("sampler", "the timestep sampler state"), ("step", "the step count")],
)  # fmt: skip
def test_a_checkpoint_missing_a_part_is_named(tmp_path, key, what):
    train(tiny_cfg(tmp_path, steps=1))
    saved = ck.safe_load(tmp_path / "latest.pt")
    del saved[key]
    cut = tmp_path / "cut.pt"
    ck.atomic_save(saved, cut)
    with pytest.raises(
        ck.CheckpointError, match=rf"cut\.pt cannot be resumed: it is missing '{key}' \({what}\)"
    ):
        train(tiny_cfg(tmp_path, steps=2), resume=cut)
    if key in ("model", "ema", "step"):
        with pytest.raises(ck.CheckpointError, match=rf"cannot be loaded: it is missing '{key}'"):
            load_model(cut, use_ema=key != "model")


def test_a_checkpoint_without_rng_resumes_with_a_warning(tmp_path, capsys):
    train(tiny_cfg(tmp_path, steps=1))
    saved = ck.safe_load(tmp_path / "latest.pt")
    del saved["rng"]
    ck.atomic_save(saved, tmp_path / "latest.pt")
    capsys.readouterr()
    r = train(tiny_cfg(tmp_path, steps=2), resume="auto")
    assert r.step == 2
    assert "has no RNG state" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["exact"] for r in log if r.get("event") == "resume"] == [False]
