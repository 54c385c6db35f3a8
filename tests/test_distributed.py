"""torchrun on the CPU (gloo, 2 processes): end to end, exact resume, rank 0 alone writes, one DDP step equals
one process on the concatenated batch, and the importance sampler's statistics agree across ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iddpm import checkpoint as ck
from iddpm.train import DistInfo, make_train_state, resolve_unet_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import ddp_helper  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TRAIN = ["--preset", "tiny", "--dataset", "digits8", "--diffusion-steps", "20", "--batch-size", "8",
         "--microbatch", "2", "--log-every", "1", "--save-every", "2", "--sample-every", "0", "--no-progress",
         "--device", "cpu", "--schedule-sampler", "loss-second-moment"]  # fmt: skip


def run_helper(cwd: Path, step_out: str, audit: Path, *args: str) -> subprocess.CompletedProcess:
    audit.mkdir(exist_ok=True)
    return torchrun(str(HERE / "ddp_helper.py"), step_out, str(audit), "--", "train", *args, cwd=cwd)


@pytest.fixture(scope="module")
def first_launch(tmp_path_factory):
    """One torchrun launch (they cost seconds each): the DDP step check, then a 4-step training run."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "step").mkdir()
    proc = run_helper(
        root, str(root / "step"), root / "audit", *TRAIN, "--steps", "4", "--out-dir", str(root / "whole")
    )
    return root, proc


def test_torchrun_trains_resumes_exactly_and_only_rank_0_writes(first_launch):
    root, proc = first_launch
    whole, audit = root / "whole", root / "audit"
    assert proc.stdout.count("done: step 4") == 1  # only rank 0 reports
    # Rank 0 wrote the run's files; rank 1 wrote nothing in the run folder (not even a temporary file).
    rank0 = json.loads((audit / "rank0.json").read_text())
    assert any("ckpt_0000004.pt" in w for w in rank0) and any("log.jsonl" in w for w in rank0)
    assert json.loads((audit / "rank1.json").read_text()) == []
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["max_abs_diff"] for r in log if r.get("event") == "replicas"] == [0.0]
    saved = ck.safe_load(whole / "latest.pt")
    assert saved["world_size"] == 2 and saved["step"] == 4 and len(saved["rng"]) == 2
    # Each rank drew its own timesteps (otherwise the two replicas would train on the same t and noise).
    assert not torch.equal(saved["rng"][0]["generators"]["t"], saved["rng"][1]["generators"]["t"])

    # Resume under torchrun from the step-2 checkpoint (what a run stopped there left): bitwise the same end.
    parts = root / "parts"
    audit2 = root / "audit2"
    ckpt2 = str(whole / "ckpt_0000002.pt")
    run_helper(root, "-", audit2, "--resume", ckpt2, "--steps", "4", "--out-dir", str(parts), "--no-progress")
    assert json.loads((audit2 / "rank1.json").read_text()) == []
    resumed = ck.safe_load(parts / "latest.pt")
    assert resumed["step"] == 4
    for k in saved["model"]:
        assert torch.equal(resumed["model"][k], saved["model"][k]), k
        assert torch.equal(resumed["ema"]["0.9999"][k], saved["ema"]["0.9999"][k]), k
    for key in ("history", "counts"):
        assert torch.equal(resumed["sampler"][key], saved["sampler"][key])
    log = [json.loads(line) for line in (parts / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [3, 4]
    assert [r["exact"] for r in log if r.get("event") == "resume"] == [True]


def test_one_ddp_step_equals_one_process_on_the_concatenated_batch(first_launch, tmp_path):
    root, _ = first_launch
    ranks = [torch.load(root / "step" / f"rank{r}.pt", weights_only=True) for r in range(2)]

    cfg = ddp_helper.step_config(str(tmp_path / "single"))
    st = make_train_state(cfg, resolve_unet_config(cfg, 1, None), DistInfo(0, 0, 1, torch.device("cpu")))
    ddp_helper.perturb(st.model)
    before = [p.detach().clone() for p in st.model.parameters()]
    x, t, noise = ddp_helper.fixed_inputs()
    ddp_helper.one_step(st, x, t, noise)
    moved = 0
    params = zip(ranks[0]["params"], ranks[1]["params"], st.model.parameters(), before, strict=True)
    for i, (p0, p1, single, start) in enumerate(params):
        assert torch.equal(p0, p1)  # the replicas stay identical
        # The averaged gradient is the full-batch mean gradient; Adam's first step (about lr * sign(g))
        # magnifies float noise in tiny gradients, so the weights agree to a fraction of lr = 1e-3.
        torch.testing.assert_close(ranks[0]["grads"][i], single.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p0, single.detach(), rtol=0, atol=1e-4)
        moved += int(not torch.equal(single.detach(), start))
    assert moved == len(before)  # the step really changed every weight

    # The importance sampler: every rank holds the same statistics, those of one process that saw all losses.
    from iddpm.resample import LossSecondMomentSampler

    single_sampler = LossSecondMomentSampler(20, history=2)
    for per_rank in ddp_helper.sampler_updates():
        single_sampler.update(torch.cat([t for t, _ in per_rank]), torch.cat([loss for _, loss in per_rank]))
    expected = single_sampler.state_dict()
    for r in ranks:
        for key in ("history", "counts"):
            assert torch.equal(r["sampler"][key], expected[key]), key
    assert int(expected["counts"].sum()) > 0
