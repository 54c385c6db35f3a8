"""``python -m iddpm``: flags from TrainConfig, clear errors, and train -> sample -> nll end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm.cli import build_parser, config_from_args, main
from iddpm.data import read_png

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flags_are_built_from_the_config_fields():
    ns = build_parser().parse_args(
        ["train", "--preset", "tiny", "--dataset", "digits8", "--batch-size", "16",
         "--ema-rates", "0.999", "0.9",
         "--model", "dropout=0.1", "channel_mult=(1,2)", "--channels-last", "false", "--no-progress",
         "--lr-anneal-steps", "50", "--steps", "0"]
    )  # fmt: skip
    cfg = config_from_args(ns)
    assert cfg.batch_size == 16 and cfg.ema_rates == (0.999, 0.9) and cfg.channels_last is False
    assert cfg.model_overrides == {"dropout": 0.1, "channel_mult": (1, 2)}
    assert cfg.progress is False and cfg.total_steps == 50 and cfg.lr == 1e-4  # untouched default
    # Only the flags given override a base config (a checkpoint's, when resuming).
    cfg2 = config_from_args(build_parser().parse_args(["train", "--steps", "9"]), base=dict(vars(cfg)))
    assert cfg2.steps == 9 and cfg2.batch_size == 16 and cfg2.ema_rates == (0.999, 0.9)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "--preset", "giant"], "invalid choice: 'giant'"),
        (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["train", "--batch-size", "many"], "invalid int value"),
        (["train", "--no-such-flag"], "unrecognized arguments"),
        (["bench", "--preset", "giant"], "invalid choice"),
        (["sample"], "the following arguments are required: checkpoint"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_bad_values_give_one_line_errors(tmp_path, capsys):
    assert main(["train", "--steps", "0", "--lr-anneal-steps", "0", "--out-dir", str(tmp_path)]) == 2
    assert "must have an end" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cifar10_param_count_via_bench_cli(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["bench", "--preset", "cifar10", "--params-only", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["params"] == 52_546_438  # the authors' CIFAR-10 model (spec §13)
    assert "52,546,438" in capsys.readouterr().out


@pytest.mark.slow
def test_train_sample_nll_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--dataset", "digits8", "--diffusion-steps", "20", "--batch-size", "8",
              "--log-every", "2", "--save-every", "2", "--sample-every", "3", "--sample-num", "4",
              "--sample-respacing", "5", "--out-dir", str(run), "--no-progress",
              "--device", "cpu"]  # fmt: skip
    assert main(["train", *common, "--steps", "3"]) == 0
    assert (run / "samples_0000003.png").is_file() and (run / "ckpt_0000002.pt").is_file()
    # --resume auto continues from latest.pt; only the flags given change the stored config.
    assert main(["train", "--resume", "auto", "--out-dir", str(run), "--steps", "4", "--no-progress"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 3, 4]
    # Changing a real setting on resume is refused with the field's name.
    again = ["train", "--resume", "auto", "--out-dir", str(run)]
    assert main([*again, "--steps", "6", "--vlb-weight", "1"]) == 2
    assert "['vlb_weight']" in capsys.readouterr().err
    # The optimiser settings may change (what the NaN stop advises): applied, and recorded in the log.
    assert main(["train", "--resume", "auto", "--out-dir", str(run), "--steps", "5", "--lr", "5e-5",
                 "--weight-decay", "0.01", "--no-progress"]) == 0  # fmt: skip
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("event") == "config_change"] == [
        {"event": "config_change", "step": 4,
         "changes": {"lr": {"from": 1e-4, "to": 5e-5}, "weight_decay": {"from": 0.0, "to": 0.01}}}
    ]  # fmt: skip
    assert [r["lr"] for r in log if "loss" in r] == [1e-4, 1e-4, 1e-4, 5e-5]
    saved = torch.load(run / "latest.pt", weights_only=True)
    assert saved["config"]["lr"] == 5e-5 and saved["opt"]["param_groups"][0]["weight_decay"] == 0.01

    png = tmp_path / "s.png"
    ckpt = str(run / "latest.pt")
    assert main(["sample", ckpt, "--num", "3", "--batch", "2", "--respacing", "5", "--out", str(png),
                 "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    arr = np.load(png.with_suffix(".npz"))["arr_0"]
    assert arr.shape == (3, 16, 16, 1) and arr.dtype == np.uint8
    assert read_png(png).shape[-1] == 1
    assert main(["sample", ckpt, "--num", "2", "--respacing", "ddim4", "--ddim", "--no-ema", "--out",
                 str(tmp_path / "d.png"), "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    assert (
        main(["sample", ckpt, "--num", "2", "--class-labels", "1,2", "--out", str(tmp_path / "e.png")]) == 2
    )

    nll_json = tmp_path / "nll.json"
    assert main(["nll", ckpt, "--num", "3", "--batch", "2", "--respacing", "5", "--json", str(nll_json),
                 "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    res = json.loads(nll_json.read_text())
    assert res["num"] == 3 and res["num_steps"] == 5 and len(res["terms_bpd"]) == 5
    assert np.isfinite(res["bpd"]) and res["bpd"] > res["prior_bpd"] >= 0
    assert "bits/dim" in capsys.readouterr().out


def start_until_logged(cmd: list[str], env: dict[str, str], log: Path, lines: int = 2) -> subprocess.Popen:
    """Start a training command and wait (at most 120 s) until its log.jsonl holds `lines` records."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stderr.read() if proc.poll() else "slow"
        )
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "iddpm", "train", "--preset", "tiny", "--dataset", "digits8",
           "--diffusion-steps", "20", "--batch-size", "4", "--steps", "100000", "--log-every", "1",
           "--save-every", "0", "--sample-every", "0", "--out-dir", str(tmp_path), "--no-progress",
           "--device", "cpu"]  # fmt: skip
    proc = start_until_logged(cmd, env, tmp_path / "log.jsonl")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]  # 128 + SIGINT, after saving
    assert "interrupted at step" in out
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert saved["step"] >= 2 and f"interrupted at step {saved['step']}" in out


def test_sample_and_nll_flags():
    ns = build_parser().parse_args(["sample", "c.pt"])
    assert ns.precision == "auto" and ns.compile is False and ns.respacing is None
    assert build_parser().parse_args(["sample", "c.pt", "--compile"]).compile is True
    assert build_parser().parse_args(["sample", "c.pt"]).compile_mode == "reduce-overhead"
    ns = build_parser().parse_args(["train", "--compile", "auto", "--compile-mode", "default"])
    assert ns.compile is None and ns.compile_mode == "default"
    assert build_parser().parse_args(["nll", "c.pt", "--ema-rate", "0.99"]).ema_rate == 0.99
    assert build_parser().parse_args(["train", "--keep-last", "0"]).keep_last == 0


def test_sample_argument_errors_come_before_loading(tmp_path, capsys, monkeypatch):
    missing = str(
        tmp_path / "missing.pt"
    )  # were the checkpoint read first, the error would be "no checkpoint"
    assert main(["sample", missing, "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err
    assert main(["sample", missing, "--eta", "0.5"]) == 2
    assert "--ddim" in capsys.readouterr().err
    assert main(["sample", missing, "--ddim", "--eta", "-1"]) == 2
    assert "--eta must be >= 0" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", missing, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "'cuda'" in err and "not available" in err and "available here: cpu" in err


def test_non_checkpoint_is_refused_in_our_words(tmp_path, capsys):
    png = tmp_path / "demo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert main(["sample", str(png), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a valid iddpm checkpoint" in err and "Re-running" not in err


def test_missing_dataset_message_names_the_cli_flags(tmp_path, capsys):
    argv = ["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--steps", "1", "--device", "cpu",
            "--out-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "--data-root" in err and "download=True" in err


def test_interrupted_train_exits_130(tmp_path, monkeypatch, capsys):
    import iddpm.train as tr

    monkeypatch.setattr(tr, "train", lambda cfg, **kw: tr.TrainResult(2, tmp_path / "latest.pt", True, {}))
    assert main(["train", "--out-dir", str(tmp_path), "--no-progress"]) == 130
    assert "interrupted at step 2" in capsys.readouterr().out


def test_small_T_train_sample_and_resume_read_once(tmp_path, capsys, monkeypatch):
    # T = 20 < 100 with the default sample respacing (was: "cannot keep 100 of them").
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "digits8", "--diffusion-steps", "20",
            "--batch-size", "4", "--steps", "1", "--sample-every", "1", "--sample-num", "2",
            "--out-dir", str(run), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (run / "samples_0000001.png").is_file()
    png = tmp_path / "s"  # no suffix: .png is added
    assert main(["sample", str(run / "latest.pt"), "--num", "1", "--out", str(png), "--no-progress",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert "20 ancestral steps" in capsys.readouterr().out and png.with_suffix(".png").is_file()
    # Resuming reads the checkpoint once (its config and its state), and says when there is nothing to do.
    from iddpm import checkpoint as ckpt_io

    real, calls = ckpt_io.safe_load, []
    monkeypatch.setattr(ckpt_io, "safe_load", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["train", "--resume", "auto", "--out-dir", str(run), "--steps", "1", "--no-progress"]) == 0
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert "already at step 1 >= the requested 1 steps" in out and "done: step 1" in out


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes_bitwise(tmp_path):
    """Preemption (Slurm, Kubernetes, spot VMs send SIGTERM): saved like Ctrl-C, and the resumed run ends
    bitwise where a run that was never interrupted ends. A second writer meanwhile is refused."""
    from iddpm import rundir
    from iddpm.train import TrainConfig, train

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    flags = ["--preset", "tiny", "--dataset", "digits8", "--diffusion-steps", "20", "--batch-size", "4",
             "--log-every", "1", "--save-every", "0", "--sample-every", "0", "--no-progress",
             "--device", "cpu", "--schedule-sampler", "loss-second-moment", "--ema-rates", "0.9",
             "--ema-warmup"]  # fmt: skip
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "iddpm", "train", *flags, "--steps", "100000", "--out-dir", str(run)]
    log = run / "log.jsonl"
    proc = start_until_logged(cmd, env, log)
    ns = build_parser().parse_args(["train", *flags, "--steps", "3", "--out-dir", str(run)])
    with pytest.raises(rundir.RunDirError, match=f"in use: process {proc.pid} "):
        train(config_from_args(ns), resume="auto")  # one writer per folder
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM, after saving
    stopped = torch.load(run / "latest.pt", weights_only=True)["step"]
    assert f"interrupted at step {stopped} (SIGTERM)" in out and stopped >= 2
    assert not (run / rundir.LOCK_NAME).exists()
    end = stopped + 2
    assert (
        main(["train", "--resume", "auto", "--out-dir", str(run), "--steps", str(end), "--no-progress"]) == 0
    )

    ref = tmp_path / "ref"
    ns = build_parser().parse_args(["train", *flags, "--steps", str(end), "--out-dir", str(ref)])
    cfg: TrainConfig = config_from_args(ns)
    torch.set_num_threads(1)
    train(cfg)
    a = torch.load(run / "latest.pt", weights_only=True)
    b = torch.load(ref / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == end
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"]["0.9"][k], b["ema"]["0.9"][k]), k
    assert torch.equal(a["sampler"]["history"], b["sampler"]["history"])
    steps = [r["step"] for r in (json.loads(x) for x in log.read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, end + 1))


def test_ema_rate_with_no_ema_is_refused(capsys):
    for cmd in ("sample", "nll"):
        assert main([cmd, "missing.pt", "--no-ema", "--ema-rate", "0.9999"]) == 2
        err = capsys.readouterr().err
        assert "--ema-rate 0.9999 picks an EMA, but --no-ema uses the raw weights" in err, err
