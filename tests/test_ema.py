"""EMA warm-up: the decay schedule, how much of the initialisation an EMA still holds, and its use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from iddpm.ema import ema_decay, ema_init_weight
from iddpm.train import DistInfo, TrainConfig, make_train_state, resolve_unet_config, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_warmup_decay_is_min_of_rate_and_the_running_mean_rate() -> None:
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999
    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.9999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(0.99, 10**6, warmup=True) == 0.99  # reaches the rate and stays there
    with pytest.raises(ValueError, match="num_updates"):
        ema_decay(0.9, -1, warmup=True)


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9, 0.999, 0.9999])
@pytest.mark.parametrize("warmup", [False, True])
def test_init_weight_is_the_product_of_the_decays(rate: float, warmup: bool) -> None:
    for steps in (0, 1, 7, 150, 2500):
        prod = math.prod(ema_decay(rate, n, warmup) for n in range(steps))
        assert ema_init_weight(rate, steps, warmup) == pytest.approx(prod, rel=1e-9, abs=1e-300)


def test_the_readme_demo_numbers() -> None:
    # 500 steps at the paper's 0.9999: the plain EMA is still 95% initialisation, the warmed-up one ~0%
    assert ema_init_weight(0.9999, 500, warmup=False) == pytest.approx(0.9999**500)
    assert ema_init_weight(0.9999, 500, warmup=False) > 0.95
    assert ema_init_weight(0.9999, 500, warmup=True) < 1e-15


def test_train_step_applies_the_warmup_decay(tmp_path: Path) -> None:
    def state(warmup: bool):
        cfg = TrainConfig(
            preset="tiny",
            dataset="digits8",
            diffusion_steps=10,
            batch_size=4,
            steps=3,
            ema_rates=(0.999,),
            ema_warmup=warmup,
            out_dir=str(tmp_path),
            progress=False,
            device="cpu",
        )
        ucfg = resolve_unet_config(cfg, in_channels=1, num_classes=None)
        return make_train_state(cfg, ucfg, DistInfo(0, 0, 1, torch.device("cpu")))

    x = torch.rand(4, 1, 16, 16) * 2 - 1
    for warmup, decay in ((True, 0.1), (False, 0.999)):
        st = state(warmup)
        before = [p.detach().clone() for p in st.ema_params[0.999]]
        train_step(st, x)
        for e0, e1, p in zip(before, st.ema_params[0.999], st.params, strict=True):
            torch.testing.assert_close(e1, decay * e0 + (1 - decay) * p.detach())


def test_old_checkpoint_configs_read_as_plain_ema() -> None:
    from iddpm.train import _upgrade_config

    assert _upgrade_config({"diffusion_steps": 100})["ema_warmup"] is False
    assert _upgrade_config({"ema_warmup": True})["ema_warmup"] is True


def test_sample_warns_when_the_ema_is_barely_warmed_up(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from iddpm.cli import main

    common = [
        "--preset",
        "tiny",
        "--dataset",
        "digits8",
        "--diffusion-steps",
        "10",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--no-progress",
        "--sample-every",
        "0",
        "--device",
        "cpu",
    ]
    for name, extra in (("plain", []), ("warm", ["--ema-warmup"])):
        assert main(["train", *common, *extra, "--out-dir", str(tmp_path / name)]) == 0
    capsys.readouterr()
    sample = ["--num", "2", "--respacing", "5", "--no-progress", "--device", "cpu"]
    assert (
        main(["sample", str(tmp_path / "plain" / "latest.pt"), *sample, "--out", str(tmp_path / "p.png")])
        == 0
    )
    err = capsys.readouterr().err
    assert "still holds 100% of the random initial weights" in err and "--ema-warmup" in err
    assert (
        main(["sample", str(tmp_path / "warm" / "latest.pt"), *sample, "--out", str(tmp_path / "w.png")]) == 0
    )
    assert "warning" not in capsys.readouterr().err  # 3 warm-up steps: 1/10 * 2/11 * 3/12 = 0.5% left
    assert (
        main(
            [
                "sample",
                str(tmp_path / "plain" / "latest.pt"),
                *sample,
                "--no-ema",
                "--out",
                str(tmp_path / "r.png"),
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err
